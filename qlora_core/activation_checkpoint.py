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
A plan is one policy per block. `plan_for_budget` picks, greedily by time saved per byte, the fastest plan (of
offload, full and none) whose estimated peak fits the budget; the estimates are simple byte counts of what each
policy keeps (see `block_bytes`), not measurements. `apply_policy` sets a Llama's policy (or budget) in one call.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

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

    D2H copies run on a side stream after the block's input is ready; fetching block i also starts the copy back
    of block i-1 on the side stream, so each block's backward overlaps the next one's transfer. Pinned buffers are
    reused across passes (one pool per process, keyed by shape and dtype).
    """
    _pool: dict = {}
    _streams: dict = {}

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = self._streams.setdefault(device, torch.cuda.Stream(device)) if self.cuda else None
        self.slots: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # (host copy, D2H done)
        self.fetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}  # slot -> (device copy, H2D done)

    def put(self, x: torch.Tensor) -> int:
        """Start copying x to pinned memory; returns its slot."""
        if not self.cuda:
            self.slots.append((x.detach().clone(), None))
            return len(self.slots) - 1
        key = (tuple(x.shape), x.dtype)
        free = self._pool.setdefault(key, [])
        host = free.pop() if free else torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self.stream):
            host.copy_(x, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        x.record_stream(self.stream)  # x's memory is not reused before the copy has read it
        self.slots.append((host, done))
        return len(self.slots) - 1

    def _start_fetch(self, slot: int, device: torch.device) -> None:
        if slot < 0 or slot in self.fetched:
            return
        host, d2h = self.slots[slot]
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(d2h)
            x = torch.empty(host.shape, dtype=host.dtype, device=device)
            x.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self.fetched[slot] = (x, done)

    def get(self, slot: int, device: torch.device) -> torch.Tensor:
        """The device copy of `slot` (waited for on the current stream); prefetches slot - 1 and frees this slot's
        host buffer for reuse."""
        if not self.cuda:
            return self.slots[slot][0]
        self._start_fetch(slot, device)
        x, done = self.fetched.pop(slot)
        cur = torch.cuda.current_stream(device)
        cur.wait_event(done)
        x.record_stream(cur)
        self._start_fetch(slot - 1, device)
        host, _ = self.slots[slot]
        self._pool[(tuple(host.shape), host.dtype)].append(host)  # the H2D above completed before `done`
        return x


# Passed to OffloadedBlock so its output requires grad even when x does not (the first block's input comes from a
# frozen embedding): the trainable parameters inside the block are not inputs of the Function.
_GRAD_ANCHOR = torch.empty(0, requires_grad=True)


class OffloadedBlock(torch.autograd.Function):
    """y = block(x, *args) keeping x only in pinned host memory; backward re-runs the block on the fetched x."""

    @staticmethod
    def forward(ctx, block, offload: HostOffload, anchor: torch.Tensor, x: torch.Tensor, *args):
        """x (B, T, d) CUDA -> block output; args are the block's non-differentiable inputs (cos, sin, mask)."""
        dev = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        ctx.block, ctx.offload, ctx.args, ctx.device = block, offload, args, x.device
        ctx.slot = offload.put(x)
        with torch.no_grad():
            return block(x, *args)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        """Fetch x, recompute the block with grad under the forward's autocast and RNG state, backpropagate dy."""
        x = ctx.offload.get(ctx.slot, ctx.device).detach().requires_grad_(ctx.needs_input_grad[3])
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=[ctx.device] if ctx.rng[1] is not None else []):
            torch.set_rng_state(ctx.rng[0])
            if ctx.rng[1] is not None:
                torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
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
    # none: norm inputs/outputs, q/k/v, attention out + lse, o input, gate/up out, SwiGLU out
    qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
    return s.tokens * s.elem * (4 * s.hidden + qkv + 2 * s.heads * s.head_dim + 3 * s.intermediate) + attn


def block_recompute_flops(s: BlockShape, policy: str) -> float:
    """FLOPs of the forward recompute a block's backward does under `policy` (0 for "none")."""
    if policy == "none":
        return 0.0
    d, qkv = s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim
    linear = 2.0 * s.tokens * (d * qkv + s.heads * s.head_dim * d + 3 * d * s.intermediate)
    attention = 2.0 * s.tokens * s.seq * s.heads * s.head_dim  # causal: half of 4*T^2*H*D per row of B
    return linear + (0.0 if policy == "save_attn" else attention)


def plan_for_budget(s: BlockShape, layers: int, budget_bytes: float, fixed_bytes: float) -> list[str]:
    """The plan (one policy per block) with the least recompute whose estimate fits: fixed_bytes (weights,
    optimizer, one block's working set) + sum of block_bytes <= budget_bytes. Starts from "offload" everywhere and
    upgrades blocks greedily by FLOPs saved per byte spent; all "offload" when even that does not fit."""
    plan = ["offload"] * layers
    used = fixed_bytes
    # save_attn is left out: measured slower than full on an H200 (docs/benchmarks.md), its dispatch mode costs
    # more host time than the attention forward it saves
    order = ["offload", "full", "none"]
    while True:
        best = None
        for i, p in enumerate(plan):
            for q in order[order.index(p) + 1:]:
                extra = block_bytes(s, q) - block_bytes(s, p)
                gain = block_recompute_flops(s, p) - block_recompute_flops(s, q) + (1.0 if p == "offload" else 0.0)
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


@dataclasses.dataclass
class MemoryBudget:
    """A checkpoint_policy that plans itself: the fastest per-block plan whose estimate fits `gib` of GPU memory.

    Planned at the first training forward of each micro-batch shape, when the weights and the trainable state are
    in memory: fixed bytes = what is allocated then + a working set (two blocks' worth of activations for the
    block being recomputed and its grads, plus `loss_bytes` for the loss chunks and the optimizer's first step).
    """
    gib: float  # GPU budget in GiB for the whole step (torch.cuda.max_memory_allocated's measure)
    loss_bytes: int = 2**30  # headroom for the chunked lm_head / cross entropy and optimizer state
    plans: dict = dataclasses.field(default_factory=dict)  # (tokens, seq) -> plan

    def plan(self, s: BlockShape, layers: int, device: torch.device) -> list[str]:
        """The plan for this batch shape (computed once per shape, printed once)."""
        key = (s.tokens, s.seq)
        if key not in self.plans:
            allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            fixed = allocated + 2 * block_bytes(s, "none") + self.loss_bytes
            plan = plan_for_budget(s, layers, self.gib * 2**30, fixed)
            est = fixed + sum(block_bytes(s, p) for p in plan)
            print(f"checkpointing for {s.tokens} tokens per micro-batch: {describe(plan)} "
                  f"(estimated peak {est / 2**30:.2f} GiB of a {self.gib:g} GiB budget)", flush=True)
            self.plans[key] = plan
        return self.plans[key]


def describe(plan: list[str]) -> str:
    """'12 offload, 20 full' style summary of a plan, in POLICIES order."""
    return ", ".join(f"{plan.count(p)} {p}" for p in POLICIES if plan.count(p))


def apply_policy(model, policy: str, budget_gib: float | None = None) -> str:
    """Set a Llama's activation checkpointing: `policy` (one of POLICIES) for every block, or, with budget_gib, a
    MemoryBudget that plans per-block policies at the first step. Returns a one-line description."""
    if budget_gib:
        if not budget_gib > 0:
            raise ValueError(f"memory budget must be > 0 GiB, got {budget_gib}")
        model.model.checkpoint_policy = MemoryBudget(float(budget_gib))
        return f"checkpointing: planned per block for a {budget_gib:g} GiB GPU budget at the first step"
    if policy not in POLICIES:
        raise ValueError(f"checkpoint_policy must be one of {POLICIES}, got {policy!r}")
    model.model.checkpoint_policy = policy
    return f"checkpointing: {policy} for all {len(model.model.layers)} blocks"
