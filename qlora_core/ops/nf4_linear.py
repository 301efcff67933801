"""The nf4_linear op: y = x @ dequantize(q).T + bias with frozen 4-bit weights, in two paths side by side.

Which path runs:
  * Training our Llama (llama.py) takes the GROUPED path, `group_linear` (unless TrainConfig.fused is off): its
    blocks call `lora.project`, which gathers the projections that read the same input (q/k/v, gate/up, or a single
    o / down projection) into one `LinearGroup` whenever grad is on or x has more than 16 rows. Its frozen weights
    are dequantized into one buffer (kernels/quant4.dequantize_4bit on CUDA) and multiplied by one cuBLAS GEMM, with
    the LoRA down/up GEMMs beside.
  * Everything else goes module by module through the GENERIC path, `nf4_linear` (QuantLinear.forward; a
    LoRALinear adds its adapter on top): decode (<= 16 rows without grad), `fuse_projections = False`, modules that
    cannot join a group, and models other than ours (`quantize_model` + `apply_lora`), training included. On CUDA
    its Triton backend dispatches by M (kernels/nf4_linear.py): register-decode kernels for M <= 16, the tiled
    input-gradient kernel for small M with K >= 2N, dequantize + cuBLAS everywhere else.
Both paths save only the packed weight for backward and dequantize it again there; neither gives the weight a grad.

The grouped path. For members i of a group:

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
recompute in backward stops once x is saved again and skips that GEMM (torch.utils.checkpoint's early stop).
Dropout (per member, as PEFT draws an independent mask per LoRA layer) is regenerated in backward from a seed drawn
from the global CPU generator, so activation checkpointing (which restores the RNG state for its recompute) sees
the same masks and no mask is stored. Semantics are PEFT's lora.Linear (lora.LoRALinear): the base sees x
unchanged, the scaling is alpha / r (or alpha / sqrt(r)). Numerics differ from LoRALinear's fp32-adapter path only
by rounding: the LoRA matmuls run in the compute dtype (as they do under autocast in PEFT). Grads of A and B come
back in their own dtype. Members that are merged LoRA layers or plain linears join the group with no adapter.

The generic path. One autograd.Function; forward and backward each dequantize the packed weight on the fly (inside
the Triton kernels on CUDA, through the PyTorch reference on CPU) and drop it again; the Function saves only the
QuantizedTensor's own tensors (packed codes, 8-bit or fp32 absmax, nested absmax, offset), about 0.53 bytes per
weight for NF4 + double quant against 2 bytes for a bf16 copy. `backend.choose(x.device)` picks the reference or
the Triton launchers (imported lazily, so this module imports without triton), which are passed the format's tables
(`kernel_tables`). The dequantized weight is materialized in x's dtype: dtype(lut[code] * absmax) with the fp32
product, exactly `dequantize(q)` when x.dtype == q.dtype (the usual case); otherwise the same fp32 product rounded
once to x.dtype (never rounded twice through q.dtype). Under torch.compile `nf4_linear` calls the custom op
`qlora_core::nf4_linear` (registered at the end of this file, with a fake implementation and its backward) instead
of the Function; docs/backends.md has the details.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from .. import backend
from ..defaults import FLOAT_DTYPES
from ..errors import UsageError
from ..formats import code_table, dequant_table, dynamic_map
from .quant4 import QuantizedTensor, dequantize_as, dequantize_into, q_args, q_from_args


# -- the grouped path (training) ---------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class Member:
    """One projection of a group: its frozen base (packed or dense weight, bias) and its adapter, if any."""
    weight: QuantizedTensor | torch.Tensor  # (N_i, K)
    bias: torch.Tensor | None               # (N_i,) or None
    lora: nn.Module | None                  # unmerged lora.LoRALinear, or None
    out_features: int                       # N_i


class LinearGroup:
    """Projections sharing an input, concatenated along N (see the module docstring); lora.linear_group builds one
    from modules."""

    def __init__(self, members: list[Member]):
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.in_features = int(members[0].weight.shape[1])
        self.adapted = [i for i, m in enumerate(members) if m.lora is not None]
        self._lora_cache: tuple | None = None

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


# -- the generic path: one projection (decode, modules outside a group, other models) ----------------------------------
class NF4LinearInputError(UsageError, ValueError):
    """Shapes or dtypes that nf4_linear cannot combine (the message names the argument and the mismatch)."""


def _check(x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None) -> None:
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"nf4_linear: q must be a QuantizedTensor, got {type(q).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"nf4_linear: x must be a torch.Tensor, got {type(x).__name__}")
    if len(q.shape) != 2:
        raise NF4LinearInputError(f"nf4_linear: q must be 2-D (N, K), got shape {tuple(q.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise NF4LinearInputError(f"nf4_linear: x dtype {x.dtype} unsupported; use float32, float16 or bfloat16")
    if x.dim() < 1 or x.shape[-1] != q.shape[1]:
        raise NF4LinearInputError(
            f"nf4_linear: x last dim must equal K={q.shape[1]} (q.shape={tuple(q.shape)}), got x.shape={tuple(x.shape)}")
    if x.device != q.device:
        raise NF4LinearInputError(f"nf4_linear: x is on {x.device} but q is on {q.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"nf4_linear: bias must be a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (q.shape[0],):
            raise NF4LinearInputError(f"nf4_linear: bias must have shape (N,)=({q.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise NF4LinearInputError(f"nf4_linear: bias dtype {bias.dtype} must match x dtype {x.dtype}")
        if bias.device != x.device:
            raise NF4LinearInputError(f"nf4_linear: bias is on {bias.device} but x is on {x.device}")


def kernel_tables(q: QuantizedTensor):
    """The format's tables for q's quant type on q's device as the Triton kernels take them
    (kernels/nf4_decode.Tables), built once per (quant type, device)."""
    return _kernel_tables(q.quant_type, str(q.device))


@functools.lru_cache(maxsize=None)
def _kernel_tables(quant_type: str, device: str):
    from ..kernels import nf4_decode
    return nf4_decode.tables(code_table(quant_type), dequant_table(quant_type), dynamic_map(True), device)


def _forward(x2: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(M, K) -> (M, N) in x2's dtype."""
    if backend.choose(x2.device, x2.dtype) == "triton":
        from ..kernels import nf4_linear as k
        return k.linear_forward(x2, q, kernel_tables(q), bias)
    return torch.nn.functional.linear(x2, dequantize_as(q, x2.dtype), bias)


def _input_grad(dy2: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """dx = dy @ W: (M, N) -> (M, K) in dy2's dtype."""
    if backend.choose(dy2.device, dy2.dtype) == "triton":
        from ..kernels import nf4_linear as k
        return k.linear_input_grad(dy2, q, kernel_tables(q))
    return dy2 @ dequantize_as(q, dy2.dtype)


def _q_tensors(q: QuantizedTensor) -> list[torch.Tensor]:
    return [t for t in (q.data, q.absmax, q.nested_absmax, q.offset) if t is not None]


class NF4LinearFunction(torch.autograd.Function):
    """Frozen 4-bit weight: saves the packed state only, recomputes W in backward, weight grad is None."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None):
        """x (..., K) fp32/fp16/bf16, q (N, K), bias (N,) or None -> (..., N) in x's dtype.

        No validation here (nf4_linear does it). Saves only q's packed tensors (codes, absmax, nested absmax, offset),
        never the dequantized weight.
        """
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
        y = _forward(x2, q, bias)  # (M, N)
        # Only the packed codes / absmax go through save_for_backward (hooks and checkpointing see them);
        # the dataclass's metadata rides on ctx and is re-attached to the saved tensors in backward.
        ctx.save_for_backward(*_q_tensors(q))
        ctx.q_meta = q
        ctx.has_bias = bias is not None
        ctx.lead = lead
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        """dy (..., N) -> (dx (..., K), None, dbias (N,)), each in dy's dtype or None when not needed.

        Rebuilds q from the saved tensors and dequantizes it again for dx = dy @ W; dbias sums dy over rows in fp32.
        """
        saved = list(ctx.saved_tensors)
        meta: QuantizedTensor = ctx.q_meta
        data, absmax = saved[0], saved[1]
        nested, offset = (saved[2], saved[3]) if meta.double_quant else (None, None)
        q = QuantizedTensor(data=data, absmax=absmax, shape=meta.shape, dtype=meta.dtype, blocksize=meta.blocksize,
                            quant_type=meta.quant_type, double_quant=meta.double_quant,
                            nested_absmax=nested, offset=offset)
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()  # (M, N)
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = _input_grad(dy2, q).reshape(*ctx.lead, q.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy2.sum(dim=0, dtype=torch.float32).to(dy.dtype)
        return dx, None, dbias


def nf4_linear(x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(q).T + bias.

    x: (..., K) float32 / float16 / bfloat16; q: QuantizedTensor of shape (N, K) (nf4 or fp4, double quant or
    not) on x's device; bias: (N,) in x's dtype or None. Returns (..., N) in x's dtype. Differentiable in x and
    bias; the weight is frozen (no grad). Raises NF4LinearInputError / TypeError naming the bad argument.
    """
    _check(x, q, bias)
    if backend.compiling():
        return torch.ops.qlora_core.nf4_linear(x, *q_args(q), bias)
    return NF4LinearFunction.apply(x, q, bias)


# -- torch.library custom ops: what torch.compile sees (docs/backends.md, "torch.compile: the custom ops") -------------
# nf4_linear's forward and its input grad, taking the QuantizedTensor as q_args(q). The op's backward
# (register_autograd) calls nf4_linear_input_grad, itself an op, so AOTAutograd traces backward into a graph too.
_T = torch.Tensor
_OptT = torch.Tensor | None


@torch.library.custom_op("qlora_core::nf4_linear", mutates_args=())
def _nf4_linear_op(x: _T, data: _T, absmax: _T, nested_absmax: _OptT, offset: _OptT, shape: list[int],
                   dtype: torch.dtype, blocksize: int, quant_type: str, double_quant: bool, bias: _OptT) -> _T:
    q = q_from_args(data, absmax, nested_absmax, offset, shape, dtype, blocksize, quant_type, double_quant)
    y = _forward(x.reshape(-1, x.shape[-1]).contiguous(), q, bias)  # (M, N)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@_nf4_linear_op.register_fake
def _(x, data, absmax, nested_absmax, offset, shape, dtype, blocksize, quant_type, double_quant, bias):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.custom_op("qlora_core::nf4_linear_input_grad", mutates_args=())
def _input_grad_op(dy: _T, data: _T, absmax: _T, nested_absmax: _OptT, offset: _OptT, shape: list[int],
                   dtype: torch.dtype, blocksize: int, quant_type: str, double_quant: bool) -> _T:
    q = q_from_args(data, absmax, nested_absmax, offset, shape, dtype, blocksize, quant_type, double_quant)
    dx = _input_grad(dy.reshape(-1, dy.shape[-1]).contiguous(), q)  # (M, K)
    return dx.reshape(*dy.shape[:-1], shape[1])


@_input_grad_op.register_fake
def _(dy, data, absmax, nested_absmax, offset, shape, dtype, blocksize, quant_type, double_quant):
    return dy.new_empty((*dy.shape[:-1], shape[1]))


def _setup_context(ctx, inputs, output):
    x, *qa, bias = inputs
    data, absmax, nested_absmax, offset = qa[:4]
    ctx.save_for_backward(data, absmax, nested_absmax, offset)  # the packed state only, never W
    ctx.q_meta = qa[4:]
    ctx.has_bias = bias is not None


def _nf4_linear_backward(ctx, dy):
    data, absmax, nested_absmax, offset = ctx.saved_tensors
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.qlora_core.nf4_linear_input_grad(dy, data, absmax, nested_absmax, offset, *ctx.q_meta)
    if ctx.has_bias and ctx.needs_input_grad[-1]:
        dbias = dy.reshape(-1, dy.shape[-1]).sum(dim=0, dtype=torch.float32).to(dy.dtype)
    return (dx, *([None] * 9), dbias)


_nf4_linear_op.register_autograd(_nf4_linear_backward, setup_context=_setup_context)
