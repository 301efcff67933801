"""Optimizer state in fixed-size pages: resident on the accelerator within a byte budget, the rest in host memory.

Why not CUDA managed memory (bitsandbytes' paged optimizers, bnb-format.md §7): oversubscribing managed memory
can hang a shared GPU, the driver migrates it in 4 KB-2 MB faults we cannot schedule, the PyTorch allocator does
not see it, and bnb synchronizes the device after every parameter. Here the pager owns the schedule:

  * `layout()` cuts every parameter's state into segments, each inside one page of `page_bytes`. A segment is a
    whole number of 256-element blocks of one parameter (8-bit: codes1, codes2, absmax1, absmax2; 32-bit: m, v),
    so every segment updates independently. The layout depends only on the parameter shapes, so the same
    parameters always give the same pages (checkpoints are independent of it anyway).
  * Within `budget` bytes, pages 0..R-1 live on the device for good, in ONE contiguous buffer (so one kernel
    launch covers all of them). If not all pages fit, 3 staging groups of `batch_pages` pages each are reserved
    and R = budget // page_bytes - 3 * batch_pages (the device footprint never drops below the staging).
    Pages R..N-1 live in ONE contiguous pinned host buffer, cut into batches of `batch_pages` neighbouring
    pages: a batch moves in one copy each way and is updated by one launch.
  * `run(fn)` calls fn(first_page, num_pages, buffer) once for the resident region, then once per batch:
    batch j is copied host->device on a load stream into staging group j % 3, fn enqueues its updates on the
    current stream, and the group is copied back on a store stream. Six reused events order the three streams
    (per group: loaded, updated, stored) plus one for "all stores of the previous step done"; the load of
    batch j+3 waits only for the store of batch j, so loads (H2D) and stores (D2H) of different groups run at
    once, beside the updates. The host never waits: no synchronization per parameter, page or batch (only
    budget changes and state export synchronize).
  * On a CPU "device" the same schedule runs with plain copies between CPU tensors, and `stats` counts the
    page and copy transfers, so the paging logic is tested without a GPU.
Host pages are pinned on CUDA so the copies are asynchronous DMA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 256  # elements per quantization block; segments are cut on block boundaries
ALIGN = 64  # bytes: every array inside a page starts 64-byte aligned
STAGING_SLOTS = 3  # staging groups; 2 serialize each group's store and next load (H100: 52 ms vs a 33 ms floor)
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
        """256-element blocks in the segment (the last may be partial)."""
        return -(-self.count // BLOCK)

    @property
    def nbytes(self) -> int:
        """Bytes the segment takes in its page (segment_bytes: each array 64-byte aligned)."""
        return segment_bytes(self.count, self.bits)

    def offsets(self, base: int = 0) -> tuple[int, int, int, int]:
        """Element offsets of the views into a buffer (seen as uint8 for codes, fp32 for absmax, m, v) in which
        this segment's page starts at byte `base`: 8-bit (codes1, codes2, absmax1, absmax2); 32-bit (m, v, 0, 0)."""
        o = base + self.offset
        if self.bits == 8:
            a, b = _align(self.count), _align(4 * self.nblocks)
            return o, o + a, (o + 2 * a) // 4, (o + 2 * a + b) // 4
        return o // 4, (o + _align(4 * self.count)) // 4, 0, 0

    def views(self, buf: torch.Tensor, base: int = 0) -> tuple[torch.Tensor, ...]:
        """The state arrays inside uint8 buffer `buf` whose byte `base` is this segment's page start:
        (codes1, codes2, absmax1, absmax2) or (m, v)."""
        o = base + self.offset
        if self.bits == 8:
            a, b = _align(self.count), _align(4 * self.nblocks)
            return (buf[o:o + self.count], buf[o + a:o + a + self.count],
                    buf[o + 2 * a:o + 2 * a + 4 * self.nblocks].view(torch.float32),
                    buf[o + 2 * a + b:o + 2 * a + b + 4 * self.nblocks].view(torch.float32))
        a = _align(4 * self.count)
        return (buf[o:o + 4 * self.count].view(torch.float32), buf[o + a:o + a + 4 * self.count].view(torch.float32))


def segment_bytes(count: int, bits: int) -> int:
    """Page bytes for the state of `count` elements, each array padded to a multiple of 64 bytes.

    bits=8: two uint8 code arrays + two fp32 absmax arrays (one value per 256-element block); else fp32 m and v.
    """
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

    def __init__(self, num_pages: int, page_bytes: int, device: torch.device, budget: int | None,
                 batch_pages: int = 1):
        self.num_pages, self.page_bytes, self.device = num_pages, page_bytes, torch.device(device)
        self.cuda = self.device.type == "cuda"
        # pages per batch; at most a third of the pages so 3 staging groups never exceed the state itself
        self.batch_pages = max(1, min(int(batch_pages), num_pages // STAGING_SLOTS))
        self.stats = {"h2d_pages": 0, "d2h_pages": 0, "h2d_bytes": 0, "d2h_bytes": 0, "h2d_copies": 0,
                      "d2h_copies": 0}
        self.resident = 0
        self.budget = None
        self._dev = self._host = self._staging = None
        self._streams = self._events = self._last_store = None
        self._schedule = None
        self._place(budget, None)

    # ---- placement -------------------------------------------------------------------------------------------
    def plan(self, budget: int | None) -> tuple[int, int]:
        """(resident pages, staging pages) for a byte budget; None means unlimited."""
        if budget is None or budget >= self.num_pages * self.page_bytes:
            return self.num_pages, 0
        slots = min(STAGING_SLOTS, self.num_pages) * self.batch_pages
        return max(0, min(self.num_pages - 1, budget // self.page_bytes - slots)), slots

    def _place(self, budget: int | None, state: torch.Tensor | None) -> None:
        """(Re)allocate the resident, host and staging buffers for `budget`, filled from `state` (all pages'
        bytes on the host) or zero (all-zero bytes are the initial state: codes 0 with absmax 0, or m = v = 0,
        dequantize to zero). The old device buffers are already freed, so shrinking never needs more memory."""
        P = self.page_bytes
        resident, slots = self.plan(budget)
        while True:
            try:
                dev = torch.empty(resident * P, dtype=torch.uint8, device=self.device)
                break
            except torch.OutOfMemoryError:  # the budget overestimated the room: fewer pages stay resident
                if resident == 0:
                    raise
                resident = min(resident - 1, resident * 7 // 8)
        host_bytes = (self.num_pages - resident) * P
        host = torch.empty(host_bytes, dtype=torch.uint8, pin_memory=self.cuda and host_bytes > 0)
        if state is None:
            dev.zero_()
            host.zero_()
        else:
            dev.copy_(state[:resident * P])
            host.copy_(state[resident * P:])
        old = self.resident if state is not None else resident
        for kind, moved in (("h2d", resident - old), ("d2h", old - resident)):
            if moved > 0:
                self._count(kind, moved)
        self._dev, self._host, self.resident = dev, host, resident
        self._staging = torch.empty(slots * P if resident < self.num_pages else 0, dtype=torch.uint8,
                                    device=self.device)
        self._schedule = None
        self.budget = budget

    def set_budget(self, budget: int | None) -> None:
        """Move pages so that at most `budget` bytes of pages (resident + staging) sit on the device.

        Synchronizes the device: budget changes are rare (a memory spike), steps never call this. All pages pass
        through host memory and the old device buffers are freed before the new ones are allocated.
        """
        if budget is not None and budget < 0:
            raise ValueError(f"gpu budget must be >= 0 bytes, got {budget}")
        state = self.export()
        self._dev = self._staging = None
        self._place(budget, state)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._last_store = None

    @property
    def device_pages(self) -> dict[int, torch.Tensor]:
        """page -> its view in the resident device buffer."""
        P = self.page_bytes
        return {i: self._dev[i * P:(i + 1) * P] for i in range(self.resident)}

    @property
    def staging(self) -> list[torch.Tensor]:
        """The staging pages' views (3 groups of batch_pages pages, contiguous)."""
        P = self.page_bytes
        return [self._staging[i * P:(i + 1) * P] for i in range(self._staging.numel() // P)]

    @property
    def device_bytes(self) -> int:
        """Bytes held on the device: resident pages plus staging groups."""
        return self._dev.numel() + self._staging.numel()

    def batches(self) -> list[tuple[int, int]]:
        """(first page, number of pages) of every non-resident batch, in schedule order."""
        k = self.batch_pages
        return [(f, min(k, self.num_pages - f)) for f in range(self.resident, self.num_pages, k)]

    def _count(self, kind: str, pages: int) -> None:
        self.stats[f"{kind}_pages"] += pages
        self.stats[f"{kind}_bytes"] += pages * self.page_bytes
        self.stats[f"{kind}_copies"] += 1

    # ---- the step schedule -----------------------------------------------------------------------------------
    def _batch_views(self):
        """Per batch: (first, count, host view, staging group view), cached until the placement changes."""
        if self._schedule is None:
            P, k, R = self.page_bytes, self.batch_pages, self.resident
            self._schedule = [(f, c, self._host[(f - R) * P:(f - R + c) * P],
                               self._staging[(j % STAGING_SLOTS) * k * P:((j % STAGING_SLOTS) * k + c) * P])
                              for j, (f, c) in enumerate(self.batches())]
        return self._schedule

    def run(self, fn, batches=None) -> None:
        """Call fn(first_page, num_pages, buffer) for the resident region (if any) and for every non-resident
        batch (all, or the indices into batches() given), the batch's pages streamed through staging."""
        sched = self._batch_views()
        if batches is not None:
            sched = [sched[j] for j in batches]
        if not sched or not self.cuda:
            if self.resident:
                fn(0, self.resident, self._dev)
        n, slots = len(sched), STAGING_SLOTS
        if not sched:
            return
        if not self.cuda:
            for first, count, host, stage in sched:
                stage.copy_(host)
                self._count("h2d", count)
                fn(first, count, stage)
                host.copy_(stage)
                self._count("d2h", count)
            return
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
            self._events = [[torch.cuda.Event() for _ in range(slots)] for _ in range(3)]
        load, store = self._streams
        loaded, updated, stored = self._events
        main = torch.cuda.current_stream(self.device)
        if self._last_store is not None:
            load.wait_event(self._last_store)  # the previous step's host copies are complete
        ahead = min(slots, n)
        with torch.cuda.stream(load):
            for j in range(ahead):
                sched[j][3].copy_(sched[j][2], non_blocking=True)
                loaded[j].record(load)
        if self.resident:  # the resident pages update while the first batches load
            fn(0, self.resident, self._dev)
        for j, (first, count, host, stage) in enumerate(sched):
            g = j % slots
            main.wait_event(loaded[g])
            fn(first, count, stage)
            updated[g].record(main)
            store.wait_event(updated[g])
            with torch.cuda.stream(store):
                host.copy_(stage, non_blocking=True)
                stored[g].record(store)
            nxt = j + slots
            if nxt < n:
                load.wait_event(stored[g])  # the group's previous batch is back on the host
                with torch.cuda.stream(load):
                    sched[nxt][3].copy_(sched[nxt][2], non_blocking=True)
                    loaded[g].record(load)
        if self._last_store is None:
            self._last_store = torch.cuda.Event()
        self._last_store.record(store)
        pages = sum(s[1] for s in sched)
        for kind in ("h2d", "d2h"):
            self.stats[f"{kind}_pages"] += pages
            self.stats[f"{kind}_bytes"] += pages * self.page_bytes
            self.stats[f"{kind}_copies"] += n

    # ---- export / import -------------------------------------------------------------------------------------
    def export(self) -> torch.Tensor:
        """All pages' bytes as one host tensor (synchronizes on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return torch.cat([self._dev.cpu(), self._host.clone()])

    def read(self, page: int) -> torch.Tensor:
        """A host copy of a page, for export (synchronizes on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return self._page(page).cpu().clone()

    def write(self, page: int, data: torch.Tensor) -> None:
        """Replace a page's bytes (for import)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._page(page).copy_(data)

    def _page(self, page: int) -> torch.Tensor:
        P, R = self.page_bytes, self.resident
        return self._dev[page * P:(page + 1) * P] if page < R else self._host[(page - R) * P:(page - R + 1) * P]
