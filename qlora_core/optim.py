"""PagedAdamW: AdamW with 32-bit or 8-bit blockwise states, paged between the GPU and pinned host memory.

    opt = PagedAdamW(model.parameters(), lr=2e-4, optim_bits=8, gpu_budget_bytes=512 << 20)
    ...; loss.backward(); opt.step(); opt.zero_grad()
    opt.set_gpu_budget(128 << 20)   # on a memory spike: pages move to the host now, training goes on

* optim_bits=32 follows torch.optim.AdamW (decoupled decay first, fp32 m and v whatever the param dtype).
* optim_bits=8 stores m and v as bitsandbytes does (AdamW8bit, bnb-format.md §6): uint8 codes in 256-element
  blocks with an fp32 absmax each, the signed dynamic map for m and the unsigned one for v; tensors under
  4096 elements keep fp32 states (with the 32-bit update). A NaN/Inf gradient element resets that element's
  m and v to zero and leaves its parameter alone. The update is the adamw op (qlora_core/ops/adamw.py:
  adamw8bit_ref is the spec), run as one fused Triton kernel (kernels/adamw.py) on CUDA tensors and as the PyTorch
  reference elsewhere; ops/adamw.triton_kernels decides which.
* States live in fixed-size pages (qlora_core.paging): resident on the device within `gpu_budget_bytes` (one
  buffer, one launch per (bits, dtype, group)), the rest in one pinned host buffer, streamed in batches of
  `batch_pages` neighbouring pages (one copy each way, one launch per batch) through three staging groups with
  prefetch and write-back overlapped with the update. Never CUDA managed memory. With `gpu_budget_bytes=None` the budget is decided at the first step
  on CUDA: what the allocator may still take, minus the activation peak seen so far and a margin (so the
  next forward pass fits beside the pages); on the CPU nothing is paged.
* state_dict() holds the exact state (codes, absmax, fp32 moments, step) as CPU tensors keyed like
  bitsandbytes (8-bit: state1, state2, absmax1, absmax2) or torch (exp_avg, exp_avg_sq), so a resumed run is
  bit-identical and a checkpoint written on a GPU loads on the CPU and back.
* FSDP2 (DTensor) parameters: the state, its pages and the update cover this rank's local shard; a parameter's
  8-bit-or-fp32 choice follows its whole size. qlora_core.optim_shards moves the state between process counts.
Limits: all parameters on one device; dense gradients; no amsgrad/maximize; add_param_group only before the
first step.
"""
from __future__ import annotations

import torch

from .defaults import ADAM_BETAS, OPTIM_BITS, WEIGHT_DECAY
from .formats import dynamic_map
from .ops.adamw import BLOCKSIZE, adamw8bit_ref, adamw32_ref, adamw_coeffs, triton_kernels
from .paging import PageStore, layout

SOLO_SEGMENT = 1 << 20  # elements: a segment this large gets its own launch (the one-tensor kernel is faster)
MIN_8BIT_SIZE = 4096  # bnb's min_8bit_size: smaller tensors keep fp32 states
DEFAULT_PAGE_BYTES = 32 << 20
SAFETY_MARGIN = 256 << 20  # bytes kept free beside the activation peak when the budget is automatic


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with 32-bit or 8-bit blockwise states that page to pinned host memory under a GPU budget.

    A drop-in torch.optim.Optimizer. optim_bits=32 follows torch.optim.AdamW (decoupled decay); optim_bits=8
    stores m and v as uint8 codes per block of 256 (bitsandbytes' signed / unsigned dynamic maps, fp32 absmax;
    tensors under 4096 elements keep fp32 state) and updates them in one fused Triton kernel on CUDA (the
    PyTorch reference, qlora_core/ops/adamw.py, on the CPU). State lives in fixed-size pages: resident on the
    GPU within `gpu_budget_bytes` (None: decided at the first step from the free memory), the rest in pinned
    host memory, prefetched on a side stream; `set_gpu_budget(bytes)` changes it at run time. No CUDA managed
    memory is used. `batch_pages` neighbouring non-resident pages move and update together (None: up to a fifth
    of the budget, at most 32 MiB). Defaults (qlora_core/defaults.py): 8-bit states, weight decay 0; lr may be a
    one-element tensor, as torch.optim allows (read at each step). PagedAdamW8bit / PagedAdamW32bit fix the bits.
    Raises ValueError naming the argument for lr < 0, optim_bits not in (8, 32),
    betas outside [0, 1), eps < 0, weight_decay < 0, a negative budget, page_bytes < 4096 or batch_pages < 1.
    """
    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = ADAM_BETAS,
                 eps: float = 1e-8, weight_decay: float = WEIGHT_DECAY, optim_bits: int = OPTIM_BITS,
                 gpu_budget_bytes: int | None = None, page_bytes: int | None = None, batch_pages: int | None = None):
        if optim_bits not in (8, 32):
            raise ValueError(f"Invalid optim_bits: {optim_bits} (must be 8 or 32)")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas} (each must be in [0, 1))")
        _check_lr(lr, betas[0])
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
        if gpu_budget_bytes is not None and gpu_budget_bytes < 0:
            raise ValueError(f"Invalid gpu_budget_bytes: {gpu_budget_bytes} (must be >= 0 or None)")
        if page_bytes is not None and page_bytes < 4096:
            raise ValueError(f"Invalid page_bytes: {page_bytes} (must be >= 4096)")
        if batch_pages is not None and (not isinstance(batch_pages, int) or batch_pages < 1):
            raise ValueError(f"Invalid batch_pages: {batch_pages} (must be an int >= 1 or None)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.optim_bits = optim_bits
        self._budget = gpu_budget_bytes
        self._page_bytes = page_bytes
        self._batch_pages = batch_pages
        self._store: PageStore | None = None

    # ---- structure ---------------------------------------------------------------------------------------------
    def _params(self) -> list[tuple[torch.Tensor, dict]]:
        return [(p, g) for g in self.param_groups for p in g["params"]]

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim.Optimizer's; RuntimeError after the first step (the state pages are laid out then)."""
        if getattr(self, "_store", None) is not None:
            raise RuntimeError("PagedAdamW.add_param_group after the first step is not supported "
                               "(the state pages are laid out at the first step)")
        super().add_param_group(param_group)

    def _bits(self, p: torch.Tensor) -> int:
        return 8 if self.optim_bits == 8 and p.numel() >= MIN_8BIT_SIZE else 32

    def _build(self) -> None:
        params = self._params()
        self._plist = [p for p, _ in params]
        # FSDP2 parameters are DTensors: the state covers this rank's shard (its local rows) only
        self._flat = [_local(p) for p in self._plist]
        self._sharded = any(t is not p for t, p in zip(self._flat, self._plist))
        devices = {t.device for t in self._flat}
        if len(devices) != 1:
            raise ValueError(f"PagedAdamW needs all parameters on one device, got {sorted(map(str, devices))}")
        device = devices.pop()
        self._device = device
        group_index = {id(g): k for k, g in enumerate(self.param_groups)}
        self._group_of = [group_index[id(g)] for _, g in params]
        self._steps = [0] * len(self._flat)
        self._lockstep = True  # every parameter has taken the same number of steps (the fast path's premise)
        # bits by the whole parameter's size, so a parameter keeps its state format whatever the process count
        sizes = [(t.numel(), self._bits(p)) for t, p in zip(self._flat, self._plist)]
        total = sum(s for s in _state_bytes(sizes))
        budget = self._budget
        if budget is None and device.type == "cuda":
            budget = auto_budget(device)
        paged = budget is not None and budget < total
        page_bytes = self._page_bytes
        if page_bytes is None:
            page_bytes = DEFAULT_PAGE_BYTES
            if paged:
                # pages small enough that 3 staging slots + a few resident pages fit the budget, no smaller:
                # each paged batch costs a fixed ~0.1-0.3 ms of launches and stream hand-offs (H100)
                page_bytes = max(1 << 20, min(DEFAULT_PAGE_BYTES, (budget // 5) >> 16 << 16))
        batch = self._batch_pages
        if batch is None:  # neighbouring pages move and update together up to a fifth of the budget (<= 32 MiB)
            batch = max(1, min(DEFAULT_PAGE_BYTES, budget // 5) // page_bytes) if paged else 1
        self._segments, num_pages = layout(sizes, page_bytes)
        self._by_page: list[list] = [[] for _ in range(num_pages)]
        for seg in self._segments:
            self._by_page[seg.page].append(seg)
        self._plans: dict = {}  # (first page, pages) -> launch plan of that buffer region, built on first use
        self._addr_key, self._addr_tables = None, {}
        self._fast_key, self._fast_ok = None, False
        self._store = PageStore(num_pages, page_bytes, device, budget, batch)
        self._qmaps = (dynamic_map(True, device), dynamic_map(False, device))

    # ---- budget ------------------------------------------------------------------------------------------------
    def set_gpu_budget(self, nbytes: int | None) -> None:
        """Change the device byte budget for state pages now (None: everything resident)."""
        if nbytes is not None and nbytes < 0:
            raise ValueError(f"Invalid gpu budget: {nbytes} (must be >= 0 or None)")
        self._budget = nbytes
        if self._store is not None:
            self._store.set_budget(nbytes)

    @property
    def gpu_budget_bytes(self) -> int | None:
        """Device byte budget for state pages: the store's after the first step, else the one asked for.

        None before the first step: decided then (CUDA) or unlimited (CPU); None after it: every page resident.
        """
        return self._store.budget if self._store is not None else self._budget

    @property
    def state_device_bytes(self) -> int:
        """Bytes of state pages currently on the device (resident + staging); 0 before the first step."""
        return self._store.device_bytes if self._store is not None else 0

    @property
    def state_bytes(self) -> int:
        """Bytes of all optimizer state (codes, absmax, moments, with 64-byte alignment), wherever it lives."""
        return sum(seg.nbytes for seg in self._segments) if self._store is not None else 0

    @property
    def paging_stats(self) -> dict:
        """A copy of the page store's transfer counters (h2d/d2h pages, bytes, copies); {} before the first step."""
        return dict(self._store.stats) if self._store is not None else {}

    # ---- the step ----------------------------------------------------------------------------------------------
    # Never traced: the step keeps its bookkeeping (step counts, address tables, page plans) in Python state
    # that a compiled graph would freeze at its first values (a traced step gave parameters off by ~1e-2 after 3
    # steps). Code that compiles its own update over flat tensors uses ops/adamw.py's adamw*_step custom ops.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update of every parameter that has a grad; returns closure()'s loss (run with grad on) or None.

        The first step that sees a grad lays out the state pages (ValueError unless all parameters share one device).
        Parameters without a grad are skipped and keep their own step count. RuntimeError for a sparse grad or a
        non-contiguous parameter. Triton kernels on CUDA, the PyTorch reference elsewhere.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._store is None:
            if not any(p.grad is not None for p, _ in self._params()):
                return loss
            self._build()
        # Host cost is the limit for many small tensors (448 LoRA tensors: ~2 ms a step when every parameter
        # went through a Python loop of checks and dict lookups), so the common case -- every parameter has a
        # dense contiguous grad of its dtype and all took the same number of steps -- costs three list
        # comprehensions of C getters; addresses, tables and launch plans are reused while they stay valid.
        if self._sharded:  # FSDP may re-view its shards (lazy init); the views are re-read each step
            self._flat = [_local(p) for p in self._plist]
            grads = [None if p.grad is None else _local(p.grad) for p in self._plist]
        else:
            grads = [p.grad for p in self._flat]
        flat = self._flat
        try:
            key = ([(g.data_ptr(), g.dtype, g.is_contiguous()) for g in grads],
                   [(p.data_ptr(), p.is_contiguous()) for p in flat])
        except (AttributeError, RuntimeError):  # a missing (None) or sparse gradient
            key = None
        fast = False
        if key is not None and self._lockstep:
            changed = key != self._fast_key
            if changed:
                self._fast_key = key
                self._fast_ok = all(c and d == p.dtype for (_, d, c), p in zip(key[0], flat)) and all(
                    c for _, c in key[1])
            fast = self._fast_ok
        if fast:
            step = self._steps[0] + 1
            self._steps = [step] * len(flat)
            by_group = [self._coeffs(g, step) for g in self.param_groups]
            coeffs = [by_group[k] for k in self._group_of]
            batches = None
        else:
            self._fast_key = None  # the address tables below are this step's, not the fast path's
            grads, coeffs, batches = self._slow_prepare(grads)
            if grads is None:
                return loss
        kernels = triton_kernels(self._device)
        if kernels is not None:
            addr = self._addr_tables if fast and not changed else self._addresses(grads)
            self._store.run(lambda first, count, buf: self._triton_region(kernels, first, count, buf, grads, coeffs,
                                                                          fast, addr), batches)
            # Triton writes bypass autograd's version counters: bump them, or whatever keys a cache on `_version`
            # (the grouped linear's compute-dtype copies of A and B, ops/nf4_linear.py) keeps serving the weights
            # of before the step.
            torch.autograd.graph.increment_version([p for p, g in zip(flat, grads) if g is not None])
        else:
            self._store.run(lambda first, count, buf: self._reference_region(first, count, buf, grads, coeffs),
                            batches)
        return loss

    def _coeffs(self, g: dict, step: int) -> dict:
        lr = float(g["lr"])  # a tensor lr (torch.optim accepts one) is read once per step
        return {bits: adamw_coeffs(step, lr, *g["betas"], g["eps"], g["weight_decay"], bits)
                for bits in (8, 32)}

    def _slow_prepare(self, grads: list):
        """Checks and bookkeeping per parameter (some grads missing, non-contiguous, or steps out of lockstep).
        Returns (grads with contiguous copies, per-param coefficients, indices of the batches to visit) or
        (None, None, None) when no parameter has a grad."""
        coeffs, cache = {}, {}
        for i, p in enumerate(self._flat):
            g = grads[i]
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("PagedAdamW does not support sparse gradients")
            if not p.is_contiguous():
                raise RuntimeError("PagedAdamW needs contiguous parameters")
            if not g.is_contiguous():
                grads[i] = g.contiguous()
            self._steps[i] += 1
            key = (self._group_of[i], self._steps[i])
            if key not in cache:  # one pair of scalars per (group, step), not per parameter
                cache[key] = self._coeffs(self.param_groups[key[0]], key[1])
            coeffs[i] = cache[key]
        if not coeffs:
            return None, None, None
        self._lockstep = len(set(self._steps)) == 1
        pages = {s.page for s in self._segments if grads[s.param] is not None}
        batches = [j for j, (f, c) in enumerate(self._store.batches()) if any(f + k in pages for k in range(c))]
        return grads, coeffs, batches

    def _reference_region(self, first: int, count: int, buf: torch.Tensor, grads: list, coeffs) -> None:
        q1, q2 = self._qmaps
        P = self._store.page_bytes
        for page in range(first, first + count):
            for seg in self._by_page[page]:
                g = grads[seg.param]
                if g is None:
                    continue
                end = seg.start + seg.count
                p = self._flat[seg.param].view(-1)[seg.start:end]
                g = g.view(-1)[seg.start:end]
                views = seg.views(buf, (page - first) * P)
                if seg.bits == 8:
                    adamw8bit_ref(p, g, *views, q1, q2, coeffs[seg.param][8])
                else:
                    adamw32_ref(p, g, *views, coeffs[seg.param][32])

    def _plan(self, first: int, count: int) -> list[dict]:
        """Launch plan of the buffer holding pages first..first+count-1 (the resident region or one batch):
        segments grouped by (state bits, param dtype, param group); small segments go through the multi-tensor
        kernel with device tables seg (nseg, 8) int64 = param, start, count, state offsets (relative to the
        buffer) and blk (nblk, 2) int32 = segment, block; large ones get their own launch."""
        plan = self._plans.get((first, count))
        if plan is not None:
            return plan
        P = self._store.page_bytes
        buckets: dict = {}
        for page in range(first, first + count):
            for seg in self._by_page[page]:
                key = (seg.bits, self._flat[seg.param].dtype, self._group_of[seg.param])
                buckets.setdefault(key, []).append((seg, seg.offsets((page - first) * P)))
        plan = []
        for (bits, dtype, _), all_items in buckets.items():
            # Large segments run alone: on H100 the one-tensor kernel did the 1B model's 8-bit step in
            # 21.4 ms against 28.4 ms through the multi-tensor kernel (whose table reads and 64-bit
            # offsets cost ALU in a gather-bound kernel); small ones batch to save ~35 us launches.
            items = [(s, o) for s, o in all_items if s.count < SOLO_SEGMENT]
            solo = [(s, o) for s, o in all_items if s.count >= SOLO_SEGMENT]
            if solo:
                plan.append(dict(bits=bits, dtype=dtype, params=None, segs=solo))
            if not items:
                continue
            seg_rows, blk_rows = [], []
            for j, (seg, offs) in enumerate(items):
                seg_rows.append([seg.param, seg.start, seg.count, *offs, 0])
                blk_rows += [[j, b] for b in range(seg.nblocks)]
            plan.append(dict(bits=bits, dtype=dtype, params=sorted({s.param for s, _ in items}), segs=items,
                             nblk=len(blk_rows),
                             seg_table=torch.tensor(seg_rows, dtype=torch.int64).to(self._device),
                             blk_table=torch.tensor(blk_rows, dtype=torch.int32).to(self._device)))
        self._plans[(first, count)] = plan
        return plan

    def _addresses(self, grads: list) -> dict:
        """Per param dtype: (anchor tensor, (nparams, 2) int64 device table of p / grad element offsets from the
        anchor, all-16-byte-aligned flag). Re-sent only when an address changes (a fresh .grad from the caching
        allocator usually lands at the same address), so a step normally costs no copy."""
        key = tuple(a for p, g in zip(self._flat, grads) for a in (p.data_ptr(), g.data_ptr() if g is not None else 0))
        if key != self._addr_key:
            self._addr_key, self._addr_tables = key, {}
            for dtype in {p.dtype for p in self._flat}:
                anchor = next(p for p in self._flat if p.dtype == dtype)
                base, size = anchor.data_ptr(), anchor.element_size()
                rel = [(a - base) if a else 0 for a in key]
                if any(r % size for r in rel):  # not element-aligned to the anchor: per-segment launches only
                    self._addr_tables[dtype] = None
                    continue
                host = torch.tensor([r // size for r in rel], dtype=torch.int64).view(-1, 2)
                if self._device.type == "cuda":
                    host = host.pin_memory()  # the caching host allocator keeps it alive until copied
                self._addr_tables[dtype] = (anchor, host.to(self._device, non_blocking=True),
                                            all(r % 16 == 0 for r in rel))
        return self._addr_tables

    def _triton_region(self, kernels, first: int, count: int, buf: torch.Tensor, grads: list, coeffs,
                       uniform: bool, addr: dict) -> None:
        # One multi-tensor launch per (bits, dtype, group) of the region; per-segment launches for large
        # segments and where a group's tensors disagree (a missing grad, a different step count or grad dtype).
        # kernels: kernels/adamw.py, as ops/adamw.triton_kernels returned it.
        q1, q2 = self._qmaps
        f32 = buf.view(torch.float32)
        for lg in self._plan(first, count):
            params = lg["params"]
            if params is not None:
                a = addr.get(lg["dtype"])
                if a is not None and (uniform or all(
                        grads[i] is not None and self._steps[i] == self._steps[params[0]]
                        and grads[i].dtype == lg["dtype"] for i in params)):
                    anchor, table, aligned = a
                    kernels.launch_multi(lg["seg_table"], table, lg["blk_table"], lg["nblk"], anchor, aligned, buf,
                                         q1, q2, coeffs[params[0]][lg["bits"]], lg["bits"] == 8, BLOCKSIZE)
                    continue
            for seg, offs in lg["segs"]:
                g = grads[seg.param]
                if g is None:
                    continue
                p = self._flat[seg.param]
                if seg.bits == 8:
                    kernels.launch(p, g, seg.start, seg.count, buf, buf, offs[0], offs[1], f32, f32, offs[2],
                                   offs[3], q1, q2, coeffs[seg.param][8], True, BLOCKSIZE)
                else:
                    kernels.launch(p, g, seg.start, seg.count, f32, f32, offs[0], offs[1], f32, f32, 0, 0, q1, q2,
                                   coeffs[seg.param][32], False, BLOCKSIZE)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The exact state as CPU tensors: {"state": {param index: ...}, "param_groups", "optim_bits"}.

        Per stepped parameter: "step" (fp32 0-dim) and either state1/state2 uint8 (param shape) with absmax1/absmax2
        fp32 (ceil(numel/256),), or exp_avg/exp_avg_sq fp32 (param shape). Unstepped parameters have no entry.
        Synchronizes the device.
        """
        index = {id(p): i for i, (p, _) in enumerate(self._params())}
        groups = []
        for g in self.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": [index[id(p)] for p in g["params"]]})
        state = {}
        if self._store is not None:
            pages = {}
            for i, p in enumerate(self._flat):
                if self._steps[i] == 0:
                    continue
                segs = [s for s in self._segments if s.param == i]
                if not segs:  # an empty shard (more ranks than rows)
                    continue
                parts = []
                for s in segs:
                    if s.page not in pages:
                        pages[s.page] = self._store.read(s.page)
                    parts.append([v.clone() for v in s.views(pages[s.page])])
                arrays = [torch.cat(list(col)) for col in zip(*parts)]
                st = {"step": torch.tensor(float(self._steps[i]))}
                if segs[0].bits == 8:
                    st.update(state1=arrays[0].view(p.shape), state2=arrays[1].view(p.shape),
                              absmax1=arrays[2], absmax2=arrays[3])
                else:
                    st.update(exp_avg=arrays[0].view(p.shape), exp_avg_sq=arrays[1].view(p.shape))
                state[i] = st
        return {"state": state, "param_groups": groups, "optim_bits": self.optim_bits}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict() written on any device: group hyper-parameters, moments and step counts.

        Lays out the pages first if no step has run; parameters absent from the state restart at step 0 with zero
        moments. ValueError when the group sizes, optim_bits, state keys or element counts disagree.
        """
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("loaded state dict does not match the optimizer's parameter groups")
        bits = state_dict.get("optim_bits", self.optim_bits)
        if bits != self.optim_bits:
            raise ValueError(f"loaded state dict has optim_bits={bits}, this optimizer {self.optim_bits}")
        for mine, saved in zip(self.param_groups, groups):
            mine.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
        if self._store is None:
            self._build()
        saved_state = {int(k): v for k, v in state_dict["state"].items()}
        self._steps = [0] * len(self._flat)
        pages = {page: torch.zeros(self._store.page_bytes, dtype=torch.uint8) for page in range(len(self._by_page))}
        for i, p in enumerate(self._flat):
            st = saved_state.get(i)
            if st is None:
                continue
            segs = [s for s in self._segments if s.param == i]
            if not segs:
                continue
            if segs[0].bits == 8:
                names, block = ("state1", "state2", "absmax1", "absmax2"), (1, 1, 256, 256)
            else:
                names, block = ("exp_avg", "exp_avg_sq"), (1, 1)
            missing = [n for n in names if n not in st]
            if missing:
                raise ValueError(f"state of parameter {i} lacks {missing} (expected {segs[0].bits}-bit state)")
            arrays = [st[n].detach().reshape(-1).cpu() for n in names]
            if arrays[0].numel() != p.numel():
                raise ValueError(f"state of parameter {i} has {arrays[0].numel()} elements, param {p.numel()}")
            for s in segs:
                for view, src, per in zip(s.views(pages[s.page]), arrays, block):
                    lo = s.start // per
                    view.copy_(src[lo:lo + view.numel()].to(view.dtype))
            step = st["step"]
            self._steps[i] = int(step.item() if torch.is_tensor(step) else step)
        self._lockstep = len(set(self._steps)) == 1
        self._fast_key = None
        for page, data in pages.items():
            self._store.write(page, data)


def max_lr(beta1: float) -> float:
    """The largest lr whose first step size, lr / (1 - beta1) (bias correction at step 1), is a finite float32:
    the kernels and the reference take step sizes as float32 scalars."""
    return float(torch.finfo(torch.float32).max) * (1.0 - beta1)


def _check_lr(lr, beta1: float = ADAM_BETAS[0]) -> None:
    """ValueError unless lr is a number or a one-element float tensor (as torch.optim takes it), in
    [0, max_lr(beta1)]."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"Invalid learning rate: a tensor lr must hold one float, got {lr.dtype} "
                             f"{tuple(lr.shape)}")
        value = float(lr)
    elif isinstance(lr, (int, float)) and not isinstance(lr, bool):
        value = float(lr)
    else:
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a number or a one-element tensor)")
    if not value >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    if value > max_lr(beta1):
        raise ValueError(f"Invalid learning rate: {lr} (must be <= {max_lr(beta1):.3g}: the first step, "
                         f"lr / (1 - beta1) with beta1 = {beta1}, must fit in float32)")


class PagedAdamW8bit(PagedAdamW):
    """PagedAdamW with 8-bit states (bitsandbytes' `PagedAdamW8bit` name); same arguments minus optim_bits."""

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, **kwargs):
        if kwargs.setdefault("optim_bits", 8) != 8:
            raise ValueError(f"PagedAdamW8bit has optim_bits=8, got {kwargs['optim_bits']}")
        super().__init__(params, lr, **kwargs)


class PagedAdamW32bit(PagedAdamW):
    """PagedAdamW with 32-bit states (bitsandbytes' `PagedAdamW32bit` name); same arguments minus optim_bits."""

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, **kwargs):
        if kwargs.setdefault("optim_bits", 32) != 32:
            raise ValueError(f"PagedAdamW32bit has optim_bits=32, got {kwargs['optim_bits']}")
        super().__init__(params, lr, **kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (an FSDP2 parameter or gradient); any other tensor as is."""
    to_local = getattr(t, "to_local", None)
    if to_local is None:
        return t
    with torch.no_grad():  # the shard itself, not an autograd view of it
        return to_local()


def _state_bytes(sizes: list[tuple[int, int]]):
    for numel, bits in sizes:
        yield 2 * numel + 8 * (-(-numel // 256)) if bits == 8 else 8 * numel


def auto_budget(device: torch.device) -> int:
    """Bytes of state the device can hold beside the model: what the allocator may still take, minus the
    activation peak seen so far (it comes back with the next forward pass) and SAFETY_MARGIN."""
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    allocated = torch.cuda.memory_allocated(device)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction(device) if get_fraction is not None else 1.0
    room = min(free, int(fraction * total) - reserved) + (reserved - allocated)
    peak_extra = torch.cuda.max_memory_allocated(device) - allocated
    return max(0, room - peak_extra - SAFETY_MARGIN)
