"""SwiGLU's Triton kernels and launchers: out = silu(gate) * up, reading gate and up from one fused GEMM output.

The spec (`swiglu_ref`), the autograd Function and the routing are in qlora_core/ops/swiglu.py; this file is the
launchers `swiglu_forward` and `swiglu_backward`. PyTorch's `F.silu(gate) * up` evaluates silu in fp32
(x / (1 + exp(-x))) and rounds it to the dtype, then rounds the product again; the kernel does the same two
roundings, so its forward equals PyTorch's to the last bit wherever the fp32 exp agrees.

Inputs: gu (..., 2I) with gate in [..., :I] and up in [..., I:] (the output of one gate/up GEMM), or gate and up
(..., I) as two tensors. Rows may be strided (a column slice of a wider buffer); the last dim must have
stride 1 (else one copy is made).

GeGLU (Gemma's MLP: gelu_pytorch_tanh, `activation="gelu_tanh"`) runs through the same kernels with GELU=True:
gelu(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) in fp32, tanh(u) = 2 / (1 + exp(-2u)) - 1 (no tanh in the
interpreter's tl; exp over/underflows to the right +-1 limits), rounded as silu is.

Design: an elementwise kernel on a 2-D grid (rows, I / BLOCK). Backward recomputes silu in fp32 from the inputs
and writes dgate = dout * up * s * (1 + gate * (1 - s)) (s = sigmoid(gate)) and dup = dout * silu(gate), each
rounded once to the dtype. With the fused input they land in one (..., 2I) gradient, the layout the gate/up
GEMM's backward wants. `inplace=True` writes that gradient over the inputs' own memory (no (M, 2I) allocation).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_rne  # fp32 -> dtype with round-to-nearest-even in the interpreter too

BLOCK = 1024  # columns per program; 4 warps, 8 elements a thread
ACTIVATIONS = ("silu", "gelu_tanh")  # silu(gate) * up (SwiGLU), gelu_tanh(gate) * up (GeGLU)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _act_fwd_bwd(g, GELU: tl.constexpr):
    """fp32 gate -> (activation(g), its derivative), both fp32."""
    if GELU:
        inner = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0  # tanh(inner)
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    return a, da


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, out_ptr, g_stride, u_stride, I, GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0)
    if GELU:
        a, _ = _act_fwd_bwd(g, GELU)
    else:
        a = g / (1.0 + tl.exp(-g))  # torch's silu formula, fp32
    a = cast_rne(a, u.dtype).to(tl.float32)  # F.silu's (F.gelu's) rounding before the product
    tl.store(out_ptr + row * I + cols, cast_rne(a * u.to(tl.float32), u.dtype), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dout_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, g_stride, u_stride, dg_stride, du_stride, I,
                       GELU: tl.constexpr, BLOCK: tl.constexpr):
    # dg/du may alias g/u: each element is read before the same program overwrites it.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    dout = tl.load(dout_ptr + row * I + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0)
    dtype = u.dtype
    a, da = _act_fwd_bwd(g, GELU)
    dg = dout * u.to(tl.float32) * da
    du = dout * a
    tl.store(dg_ptr + row * dg_stride + cols, cast_rne(dg, dtype), mask=mask)
    tl.store(du_ptr + row * du_stride + cols, cast_rne(du, dtype), mask=mask)


def _rows(name: str, x: torch.Tensor, I: int) -> torch.Tensor:
    """x (..., I) -> a 2-D (M, I) view or copy whose last dim has stride 1."""
    if x.shape[-1] != I:
        raise ValueError(f"kernels/swiglu.py: {name} has {x.shape[-1]} columns, expected {I}")
    x2 = x.reshape(-1, I) if x.dim() != 2 else x
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _split(gate: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(gu, None) or (gate, up) -> (gate, up) as (M, I) row views with stride-1 columns, and the (M, 2I) fused
    rows they view (None for two tensors)."""
    if gate.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"kernels/swiglu.py: dtype {gate.dtype} is not fp32/fp16/bf16")
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"kernels/swiglu.py: fused gate/up input needs an even last dim, got {tuple(gate.shape)}")
        gu = _rows("gu", gate, gate.shape[-1])
        I = gu.shape[1] // 2
        return gu[:, :I], gu[:, I:], gu
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"kernels/swiglu.py: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
                         f"{up.dtype} differ")
    return _rows("gate", gate, gate.shape[-1]), _rows("up", up, up.shape[-1]), None


def _gelu(activation: str) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"kernels/swiglu.py: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation == "gelu_tanh"


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor | None = None, activation: str = "silu") -> torch.Tensor:
    """Launcher. gu (..., 2I) with up=None, or gate and up (..., I) -> act(gate) * up (..., I) in their dtype;
    act is silu or gelu_tanh (ACTIVATIONS)."""
    gelu = _gelu(activation)
    g, u, _ = _split(gate, up)
    M, I = g.shape
    out = torch.empty((M, I), dtype=g.dtype, device=g.device)
    if M and I:
        _swiglu_fwd_kernel[(M, triton.cdiv(I, BLOCK))](g, u, out, g.stride(0), u.stride(0), I, GELU=gelu,
                                                       BLOCK=BLOCK, num_warps=4)
    return out.view(*gate.shape[:-1], I)


def swiglu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None = None,
                    inplace: bool = False,
                    activation: str = "silu") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launcher. dout (..., I) and the forward's inputs -> dgu (..., 2I) for a fused gu (up=None), else
    (dgate, dup) (..., I), in the inputs' dtype. inplace=True writes the gradient over the inputs' memory."""
    gelu = _gelu(activation)
    g, u, gu = _split(gate, up)
    M, I = g.shape
    d = _rows("dout", dout, I).contiguous()
    if gu is not None:
        dgu = gu if inplace else torch.empty((M, 2 * I), dtype=g.dtype, device=g.device)
        dg, du = dgu[:, :I], dgu[:, I:]
    else:
        dg, du = (g, u) if inplace else (torch.empty_like(g), torch.empty_like(u))
    if M and I:
        _swiglu_bwd_kernel[(M, triton.cdiv(I, BLOCK))](d, g, u, dg, du, g.stride(0), u.stride(0), dg.stride(0),
                                                       du.stride(0), I, GELU=gelu, BLOCK=BLOCK, num_warps=4)
    if gu is not None:
        return dgu.reshape(gate.shape)
    return dg.reshape(gate.shape), du.reshape(up.shape)

