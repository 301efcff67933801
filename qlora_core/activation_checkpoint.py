"""Activation checkpointing of the decoder blocks as a policy per block, and a planner for a GPU memory budget.

Policies, fastest first:
- "none":      keep every activation of the block for backward (no recompute).
- "save_attn": recompute the block in backward, except attention: selective checkpointing keeps SDPA's output
               and log-sum-exp, so backward never re-runs the attention forward (B*T*(H*D*2 + H*4) bytes more per
               block than "full").
- "full":      keep only the block input (B, T, d) and recompute the whole block in backward.
- "offload":   as "full", but the block input waits in pinned host memory (copied on a side stream, prefetched
               back one block ahead during backward), so the GPU keeps nothing per block: Unsloth's offloaded
               checkpointing. On the CPU the "host copy" is a plain clone (same code path, nothing saved).
               Like reentrant checkpointing, it backpropagates into the parameters inside its own backward, so
               their grads arrive through `.backward()` (accumulated into .grad), not through autograd.grad.
               With a stride k (`HostOffload(every=k)`, for short host memory) only one input per k consecutive
               blocks goes to the host; the others are re-run from it in backward.
A plan is one policy per block. `plan_for_budget` picks, greedily by time saved per byte, the fastest plan (of
offload, full and none) whose estimated peak fits the budget; the estimates are simple byte counts of what each
policy keeps (see `block_bytes`), not measurements. `plan_long_context` adds the long-context choices around it:
the MLP's sequence chunk (seq_chunks.py) and the host-copy stride, under a GPU and a host budget. `apply_policy`
sets a Llama's policy (or budget) in one call. docs/memory.md explains the modes and the planner's line.
"""
from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .seq_chunks import autocast_state, replay, rng_state

POLICIES = ("none", "save_attn", "full", "offload")

_ATTENTION_OPS = tuple(getattr(torch.ops.aten, n).default for n in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"))


def _keep_attention(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SAVE_ATTENTION = functools.partial(create_selective_checkpoint_contexts, _keep_attention)


def run_block(block, policy: str, x: torch.Tensor, *args, offload: "HostOffload | None" = None) -> torch.Tensor:
    """block(x, *args) under `policy` (one of POLICIES); x (B, T, d). "offload" needs the pass's HostOffload."""
    if policy == "none":
        return block(x, *args)
    if policy == "full":
        return checkpoint(block, x, *args, use_reentrant=False)
    if policy == "save_attn":
        return checkpoint(block, x, *args, use_reentrant=False, context_fn=_SAVE_ATTENTION)
    if policy == "offload":
        return OffloadedBlock.apply(block, offload, _GRAD_ANCHOR, x, *args)
    raise ValueError(f"checkpoint policy {policy!r}; expected one of {POLICIES}")


class HostOffload:
    """Pinned host copies of one forward pass's block inputs, in block order; backward fetches them in reverse.

    D2H copies run on a side stream after the block's input is ready; fetching a copy also starts the copy back
    of the one before on the side stream, so each block's backward overlaps the next one's transfer. Pinned buffers
    are reused across passes (one pool per process, keyed by shape and dtype).

    every=k (for when host memory runs short): consecutive offloaded blocks form groups of k and only each group's
    first input goes to the host. The first backward in a group fetches that input and re-runs the group's blocks
    before it without grad to get their inputs back (k inputs on the GPU at once, k - 1 more block forwards per
    group). A block whose input is not the previous offloaded block's output starts a new group.
    """
    _pool: dict = {}
    _streams: dict = {}

    def __init__(self, device: torch.device, every: int = 1):
        self.cuda = device.type == "cuda"
        self.stream = self._streams.setdefault(device, torch.cuda.Stream(device)) if self.cuda else None
        self.every = max(1, int(every))
        self.slots: list[tuple[torch.Tensor | None, torch.cuda.Event]] = []  # (host copy, D2H done); None: member
        self.head: list[int] = []  # slot -> the slot of its group's first input
        self.reruns: dict[int, tuple] = {}  # slot -> (block, args, rng, autocast): its group re-runs it
        self.fetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}  # slot -> (device copy, H2D done)
        self.recomputed: dict[int, torch.Tensor] = {}  # slot -> its input, re-run from the group's first
        self._last_out = None  # weakref to the previous offloaded block's output

    def put(self, x: torch.Tensor, rerun: tuple = ()) -> int:
        """Start copying x to pinned memory (a group's first input) or only note it (a later member); returns its
        slot. rerun: (block, args, rng, autocast), what re-running this block from its input needs."""
        slot = len(self.slots)
        prev = self._last_out() if self._last_out is not None else None
        member = self.every > 1 and prev is x and slot - self.head[-1] < self.every
        self.head.append(self.head[-1] if member else slot)
        if rerun and self.every > 1:
            self.reruns[slot] = rerun
        if member:
            self.slots.append((None, None))
        elif not self.cuda:
            self.slots.append((x.detach().clone(), None))
        else:
            self.slots.append(self._copy_out(x))
        return slot

    def note_output(self, y: torch.Tensor) -> None:
        """y is the output of the block just put: a next block whose input is y joins its group."""
        self._last_out = weakref.ref(y) if self.every > 1 else None

    def _copy_out(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        key = (tuple(x.shape), x.dtype)
        free = self._pool.setdefault(key, [])
        host = free.pop() if free else torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self.stream):
            host.copy_(x, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        x.record_stream(self.stream)  # x's memory is not reused before the copy has read it
        return host, done

    def _start_fetch(self, slot: int, device: torch.device) -> None:
        if slot < 0 or slot in self.fetched or not self.cuda:
            return
        host, d2h = self.slots[slot]
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(d2h)
            x = torch.empty(host.shape, dtype=host.dtype, device=device)
            x.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self.fetched[slot] = (x, done)

    def _fetch(self, slot: int, device: torch.device) -> torch.Tensor:
        """The device copy of a host-held slot (waited for on the current stream); prefetches the previous
        group's first input and frees this slot's host buffer for reuse."""
        if not self.cuda:
            return self.slots[slot][0]
        self._start_fetch(slot, device)
        x, done = self.fetched.pop(slot)
        cur = torch.cuda.current_stream(device)
        cur.wait_event(done)
        x.record_stream(cur)
        if slot > 0:
            self._start_fetch(self.head[slot - 1], device)
        host, _ = self.slots[slot]
        self._pool[(tuple(host.shape), host.dtype)].append(host)  # the H2D above completed before `done`
        return x

    def get(self, slot: int, device: torch.device) -> torch.Tensor:
        """The input of `slot` on `device`: fetched from the host, or re-run from its group's first input."""
        if slot in self.recomputed:
            return self.recomputed.pop(slot)
        head = self.head[slot]
        x = self._fetch(head, device)
        for s in range(head, slot):  # inputs of the group's later blocks, for their backward after this one's
            self.recomputed[s] = x
            block, args, rng, autocast = self.reruns.pop(s)
            with replay(rng, autocast, device), torch.no_grad():
                x = block(x, *args)
        self.reruns.pop(slot, None)
        return x


# Passed to OffloadedBlock so its output requires grad even when x does not (the first block's input comes from a
# frozen embedding): the trainable parameters inside the block are not inputs of the Function.
_GRAD_ANCHOR = torch.empty(0, requires_grad=True)


class OffloadedBlock(torch.autograd.Function):
    """y = block(x, *args) keeping x only in pinned host memory; backward re-runs the block on the fetched x."""

    @staticmethod
    def forward(ctx, block, offload: HostOffload, anchor: torch.Tensor, x: torch.Tensor, *args):
        """x (B, T, d) CUDA -> block output; args are the block's non-differentiable inputs (cos, sin, mask)."""
        ctx.autocast, ctx.rng = autocast_state(x.device), rng_state(x.device)
        ctx.block, ctx.offload, ctx.args, ctx.device = block, offload, args, x.device
        ctx.slot = offload.put(x, (block, args, ctx.rng, ctx.autocast))
        with torch.no_grad():
            y = block(x, *args)
        offload.note_output(y)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        """Fetch x, recompute the block with grad under the forward's autocast and RNG state, backpropagate dy."""
        x = ctx.offload.get(ctx.slot, ctx.device).detach().requires_grad_(ctx.needs_input_grad[3])
        with replay(ctx.rng, ctx.autocast, ctx.device), torch.enable_grad():
            y = ctx.block(x, *ctx.args)
        if y.requires_grad:
            torch.autograd.backward(y, dy)
        return (None, None, None, x.grad, *([None] * len(ctx.args)))


# -- planning for a budget ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockShape:
    """What the byte and FLOP estimates need of the model and the batch."""
    tokens: int         # B * T per micro-batch
    seq: int            # T (attention cost grows with it)
    hidden: int         # d
    heads: int          # H
    kv_heads: int       # KVH
    head_dim: int       # D
    intermediate: int   # SwiGLU width I
    elem: int = 2       # bytes per activation element (bf16)
    chunk: int = 0      # MLP rows per chunk (seq_chunks.py); 0 = unchunked

    @property
    def chunked(self) -> bool:
        """Whether the MLP really runs in chunks (a chunk as long as the batch is no chunking)."""
        return 0 < self.chunk < self.tokens


def _attention_side(s: BlockShape) -> int:
    """Bytes a block keeps for backward outside the MLP's (rows, 3I): norm inputs/outputs, q/k/v, attention out
    and lse, o input."""
    qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
    return s.tokens * (s.elem * (4 * s.hidden + qkv + 2 * s.heads * s.head_dim) + s.heads * 4)


def block_bytes(s: BlockShape, policy: str) -> int:
    """GPU bytes a block keeps between its forward and its backward under `policy` (host bytes not counted)."""
    full = s.tokens * s.hidden * s.elem
    attn = s.tokens * (s.heads * s.head_dim * s.elem + s.heads * 4)
    if policy == "offload":
        return 0
    if policy == "full":
        return full
    if policy == "save_attn":
        return full + attn
    # none: + gate/up out and SwiGLU out (3I), unless chunked: ChunkedRows keeps only its input
    return _attention_side(s) + (0 if s.chunked else s.tokens * s.elem * 3 * s.intermediate)


def working_bytes(s: BlockShape) -> int:
    """The block being recomputed and its grads at the peak of its backward: twice what "none" keeps, with the
    MLP's (rows, 3I) for one chunk's rows only when chunked."""
    rows = s.chunk if s.chunked else s.tokens
    return 2 * (_attention_side(s) + rows * s.elem * 3 * s.intermediate)


def block_recompute_flops(s: BlockShape, policy: str) -> float:
    """FLOPs of the forward recompute a block's backward does under `policy` (0 for "none" unchunked); a chunked
    MLP adds one MLP forward under every policy (ChunkedRows recomputes it in its backward)."""
    d, qkv = s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim
    mlp = 2.0 * s.tokens * 3 * d * s.intermediate
    extra = mlp if s.chunked else 0.0
    if policy == "none":
        return extra
    linear = 2.0 * s.tokens * (d * qkv + s.heads * s.head_dim * d) + mlp
    attention = 2.0 * s.tokens * s.seq * s.heads * s.head_dim  # causal: half of 4*T^2*H*D per row of B
    return linear + (0.0 if policy == "save_attn" else attention) + extra


def plan_for_budget(s: BlockShape, layers: int, budget_bytes: float, fixed_bytes: float) -> list[str]:
    """The plan (one policy per block) with the least recompute whose estimate fits: fixed_bytes (weights,
    optimizer, one block's working set) + sum of block_bytes <= budget_bytes. Starts from "offload" everywhere and
    upgrades blocks greedily by FLOPs saved per byte spent; all "offload" when even that does not fit."""
    plan = ["offload"] * layers
    used = fixed_bytes
    # save_attn is left out: measured slower than full on an H200 (docs/benchmarks.md), its dispatch mode costs
    # more host time than the attention forward it saves
    order = ["offload", "full", "none"]
    nbytes = {p: block_bytes(s, p) for p in order}  # all blocks are alike: once per policy
    flops = {p: block_recompute_flops(s, p) for p in order}
    while True:
        best = None
        for i, p in enumerate(plan):
            for q in order[order.index(p) + 1:]:
                extra = nbytes[q] - nbytes[p]
                gain = flops[p] - flops[q] + (1.0 if p == "offload" else 0.0)
                if gain <= 0 or used + extra > budget_bytes:
                    continue
                score = gain / max(extra, 1)
                if best is None or score > best[0]:
                    best = (score, i, q, extra)
        if best is None:
            return plan
        _, i, q, extra = best
        plan[i] = q
        used += extra


# MLP chunk sizes (rows) and host-copy strides the long-context planner tries; 0 = unchunked. Below 1024 rows the
# chunk's GEMMs (1024 x 4096 x 28672 on an 8B) get too small to keep an H100 busy; every group of k blocks holds
# k inputs on the GPU in backward, so k stays a power of two
CHUNKS = (0, 32768, 16384, 8192, 4096, 2048, 1024)
EVERY = (1, 2, 4, 8, 16, 32, 64, 128)
# What one MLP chunk costs beyond its FLOPs, as FLOPs, per block and step (forward, recompute, backward): ~10
# launches and the Python around them, ~50 us each pass at ~400 TFLOP/s (an estimate, not a measurement). Without
# it the planner would shrink chunks to 1024 rows for one more un-recomputed block
CHUNK_OVERHEAD_FLOPS = 3 * 2e10


@dataclasses.dataclass(frozen=True)
class LongPlan:
    """One planner answer: per-block policies, the MLP chunk (0 = off), the host-copy stride, and its estimates."""
    policies: tuple[str, ...]
    chunk: int          # MLP rows per chunk, 0 = unchunked
    every: int          # offloaded blocks keep one host input per `every` blocks
    gpu_bytes: float    # estimated GPU peak
    host_bytes: float   # estimated pinned host bytes (block inputs)
    flops: float        # estimated recompute FLOPs per micro-batch
    fits: bool          # gpu_bytes and host_bytes within their budgets

    def describe(self) -> str:
        """'32 offload, MLP in chunks of 8192 tokens, one host copy per 2 blocks' style summary."""
        parts = [describe(list(self.policies))]
        if self.chunk:
            parts.append(f"MLP in chunks of {self.chunk} tokens")
        if self.every > 1:
            parts.append(f"one host copy per {self.every} blocks")
        return ", ".join(parts)


def host_bytes(s: BlockShape, plan, every: int) -> int:
    """Pinned host bytes of a plan: one block input per group of `every` consecutive "offload" blocks."""
    copies, run = 0, 0
    for p in [*plan, None]:
        if p == "offload":
            run += 1
            continue
        copies += -(-run // every)
        run = 0
    return copies * s.tokens * s.hidden * s.elem


def _candidate(s: BlockShape, layers: int, every: int, gpu: float, host: float, fixed: float) -> LongPlan:
    fixed += working_bytes(s) + (every - 1) * s.tokens * s.hidden * s.elem  # a group's inputs in its backward
    plan = plan_for_budget(s, layers, gpu, fixed)
    gpu_bytes = fixed + sum(block_bytes(s, p) for p in plan)
    hbytes = host_bytes(s, plan, every)
    rerun = block_recompute_flops(dataclasses.replace(s, chunk=0), "full") * (every - 1) / every
    flops = sum(block_recompute_flops(s, p) + (rerun if p == "offload" else 0.0) for p in plan)
    if s.chunked:
        flops += layers * -(-s.tokens // s.chunk) * CHUNK_OVERHEAD_FLOPS
    return LongPlan(tuple(plan), s.chunk if s.chunked else 0, every, gpu_bytes, hbytes, flops,
                    gpu_bytes <= gpu and hbytes <= host)


def plan_long_context(s: BlockShape, layers: int, gpu_budget: float, host_budget: float | None,
                      fixed_bytes: float) -> LongPlan:
    """The plan with the least estimated recompute whose GPU and host estimates fit: over MLP chunk sizes
    (CHUNKS), host-copy strides (EVERY: the smallest whose host bytes fit) and, for each, the per-block policies
    of plan_for_budget. fixed_bytes: weights, trainable state and loss headroom (the working set is added here).
    Ties go to no chunking, then the larger chunk (fewer launches). When nothing fits, the plan that overshoots
    its budgets least (fits=False). host_budget None: unlimited."""
    host = float("inf") if not host_budget else host_budget
    best, least = None, None
    for chunk in CHUNKS:
        if chunk and chunk >= s.tokens:
            continue
        sc = dataclasses.replace(s, chunk=chunk)
        for every in [e for e in EVERY if e <= layers]:
            c = _candidate(sc, layers, every, gpu_budget, host, fixed_bytes)
            over = max(c.gpu_bytes / gpu_budget, c.host_bytes / host)
            if least is None or over < least[0]:
                least = (over, c)
            if c.host_bytes <= host:
                break  # a larger stride only adds GPU bytes and recompute
        if c.fits and (best is None or c.flops < best.flops):
            best = c
    return best or least[1]


@dataclasses.dataclass
class MemoryBudget:
    """A checkpoint_policy that plans itself: the fastest per-block plan whose estimate fits `gib` of GPU memory
    (and `host_gib` of pinned host memory), choosing the long-context mode (MLP chunks, host-copy stride) too.

    Planned at the first training forward of each micro-batch shape, when the weights and the trainable state are
    in memory: fixed bytes = what is allocated then + `loss_bytes` for the loss chunks and the optimizer's first
    step; plan_long_context adds the working set of the block being recomputed.
    """
    gib: float  # GPU budget in GiB for the whole step (torch.cuda.max_memory_allocated's measure)
    host_gib: float | None = None  # pinned host budget in GiB for offloaded block inputs; None = unlimited
    loss_bytes: int = 2**30  # headroom for the chunked lm_head / cross entropy and optimizer state
    plans: dict = dataclasses.field(default_factory=dict)  # (tokens, seq) -> LongPlan

    def plan(self, s: BlockShape, layers: int, device: torch.device, model=None) -> list[str]:
        """The per-block policies for this batch shape (planned once per shape, printed once); sets the plan's
        MLP chunk and host-copy stride on `model` (a Llama or LlamaModel) at every call, as shapes may alternate."""
        key = (s.tokens, s.seq)
        if key not in self.plans:
            allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            host = self.host_gib * 2**30 if self.host_gib else None
            p = plan_long_context(s, layers, self.gib * 2**30, host, allocated + self.loss_bytes)
            print(self._line(s, p), flush=True)
            self.plans[key] = p
        p = self.plans[key]
        if model is not None:
            set_long_context(model, p.chunk, p.every)
        return list(p.policies)

    def _line(self, s: BlockShape, p: LongPlan) -> str:
        host = f", host {p.host_bytes / 2**30:.2f} GiB" + (f" of {self.host_gib:g}" if self.host_gib else "")
        return (f"checkpointing for {s.tokens} tokens per micro-batch: {p.describe()} (estimated peak "
                f"{p.gpu_bytes / 2**30:.2f} GiB of a {self.gib:g} GiB budget{host}"
                f"{'' if p.fits else '; DOES NOT FIT: lower seq_len or raise the budgets'})")


def set_long_context(model, chunk_tokens: int = 0, every: int = 1) -> None:
    """Long-context mode on a Llama (or LlamaModel): each block's MLP in sequence chunks of `chunk_tokens` (0 =
    off: no extra op anywhere) and, under "offload", one host copy per `every` consecutive blocks."""
    if chunk_tokens < 0 or every < 1:
        raise ValueError(f"chunk_tokens must be >= 0 and every >= 1, got {chunk_tokens}, {every}")
    inner = getattr(model, "model", model)
    for layer in inner.layers:
        layer.mlp.chunk_tokens = int(chunk_tokens)
    inner.offload_every = int(every)


def describe(plan: list[str]) -> str:
    """'12 offload, 20 full' style summary of a plan, in POLICIES order."""
    return ", ".join(f"{plan.count(p)} {p}" for p in POLICIES if plan.count(p))


def apply_policy(model, policy: str, budget_gib: float | None = None, host_budget_gib: float | None = None,
                 chunk_tokens: int = 0, every: int = 1) -> str:
    """Set a Llama's activation checkpointing: `policy` (one of POLICIES) for every block with the long-context
    settings given (set_long_context), or, with budget_gib, a MemoryBudget that plans per-block policies and the
    long-context settings at the first step (host_budget_gib bounds its offloaded bytes). Returns one line."""
    if budget_gib:
        if not budget_gib > 0 or (host_budget_gib is not None and host_budget_gib < 0):
            raise ValueError(f"memory budgets must be > 0 GiB, got {budget_gib}, host {host_budget_gib}")
        model.model.checkpoint_policy = MemoryBudget(float(budget_gib), host_budget_gib or None)
        return f"checkpointing: planned per block for a {budget_gib:g} GiB GPU budget at the first step"
    if policy not in POLICIES:
        raise ValueError(f"checkpoint_policy must be one of {POLICIES}, got {policy!r}")
    model.model.checkpoint_policy = policy
    set_long_context(model, chunk_tokens, every)
    extra = (f", MLP in chunks of {chunk_tokens} tokens" if chunk_tokens else "") + (
        f", one host copy per {every} blocks" if every > 1 and policy == "offload" else "")
    return f"checkpointing: {policy} for all {len(model.model.layers)} blocks{extra}"
