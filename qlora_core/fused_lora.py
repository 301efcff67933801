"""LoRA inside the frozen linear: one autograd Function for the projections that read the same input.

For members i of a group (q/k/v of an attention block, gate/up of an MLP, or a single o/down projection):

    y = x @ [W_0; W_1; ...]^T + [b_0; b_1; ...] + [s_i * dropout_i(x) @ A_i^T @ B_i^T]_i     (M, N_0 + N_1 + ...)

Why one Function instead of one LoRALinear call per projection: the frozen weights are dequantized into row ranges
of ONE buffer and multiplied by ONE GEMM (N = 6144 for 8B q/k/v instead of 4096 + 1024 + 1024), the LoRA
down-projections of all members are one GEMM against the stacked A's (M, sum r), and their up-projections go into
the base result by one `addmm_` against a block-diagonal, pre-scaled B. Everything runs in the compute dtype (the
autocast dtype, or x's), with the bf16/fp16 copies of A and B made once per optimizer step (they are cached on
the parameters' `_version`), not cast on every call. Backward rebuilds W from the packed weights (never saved) and
does dx = dy @ W + ((dy @ sB) @ A), dA = (dy @ sB)^T @ x, dB_i = s_i * dy_i^T @ h_i from the saved x and
h = x @ A^T (M, sum r). It is two Functions, the LoRA down-projection (which saves x) and then the base GEMM with
the up-projection (which saves nothing): when the group is the last op of a checkpointed block (down_proj), the
recompute in backward stops once x is saved again and skips that GEMM (torch.utils.checkpoint's early stop). Dropout (per member, as PEFT draws an independent mask per LoRA layer) is regenerated in
backward from a seed drawn from the global CPU generator, so activation checkpointing (which restores the RNG
state for its recompute) sees the same masks and no mask is stored.

Semantics are PEFT's lora.Linear (qlora_core/lora.py LoRALinear): the base sees x unchanged, the scaling is
alpha / r (or alpha / sqrt(r)). Numerics differ from LoRALinear's fp32-adapter path only by rounding: the LoRA
matmuls run in the compute dtype (as they do under autocast in PEFT). Grads of A and B come back in their own dtype.
Members that are merged LoRA layers or plain linears join the group with no adapter.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import backend
from .lora import LoRALinear, is_quantized_linear
from .quant import QuantizedTensor, dequantize_into  # noqa: F401 (dequantize_into: re-exported)


@dataclasses.dataclass(eq=False)
class Member:
    """One projection of a group: its frozen base (packed or dense weight, bias) and its adapter, if any."""
    weight: QuantizedTensor | torch.Tensor  # (N_i, K)
    bias: torch.Tensor | None               # (N_i,) or None
    lora: LoRALinear | None                 # unmerged adapter, or None
    out_features: int                       # N_i


def member_of(module: nn.Module) -> Member | None:
    """Member for a frozen nn.Linear, a quantized linear or a LoRALinear over one of them; None for anything else
    (a base with a trainable weight or bias keeps its own module path, which produces those grads)."""
    lora = None
    if isinstance(module, LoRALinear):
        lora = None if module.merged else module
        module = module.base_layer
    if not (isinstance(module, nn.Linear) or is_quantized_linear(module)):
        return None
    if any(p.requires_grad for p in module.parameters()):
        return None
    w = module.weight
    if isinstance(w, torch.Tensor) and w.dim() != 2:
        return None
    return Member(weight=w if isinstance(w, QuantizedTensor) else w.detach(), bias=getattr(module, "bias", None),
                  lora=lora, out_features=int(w.shape[0]))


class LinearGroup:
    """Projections sharing an input, concatenated along N (see the module docstring). Build with `from_modules`."""

    def __init__(self, members: list[Member]):
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.in_features = int(members[0].weight.shape[1])
        self.adapted = [i for i, m in enumerate(members) if m.lora is not None]
        self._lora_cache: tuple | None = None

    @classmethod
    def from_modules(cls, modules) -> "LinearGroup | None":
        """The group of `modules` (same in_features), or None when any of them cannot join."""
        members = [member_of(m) for m in modules]
        if any(m is None for m in members) or len({int(m.weight.shape[1]) for m in members}) != 1:
            return None
        return cls(members)

    def lora_params(self) -> list[torch.Parameter]:
        """A_0, B_0, A_1, B_1, ... of the adapted members."""
        return [p for i in self.adapted for p in (self.members[i].lora.lora_A, self.members[i].lora.lora_B)]

    def a_params(self) -> list[torch.Parameter]:
        """The adapted members' A (r_i, K), in member order."""
        return [self.members[i].lora.lora_A for i in self.adapted]

    def b_params(self) -> list[torch.Parameter]:
        """The adapted members' B (N_i, r_i), in member order."""
        return [self.members[i].lora.lora_B for i in self.adapted]

    def dropouts(self) -> list[float]:
        """Each adapted member's dropout probability as it applies now (0.0 for a module in eval mode)."""
        return [m.lora.dropout if m.lora.training else 0.0 for m in (self.members[i] for i in self.adapted)]

    # -- the frozen weight -------------------------------------------------------------------------
    def weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """All members' weights dequantized (or cast) into one (N, K) buffer of `dtype`; a fresh buffer per call."""
        w = torch.empty(sum(self.sizes), self.in_features, dtype=dtype, device=device)
        row = 0
        for m, n in zip(self.members, self.sizes):
            dequantize_into(m.weight, w[row:row + n]) if isinstance(m.weight, QuantizedTensor) else \
                w[row:row + n].copy_(m.weight)
            row += n
        return w

    def bias(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The members' biases concatenated (N,) in `dtype` (zeros for members without one), or None if none has."""
        if all(m.bias is None for m in self.members):
            return None
        return torch.cat([torch.zeros(n, dtype=dtype, device=device) if m.bias is None else m.bias.detach().to(dtype)
                          for m, n in zip(self.members, self.sizes)])

    # -- the adapters, in the compute dtype --------------------------------------------------------
    def lora_compute(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[float], list[int]]:
        """(A (R, K), sB (N, R), scalings, ranks) in `dtype`: A stacked over members, sB block-diagonal with each
        member's B times its scaling. Rebuilt only when an A or B changed (their `_version`) or dtype differs;
        under torch.compile always rebuilt (the graph cannot hold a Python-side cache; the copies are small)."""
        if backend.compiling():
            return self._lora_build(dtype)
        params = self.lora_params()
        key = (dtype, *((id(p), p._version) for p in params))
        if self._lora_cache is None or self._lora_cache[0] != key:
            self._lora_cache = (key, *self._lora_build(dtype))
        return self._lora_cache[1:]

    def _lora_build(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[float], list[int]]:
        loras = [self.members[i].lora for i in self.adapted]
        ranks = [m.r for m in loras]
        scalings = [m.scaling for m in loras]
        with torch.no_grad():
            a = torch.cat([m.lora_A.to(dtype) for m in loras])  # (R, K)
            sb = torch.zeros(sum(self.sizes), sum(ranks), dtype=dtype, device=a.device)  # (N, R)
            rows, col = _row_starts(self.sizes), 0
            for i, m in zip(self.adapted, loras):
                sb[rows[i]:rows[i] + self.sizes[i], col:col + m.r] = m.lora_B * m.scaling
                col += m.r
        return a, sb, scalings, ranks


def _row_starts(sizes: list[int]) -> list[int]:
    starts, row = [], 0
    for n in sizes:
        starts.append(row)
        row += n
    return starts


def dropout_masks(seed: int, ps: list[float], shape, device) -> list[torch.Tensor | None]:
    """One keep-mask (bool, `shape`) per probability in ps (None where p is 0), regenerated identically from seed.

    Member j's mask is drawn j-th from one generator, so a test can rebuild exactly what the Function used.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.rand(shape, generator=g, device=device) >= p if p > 0 else None for p in ps]


def _dropped(t: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """Inverted dropout with a given keep-mask: t * keep / (1 - p); t itself when there is no mask."""
    return t if keep is None else t * keep / (1 - p)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class LoraDownFunction(torch.autograd.Function):
    """h = dropout_i(x) @ A_i^T for every adapted member, side by side (M, R); saves x (and a dropout seed)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, group: LinearGroup, *a_params: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) in the compute dtype -> h (M, R); a_params are the members' A (for their grads)."""
        a, _, _, ranks = group.lora_compute(x2.dtype)
        ps = group.dropouts()
        seed, kept = None, []
        with torch.autocast(x2.device.type, enabled=False):
            if any(ps):
                if backend.compiling():
                    # A host seed (.item()) would break the graph: draw the masks in it from the global RNG and
                    # save them for backward instead (bool (M, K) per member, only under torch.compile).
                    masks = [torch.rand(x2.shape, device=x2.device) >= p if p > 0 else None for p in ps]
                    kept = [mk for mk in masks if mk is not None]
                else:
                    seed = int(torch.randint(0, 2**62, (1,)).item())
                    masks = dropout_masks(seed, ps, x2.shape, x2.device)
                h = torch.cat([_dropped(x2, mk, p) @ ai.T for mk, p, ai in zip(masks, ps, a.split(ranks))], dim=1)
            else:
                h = x2 @ a.T
        ctx.save_for_backward(x2, *kept)
        ctx.group, ctx.seed, ctx.ps = group, seed, ps
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        """dh (M, R) -> dx2 (M, K), None, dA_i in each A's dtype."""
        x2, *kept = ctx.saved_tensors
        group: LinearGroup = ctx.group
        a, _, _, ranks = group.lora_compute(x2.dtype)
        dh = dh.to(x2.dtype)
        with torch.autocast(x2.device.type, enabled=False):
            if not any(ctx.ps):
                dx = dh @ a if ctx.needs_input_grad[0] else None
                da = (dh.T @ x2).split(ranks)
            else:
                if ctx.seed is not None:
                    masks = dropout_masks(ctx.seed, ctx.ps, x2.shape, x2.device)
                else:  # saved under torch.compile
                    it = iter(kept)
                    masks = [next(it) if p > 0 else None for p in ctx.ps]
                dx, da = None, []
                for mk, p, gi, ai in zip(masks, ctx.ps, dh.split(ranks, dim=1), a.split(ranks)):
                    if ctx.needs_input_grad[0]:
                        part = _dropped(gi @ ai, mk, p)
                        dx = part if dx is None else dx.add_(part)
                    da.append(gi.T @ _dropped(x2, mk, p))
        loras = [group.members[i].lora for i in group.adapted]
        return (dx, None, *(g.to(m.lora_A.dtype) for g, m in zip(da, loras)))


class BaseUpFunction(torch.autograd.Function):
    """y = x @ W^T + b + h @ sB^T (sB: block-diagonal scaled B's). Saves nothing through save_for_backward, so a
    checkpointed block's recompute stops before this GEMM when it is the block's last (early stop): W is rebuilt
    from the packed weights in backward, and the small h (M, R) rides on ctx."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, h: torch.Tensor | None, lead: tuple, group: LinearGroup,
                *b_params: torch.Tensor) -> torch.Tensor:
        """x2 (M, K), h (M, R) or None -> y (*lead, N) in x2's dtype (a fresh tensor, not a view, so RoPE can
        rotate it in place)."""
        dtype = x2.dtype
        with torch.autocast(x2.device.type, enabled=False):
            w = group.weight(dtype, x2.device)
            y = torch.empty(*lead, w.shape[0], dtype=dtype, device=x2.device)
            y2 = y.view(-1, w.shape[0])  # (M, N)
            bias = group.bias(dtype, x2.device)
            if bias is None:
                torch.mm(x2, w.T, out=y2)
            else:
                torch.addmm(bias, x2, w.T, out=y2)
            del w
            if h is not None:
                y2.addmm_(h, group.lora_compute(dtype)[1].T)
        ctx.h = None if h is None else h.detach()
        ctx.group, ctx.dtype = group, dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        """dy (*lead, N) -> dx2 (M, K), dh (M, R), None, None, dB_i in each B's dtype."""
        group: LinearGroup = ctx.group
        dy2 = dy.reshape(-1, dy.shape[-1]).to(ctx.dtype)
        dx = dh = None
        grads = []
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                w = group.weight(ctx.dtype, dy.device)
                dx = dy2 @ w  # (M, K)
                del w
            if ctx.h is not None:
                _, sb, scalings, ranks = group.lora_compute(ctx.dtype)
                dh = dy2 @ sb  # (M, R): dy through each scaled B
                rows = _row_starts(group.sizes)
                for j, (i, hj) in enumerate(zip(group.adapted, ctx.h.split(ranks, dim=1))):
                    dyi = dy2[:, rows[i]:rows[i] + group.sizes[i]]
                    grads.append(((dyi.T @ hj) * scalings[j]).to(group.members[i].lora.lora_B.dtype))
        return (dx, dh, None, None, *grads)


def group_linear(x: torch.Tensor, group: LinearGroup) -> torch.Tensor:
    """x (..., K) -> (..., sum N_i): every member's output side by side, in the compute dtype (autocast's or x's).

    Differentiable in x and in the adapters' A and B; the frozen weights get no grad. Two Functions: the LoRA
    down-projection (saves x) first, then the base GEMM plus the LoRA up-projection (saves nothing).
    """
    x2 = x.reshape(-1, x.shape[-1]).to(_compute_dtype(x))  # (M, K)
    h = LoraDownFunction.apply(x2, group, *group.a_params()) if group.adapted else None
    return BaseUpFunction.apply(x2, h, tuple(x.shape[:-1]), group, *group.b_params())


def project(x: torch.Tensor, modules, owner: nn.Module) -> torch.Tensor:
    """The outputs of `modules` for input x side by side, (..., sum N_i): through one group_linear where they can be
    grouped and x has more than a few rows (the decode kernels serve M <= 16 per module), else module by module.

    The LinearGroup is cached on `owner` and rebuilt when a module was swapped or merged; `owner.fuse_projections =
    False` turns grouping off (the module-by-module reference path). Under torch.compile it is built afresh in
    the trace instead (no cache: writing one from inside a checkpointed block is a side effect Dynamo refuses).
    """
    rows = x.numel() // max(1, x.shape[-1])
    group = None
    if not getattr(owner, "fuse_projections", True) or not (rows > 16 or torch.is_grad_enabled()):
        pass
    elif backend.compiling():
        group = LinearGroup.from_modules(modules)
    else:
        key = tuple((id(m), getattr(m, "merged", None)) for m in modules)
        cache = owner.__dict__.setdefault("_linear_groups", {})
        if key not in cache:
            if len(cache) >= 8:  # modules were swapped or merged since: drop the stale groups
                cache.clear()
            cache[key] = LinearGroup.from_modules(modules)
        group = cache[key]
    if group is None:
        outs = [m(x) for m in modules]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return group_linear(x, group)
