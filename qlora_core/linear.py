"""`nf4_linear(x, q, bias)`: y = x @ dequantize(q).T + bias with a frozen 4-bit weight, differentiable in x and bias.

Design: one autograd.Function. Forward and backward each dequantize the packed weight on the fly (inside the
Triton kernels on CUDA, through the PyTorch reference on CPU) and drop it again; the Function saves only the
QuantizedTensor's own tensors (packed codes, 8-bit or fp32 absmax, nested absmax, offset), about 0.53 bytes
per weight for NF4 + double quant against 2 bytes for a bf16 copy. Backward recomputes dx = dy @ W from the
packed weight and returns None for the weight: QLoRA never trains it.

Which implementation runs is decided by `backend.choose(x.device)`; the Triton launchers and their dispatch by
M and shape live in `kernels/nf4_linear.py` (imported lazily, so this module imports without triton).
The dequantized weight is materialized in x's dtype: dtype(lut[code] * absmax) with the fp32 product, exactly
`dequantize(q)` when x.dtype == q.dtype (the usual case); otherwise the same fp32 product rounded once to
x.dtype (never rounded twice through q.dtype).
Under torch.compile `nf4_linear` calls the custom op `qlora_core::nf4_linear` (registered at the end of this file,
with a fake implementation and its backward) instead of the Function; docs/backends.md has the details.
"""
from __future__ import annotations

import torch

from . import backend, reference
from .errors import UsageError
from .quant import QuantizedTensor, q_args, q_from_args

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NF4LinearInputError(UsageError, ValueError):
    """Shapes or dtypes that nf4_linear cannot combine (the message names the argument and the mismatch)."""


def dequantize_as(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """Reference dequantization of q into `dtype` (N, K): dtype(lut[code] * absmax_fp32), one rounding."""
    return reference.dequantize_4bit_ref(q.data, q.absmax_fp32(), q.shape, dtype, q.blocksize, q.quant_type)


def _check(x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None) -> None:
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"nf4_linear: q must be a QuantizedTensor, got {type(q).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"nf4_linear: x must be a torch.Tensor, got {type(x).__name__}")
    if len(q.shape) != 2:
        raise NF4LinearInputError(f"nf4_linear: q must be 2-D (N, K), got shape {tuple(q.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
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


def _forward(x2: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(M, K) -> (M, N) in x2's dtype."""
    if backend.choose(x2.device, x2.dtype) == "triton":
        from .kernels import nf4_linear as k
        return k.linear_forward(x2, q, bias)
    return torch.nn.functional.linear(x2, dequantize_as(q, x2.dtype), bias)


def _input_grad(dy2: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """dx = dy @ W: (M, N) -> (M, K) in dy2's dtype."""
    if backend.choose(dy2.device, dy2.dtype) == "triton":
        from .kernels import nf4_linear as k
        return k.linear_input_grad(dy2, q)
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


# -- torch.library custom ops: what torch.compile sees (docs/backends.md, "torch.compile: the custom ops") -----
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
