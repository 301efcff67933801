"""The swiglu op: out = silu(gate) * up (llama.py's MLP activation), with its spec, autograd and custom op.
`activation="gelu_tanh"` makes it GeGLU, gelu(gate, approximate="tanh") * up (Gemma 3's gelu_pytorch_tanh MLP),
with the same roundings; everything below holds for both.

Semantics are `F.silu(gate) * up` in the activations' dtype: silu evaluated in fp32 and rounded to the dtype, then
the product rounded again (`swiglu_ref`, the spec). Inputs: gu (..., 2I) holding [gate | up] (one fused gate/up
GEMM output), or gate and up (..., I) as two tensors.

Dispatch: `swiglu` asks `backend.choose`. "reference" runs `swiglu_ref`, plain PyTorch under autograd, which
torch.compile traces as it is (ops/rmsnorm.py says why the reference is not wrapped in an op). "triton" runs
kernels/swiglu.py's launchers: eagerly through `SwiGLUFunction`, which saves the inputs only and recomputes silu in
backward; with the fused input the gradient is one (..., 2I) tensor, and `inplace_grad=True` writes it over the
saved input itself (no (M, 2I) allocation in backward; only valid when the caller owns gu, i.e. nothing else reads
it after this op: autograd's version counter catches a later reader that saved it). Under torch.compile the
Triton path goes through the custom ops `qlora_core::swiglu` and `qlora_core::swiglu_backward` (the same
launchers, opaque to Dynamo). inplace_grad does not apply there: an op's gradient formula may not write over a
saved input, and the compiler plans the buffers itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend


ACTIVATIONS = ("silu", "gelu_tanh")  # kernels/swiglu.py's too


def _act(gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate)
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh")
    raise ValueError(f"swiglu: activation must be one of {ACTIVATIONS}, got {activation!r}")


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Spec. gate, up (..., I) same float dtype -> (..., I): the activation (silu, or gelu_tanh) in fp32 rounded to
    the dtype, times up (rounded again), as F.silu(gate) * up. Differentiable."""
    return _act(gate.float(), activation).to(up.dtype) * up


class SwiGLUFunction(torch.autograd.Function):
    """The Triton path: saves the inputs; backward recomputes silu (see the module docstring for inplace_grad)."""

    @staticmethod
    def forward(ctx, gate, up, inplace_grad, activation):
        from ..kernels import swiglu as k
        ctx.save_for_backward(gate, up)
        ctx.inplace_grad, ctx.activation = inplace_grad, activation
        return k.swiglu_forward(gate, up, activation)

    @staticmethod
    def backward(ctx, dout):
        from ..kernels import swiglu as k
        gate, up = ctx.saved_tensors
        grads = k.swiglu_backward(dout, gate, up, inplace=ctx.inplace_grad, activation=ctx.activation)
        if up is None:
            return grads, None, None, None
        return grads[0], grads[1], None, None


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None, inplace_grad: bool = False,
           activation: str = "silu") -> torch.Tensor:
    """silu(gate) * up (activation="gelu_tanh": GeGLU, gelu_tanh(gate) * up). gate (..., 2I) holding [gate | up]
    with up=None (one fused GEMM output), or gate and up (..., I); fp32/fp16/bf16 -> (..., I) in that dtype.
    Triton where backend.choose(gate.device, gate.dtype) says so, else `swiglu_ref` (differentiable either way).
    inplace_grad=True (eager Triton path) lets backward overwrite the saved input with the gradient: only when
    nothing else uses it afterwards.
    """
    if backend.choose(gate.device, gate.dtype) != "triton":
        if up is None:
            I = gate.shape[-1] // 2
            gate, up = gate[..., :I], gate[..., I:]
        return swiglu_ref(gate, up, activation)
    if backend.compiling():
        return torch.ops.qlora_core.swiglu(gate, up, activation)
    return SwiGLUFunction.apply(gate, up, inplace_grad, activation)


# -- torch.library custom ops: what torch.compile sees (docs/backends.md, "torch.compile: the custom ops") -----
_T = torch.Tensor


@torch.library.custom_op("qlora_core::swiglu", mutates_args=())
def _swiglu_op(gate: _T, up: _T | None, activation: str = "silu") -> _T:
    """The forward launcher."""
    from ..kernels import swiglu as k
    return k.swiglu_forward(gate, up, activation)


@_swiglu_op.register_fake
def _(gate, up, activation="silu"):
    return gate.new_empty((*gate.shape[:-1], gate.shape[-1] // 2 if up is None else gate.shape[-1]))


@torch.library.custom_op("qlora_core::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dout: _T, gate: _T, up: _T | None, activation: str = "silu") -> list[_T]:
    """The backward launcher: [dgu] for a fused input (up None), else [dgate, dup], in the inputs' shapes."""
    from ..kernels import swiglu as k
    grads = k.swiglu_backward(dout, gate, up, activation=activation)
    return [grads] if up is None else list(grads)


@_swiglu_backward_op.register_fake
def _(dout, gate, up, activation="silu"):
    return [gate.new_empty(gate.shape)] + ([] if up is None else [up.new_empty(up.shape)])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])
    ctx.activation = inputs[2] if len(inputs) > 2 else "silu"


def _swiglu_op_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    grads = torch.ops.qlora_core.swiglu_backward(dout, gate, up, ctx.activation)
    return grads[0], (grads[1] if up is not None else None), None


_swiglu_op.register_autograd(_swiglu_op_backward, setup_context=_setup_context)
