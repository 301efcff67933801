"""The rmsnorm op: `rms_norm(x, weight, eps)`, llama.py's RMSNorm, with its spec, autograd and custom op.

Semantics are those of transformers' LlamaRMSNorm: the mean square, rstd and the normalized row in fp32, that row
rounded to x's dtype, then multiplied by the weight in PyTorch's promotion of (x.dtype, weight.dtype), which is
also the output dtype (bf16 x with an fp32 weight gives fp32). `rms_norm_ref` below is that spec.
With `unit_offset=True` they are those of transformers' Gemma3RMSNorm instead: the weight is stored centred on 0,
the normalized row is multiplied by (1 + weight) in fp32 and only the product is rounded, to x's dtype.

Dispatch: `rms_norm` asks `backend.choose`. "reference" runs `rms_norm_ref`, plain PyTorch under autograd, which
torch.compile traces as it is. "triton" runs kernels/rmsnorm.py's launchers: eagerly through `RMSNormFunction`
(it saves x and the per-row rstd, recomputes the normalized row in backward, and does no dweight work for a weight
that does not require grad), under torch.compile through the custom ops `qlora_core::rms_norm` and
`qlora_core::rms_norm_backward` (the same launchers, opaque to Dynamo, so compiled and eager graphs run the same
kernels; docs/backends.md). The reference stays out of the op on purpose: an op boundary makes autograd sum the
gradient of an fp32 x (which the norm reads twice, and the residual once more) in another order, and the compiled
tiny Llama's LoRA grads then differed from eager's by up to 7e-9, where traced they are equal bit for bit.
"""
from __future__ import annotations

import math

import torch

from .. import backend


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Spec. x (..., d) fp32/fp16/bf16, weight (d,) -> (..., d) in promote(x.dtype, weight.dtype).

    Mean square and normalization in fp32, the normalized row cast to x's dtype, then times weight (llama.py).
    unit_offset (Gemma): the fp32 row times (1 + weight) in fp32, cast to x's dtype (the output's dtype).
    Differentiable through autograd.
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """The Triton path: saves x and rstd; dweight only when weight requires grad."""

    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset):
        from ..kernels import rmsnorm as k
        x = x.contiguous()  # once: backward reads the saved copy as is
        y, rstd = k.rms_norm_forward(x, weight, eps, unit_offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.unit_offset = unit_offset
        return y

    @staticmethod
    def backward(ctx, dy):
        from ..kernels import rmsnorm as k
        x, weight, rstd = ctx.saved_tensors
        dx, dw = k.rms_norm_backward(dy, x, weight, rstd, compute_dw=ctx.needs_input_grad[1],
                                     unit_offset=ctx.unit_offset)
        return (dx if ctx.needs_input_grad[0] else None), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """x (..., d) fp32/fp16/bf16, weight (d,) -> (..., d) in promote(x.dtype, weight.dtype): llama.py's RMSNorm
    (unit_offset: Gemma's, times (1 + weight), output in x's dtype; see rms_norm_ref).

    Triton kernels where backend.choose(x.device, x.dtype) says so (CUDA, or forced under TRITON_INTERPRET=1), else
    `rms_norm_ref`; differentiable either way, and a weight that does not require grad gets no gradient work.
    """
    if backend.choose(x.device, x.dtype) != "triton":
        return rms_norm_ref(x, weight, eps, unit_offset)
    if backend.compiling():
        return torch.ops.qlora_core.rms_norm(x, weight, eps, unit_offset)[0]
    return RMSNormFunction.apply(x, weight, eps, unit_offset)


# -- torch.library custom ops: what torch.compile sees (docs/backends.md, "torch.compile: the custom ops") -----
_T = torch.Tensor


@torch.library.custom_op("qlora_core::rms_norm", mutates_args=())
def _rms_norm_op(x: _T, weight: _T, eps: float, unit_offset: bool = False) -> tuple[_T, _T]:
    """The forward launcher: (y, rstd (rows,) fp32)."""
    from ..kernels import rmsnorm as k
    return k.rms_norm_forward(x, weight, eps, unit_offset)


@_rms_norm_op.register_fake
def _(x, weight, eps, unit_offset=False):
    y_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    return (x.new_empty(x.shape, dtype=y_dtype),
            x.new_empty(math.prod(x.shape[:-1]), dtype=torch.float32))


@torch.library.custom_op("qlora_core::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: _T, x: _T, weight: _T, rstd: _T, compute_dw: bool,
                          unit_offset: bool = False) -> tuple[_T, _T]:
    """The backward launcher: (dx, dweight); dweight empty (0,) when not compute_dw (an op cannot return None)."""
    from ..kernels import rmsnorm as k
    dx, dw = k.rms_norm_backward(dy, x, weight, rstd, compute_dw=compute_dw, unit_offset=unit_offset)
    return dx, (weight.new_empty(0) if dw is None else dw)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, compute_dw, unit_offset=False):
    return x.new_empty(x.shape), weight.new_empty(weight.shape if compute_dw else 0)


def _setup_context(ctx, inputs, output):
    x, weight, _, unit_offset = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.unit_offset = unit_offset


def _rms_norm_op_backward(ctx, dy, _drstd):
    need_dx, need_dw = ctx.needs_input_grad[:2]
    dx, dw = torch.ops.qlora_core.rms_norm_backward(dy, *ctx.saved_tensors, need_dw, ctx.unit_offset)
    return (dx if need_dx else None), (dw if need_dw else None), None, None


_rms_norm_op.register_autograd(_rms_norm_op_backward, setup_context=_setup_context)
