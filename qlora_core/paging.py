"""Optimizer state in fixed-size pages: resident on the accelerator within a byte budget, the rest in host memory.

Why not CUDA managed memory (bitsandbytes' paged optimizers, bnb-format.md §7): oversubscribing managed memory
can hang a shared GPU, the driver migrates it in 4 KB-2 MB faults we cannot schedule, the PyTorch allocator does
not see it, and bnb synchronizes the device after every parameter. Here the pager owns the schedule:

  * `layout()` cuts every parameter's state into segments, each inside one page of `page_bytes`. A segment is a
    whole number of 256-element blocks of one parameter (8-bit: codes1, codes2, absmax1, absmax2; 32-bit: m, v),
    so every segment updates independently. The layout depends only on the parameter shapes, so the same
    parameters always give the same pages (checkpoints are independent of it anyway).
  * Within `budget` bytes, the first R pages live on the device for good. If not all pages fit, S = 3 staging
    slots are reserved and R = budget // page_bytes - S (the device footprint never drops below S pages).
  * `run(fn)` visits every page once: non-resident page j is copied host->device on a load stream into slot
    j % S, `fn(page, buffer)` enqueues its updates on the current stream, and the slot is copied back on a store
    stream. Events order the three streams; the load of page j+S waits only for the store of page j, so
    loads (H2D) and stores (D2H) of different slots run at once, beside the updates. The host never waits: there is no
    synchronization per parameter or per page (only budget changes and state export synchronize).
  * On a CPU "device" the same schedule runs with plain copies between two sets of CPU tensors, and `stats`
    counts the page transfers, so the paging logic is tested without a GPU.
Host pages are pinned on CUDA so the copies are asynchronous DMA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 256  # elements per quantization block; segments are cut on block boundaries
ALIGN = 64  # bytes: every array inside a page starts 64-byte aligned
STAGING_SLOTS = 3  # 2 serialize each slot's store and next load (H100: 52 ms vs a 33 ms PCIe floor)
MIN_PAGE_BYTES = 4096


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Segment:
    """State of elements [start, start+count) of parameter `param`, stored at `offset` bytes into page `page`."""
    param: int
    start: int
    count: int
    bits: int  # 8: uint8 codes + fp32 absmax per block; 32: fp32 m and v
    page: int
    offset: int

    @property
    def nblocks(self) -> int:
        return -(-self.count // BLOCK)

    @property
    def nbytes(self) -> int:
        return segment_bytes(self.count, self.bits)

    def offsets(self) -> tuple[int, int, int, int]:
        """Element offsets of the views into the page seen as uint8 (codes) / fp32 (absmax, m, v):
        8-bit (codes1, codes2, absmax1, absmax2); 32-bit (m, v, -, -)."""
        o = self.offset
        if self.bits == 8:
            a, b = _align(self.count), _align(4 * self.nblocks)
            return o, o + a, (o + 2 * a) // 4, (o + 2 * a + b) // 4
        return o // 4, (o + _align(4 * self.count)) // 4, 0, 0

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The state arrays inside page buffer `buf` (uint8): (codes1, codes2, absmax1, absmax2) or (m, v)."""
        o = self.offset
        if self.bits == 8:
            a, b = _align(self.count), _align(4 * self.nblocks)
            return (buf[o:o + self.count], buf[o + a:o + a + self.count],
                    buf[o + 2 * a:o + 2 * a + 4 * self.nblocks].view(torch.float32),
                    buf[o + 2 * a + b:o + 2 * a + b + 4 * self.nblocks].view(torch.float32))
        a = _align(4 * self.count)
        return (buf[o:o + 4 * self.count].view(torch.float32), buf[o + a:o + a + 4 * self.count].view(torch.float32))


def segment_bytes(count: int, bits: int) -> int:
    if bits == 8:
        return 2 * _align(count) + 2 * _align(4 * (-(-count // BLOCK)))
    return 2 * _align(4 * count)


def layout(sizes: list[tuple[int, int]], page_bytes: int) -> tuple[list[Segment], int]:
    """Pack parameters' states, given as (numel, bits) in order, into pages. Returns (segments, num_pages)."""
    segments: list[Segment] = []
    page, used = 0, 0
    for index, (numel, bits) in enumerate(sizes):
        start = 0
        while start < numel:
            room = page_bytes - used
            # the largest whole number of blocks (or the whole rest) that fits in this page
            lo, hi = 0, -(-(numel - start) // BLOCK)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if segment_bytes(min(mid * BLOCK, numel - start), bits) <= room:
                    lo = mid
                else:
                    hi = mid - 1
            if lo == 0:
                page, used = page + 1, 0
                continue
            count = min(lo * BLOCK, numel - start)
            segments.append(Segment(index, start, count, bits, page, used))
            used += segment_bytes(count, bits)
            start += count
    num_pages = page + 1 if segments and used else page
    return segments, num_pages


class PageStore:
    """The pages of one optimizer on one device, and the schedule that brings them to it (module docstring)."""

    def __init__(self, num_pages: int, page_bytes: int, device: torch.device, budget: int | None):
        self.num_pages, self.page_bytes, self.device = num_pages, page_bytes, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.device_pages: dict[int, torch.Tensor] = {}  # page -> device buffer (resident pages)
        self.host_pages: dict[int, torch.Tensor] = {}  # page -> host buffer (non-resident pages)
        self.staging: list[torch.Tensor] = []
        self.stats = {"h2d_pages": 0, "d2h_pages": 0, "h2d_bytes": 0, "d2h_bytes": 0}
        self.budget = None
        self._streams = None
        self._written: dict[int, torch.cuda.Event] = {}  # page -> its last store finished (CUDA)
        self._slot_free: list = []
        # all-zero bytes are the initial state (codes 0 with absmax 0, or m = v = 0 dequantize to zero)
        resident, slots = self.plan(budget)
        for i in range(num_pages):
            if i < resident:
                try:
                    self.device_pages[i] = self._device_empty().zero_()
                    continue
                except torch.OutOfMemoryError:  # the budget overestimated the room: the rest goes to the host
                    resident = i
            self.host_pages[i] = self._host_empty().zero_()
        slots = min(STAGING_SLOTS, num_pages) if self.host_pages else 0
        self.staging = [self._device_empty() for _ in range(slots)]
        self._slot_free = [None] * slots
        self.budget = budget

    # ---- placement -------------------------------------------------------------------------------------------
    def _host_empty(self) -> torch.Tensor:
        return torch.empty(self.page_bytes, dtype=torch.uint8, pin_memory=self.cuda)

    def _device_empty(self) -> torch.Tensor:
        return torch.empty(self.page_bytes, dtype=torch.uint8, device=self.device)

    def plan(self, budget: int | None) -> tuple[int, int]:
        """(resident pages, staging slots) for a byte budget; None means unlimited."""
        if budget is None or budget >= self.num_pages * self.page_bytes:
            return self.num_pages, 0
        slots = min(STAGING_SLOTS, self.num_pages)
        return max(0, min(self.num_pages - 1, budget // self.page_bytes - slots)), slots

    def set_budget(self, budget: int | None) -> None:
        """Move pages so that at most `budget` bytes of pages (resident + staging) sit on the device.

        Synchronizes the device once: budget changes are rare (a memory spike), steps never call this.
        """
        if budget is not None and budget < 0:
            raise ValueError(f"gpu budget must be >= 0 bytes, got {budget}")
        if self.cuda:
            torch.cuda.synchronize(self.device)
        resident, slots = self.plan(budget)
        for i in range(self.num_pages):
            if i < resident and i not in self.device_pages:
                buf = self._device_empty()
                buf.copy_(self.host_pages.pop(i))
                self.device_pages[i] = buf
                self._count("h2d")
            elif i >= resident and i in self.device_pages:
                host = self._host_empty()
                host.copy_(self.device_pages.pop(i))
                self.host_pages[i] = host
                self._count("d2h")
        self.staging = [self._device_empty() for _ in range(slots)]
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._written.clear()
            self._slot_free = [None] * slots
        self.budget = budget

    @property
    def device_bytes(self) -> int:
        return (len(self.device_pages) + len(self.staging)) * self.page_bytes

    def _count(self, kind: str) -> None:
        self.stats[f"{kind}_pages"] += 1
        self.stats[f"{kind}_bytes"] += self.page_bytes

    # ---- the step schedule -----------------------------------------------------------------------------------
    def _cuda_streams(self):
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        return self._streams

    def _load(self, page: int, slot: int):
        """Start copying host page -> staging slot; returns what the consumer must wait on."""
        self._count("h2d")
        if not self.cuda:
            self.staging[slot].copy_(self.host_pages[page])
            return None
        load, _ = self._cuda_streams()
        if self._slot_free[slot] is not None:
            load.wait_event(self._slot_free[slot])  # the slot's previous page has been stored
        if page in self._written:
            load.wait_event(self._written[page])  # the host copy is complete (stored last step)
        with torch.cuda.stream(load):
            self.staging[slot].copy_(self.host_pages[page], non_blocking=True)
            return _record(load)

    def _store(self, page: int, slot: int, main) -> None:
        self._count("d2h")
        if not self.cuda:
            self.host_pages[page].copy_(self.staging[slot])
            return
        _, store = self._cuda_streams()
        store.wait_event(_record(main))  # after the updates of this page, queued on the main stream
        with torch.cuda.stream(store):
            self.host_pages[page].copy_(self.staging[slot], non_blocking=True)
            done = _record(store)
        self._written[page] = done
        self._slot_free[slot] = done

    def run(self, fn, pages=None) -> None:
        """Call fn(page, buffer) for every page in `pages` (default all): resident ones first while the first
        non-resident pages load, then the rest through the staging slots."""
        pages = range(self.num_pages) if pages is None else pages
        resident = [i for i in pages if i in self.device_pages]
        paged = [i for i in pages if i not in self.device_pages]
        slots = len(self.staging)
        main = torch.cuda.current_stream(self.device) if self.cuda and paged else None
        ready = {}
        for j in range(min(slots, len(paged))):
            ready[j] = self._load(paged[j], j)
        for i in resident:
            fn(i, self.device_pages[i])
        for j, page in enumerate(paged):
            slot = j % slots
            if main is not None:
                main.wait_event(ready.pop(j))
            fn(page, self.staging[slot])
            self._store(page, slot, main)
            if j + slots < len(paged):
                ready[j + slots] = self._load(paged[j + slots], slot)

    def read(self, page: int) -> torch.Tensor:
        """A host copy of a page, for export (synchronizes on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        buf = self.device_pages.get(page)
        return (buf if buf is not None else self.host_pages[page]).cpu().clone()

    def write(self, page: int, data: torch.Tensor) -> None:
        """Replace a page's bytes (for import)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        buf = self.device_pages.get(page)
        (buf if buf is not None else self.host_pages[page]).copy_(data)


def _record(stream) -> "torch.cuda.Event":
    event = torch.cuda.Event()
    event.record(stream)
    return event
