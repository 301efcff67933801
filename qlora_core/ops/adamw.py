"""The adamw op: the AdamW updates PagedAdamW runs on flat slices of a parameter and its state, their PyTorch
references (the spec kernels/adamw.py obeys), the one reference-vs-Triton decision (`triton_kernels`) and the
`adamw8bit_step` / `adamw32_step` custom ops.

Two updates, both in place on one flat slice of a parameter and its state:
  * `adamw8bit_ref`: bitsandbytes' 8-bit blockwise Adam (bnb-format.md §6, kOptimizerStatic8bit2StateBlockwise).
    Per element, in fp32: dequantize m0 = qmap1[c1]*absmax1[b], v0 = qmap2[c2]*absmax2[b]; if g is finite,
    m = b1*m0 + (1-b1)*g and v = b2*v0 + (1-b2)*g*g, else m = v = 0 and p is left alone; the step uses the
    *unquantized* new m, v: p = T(p + step_size*m/(sqrt(v) + c2*eps)), then decay p = T(p*(1-lr*wd)) (after the
    step, two casts, as bnb; torch decays first, an O(lr^2*wd) difference); absmax' = max|m|, max|v| per
    256-block; requantize with the CUDA binary-search nearest/tie rule (`ops/quant4.encode_8bit`) on m/absmax'
    (a true divide: bnb's quantize_2D divides); sign fix: if signbit(qmap1[c1]) != signbit(m), c1 += 1 if m > 0
    else -1, wrapping in uint8 (an all-zero block gives state1 = 0xFF, state2 = 0x00, absmax 0, as on CUDA).
  * `adamw32_ref`: torch.optim.AdamW's single-tensor update with fp32 states (decay first, lerp for m).

Differences from CUDA bnb, by design: the scalar coefficients (step_size, c2*eps, 1-lr*wd) are computed once in
fp64 on the host and rounded to fp32 (bnb uses `__powf` / `__fdividef` on the device), and sqrt / divide are
IEEE-rounded (bnb builds with fast-math). bnb-format.md §6 says bit-exactness with CUDA bnb is unrealistic;
the format (codes, maps, absmax semantics) is what must match, and the kernel matches *this* reference.

Dispatch: PagedAdamW (optim.py) launches the kernels per page region itself (multi-tensor launches), but asks
`triton_kernels` whether to; `adamw8bit_step` / `adamw32_step` run one flat tensor for code that writes its own
update loop, through the custom ops `qlora_core::adamw8bit_step` / `adamw32_step` under torch.compile (coefficients
as a list of floats: AdamWCoeffs' fields in order) and directly in eager mode (docs/backends.md).
"""
from __future__ import annotations

import dataclasses
import math
import struct

import torch

from .. import backend
from .quant4 import encode_8bit

BLOCKSIZE = 256  # 8-bit state quantization block (bnb's blockwise optimizers hardcode 256)


@dataclasses.dataclass(frozen=True)
class AdamWCoeffs:
    """Per-step scalars, computed once in fp64 on the host and passed to kernels (rounded to fp32 there)."""
    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    step_size: float  # 8-bit: -lr*sqrt(1-b2^t)/(1-b1^t); 32-bit: lr/(1-b1^t) (torch's sign convention)
    eps_hat: float  # 8-bit: sqrt(1-b2^t)*eps; 32-bit: eps
    decay: float  # 1 - lr*wd (exactly 1.0 when wd == 0, and x*1.0 == x)
    bias_c2_sqrt: float  # sqrt(1-b2^t) (32-bit only)


def _round_f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def adamw_coeffs(step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 bits: int) -> AdamWCoeffs:
    """The per-step scalars. 8-bit follows bnb, whose kernel receives betas, lr, eps, wd as fp32: they are
    rounded to fp32 first (1 - fp32(0.999) differs from fp32(1 - 0.999) by 5e-5 relative, visible in absmax);
    32-bit follows torch, which uses the Python doubles."""
    if bits == 8:
        lr, beta1, beta2, eps, weight_decay = map(_round_f32, (lr, beta1, beta2, eps, weight_decay))
    c1 = 1.0 - beta1 ** step
    c2 = math.sqrt(1.0 - beta2 ** step)
    if bits == 8:
        return AdamWCoeffs(beta1, beta2, 1.0 - beta1, 1.0 - beta2, -lr * c2 / c1, c2 * eps,
                           1.0 - lr * weight_decay, c2)
    return AdamWCoeffs(beta1, beta2, 1.0 - beta1, 1.0 - beta2, lr / c1, eps, 1.0 - lr * weight_decay, c2)


def _f32(x: float) -> torch.Tensor:
    # Scalars enter the math as fp32, the way a Triton kernel receives a Python float.
    return torch.tensor(x, dtype=torch.float32)


@torch.no_grad()
def adamw8bit_ref(p: torch.Tensor, g: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor,
                  absmax1: torch.Tensor, absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor,
                  k: AdamWCoeffs) -> None:
    """One 8-bit blockwise AdamW step, in place (see the module docstring for the exact rule).

    p, g: (n,) fp32/bf16/fp16 (flat, same dtype); state1, state2: (n,) uint8; absmax1, absmax2:
    (ceil(n/256),) fp32; qmap1 / qmap2: the signed / unsigned dynamic maps (256,) fp32. n need not be a
    multiple of 256 (the tail block's absmax covers its valid elements only).
    """
    n = p.numel()
    nb = absmax1.numel()
    pad = nb * BLOCKSIZE - n
    b1, b2, omb1, omb2 = _f32(k.beta1), _f32(k.beta2), _f32(k.one_minus_beta1), _f32(k.one_minus_beta2)
    step_size, eps_hat, decay = _f32(k.step_size), _f32(k.eps_hat), _f32(k.decay)

    blk = torch.arange(n, device=p.device) // BLOCKSIZE
    m0 = qmap1[state1.long()] * absmax1[blk]
    v0 = qmap2[state2.long()] * absmax2[blk]
    g32 = g.float()
    finite = torch.isfinite(g32)
    m = torch.where(finite, m0 * b1 + g32 * omb1, 0.0)
    v = torch.where(finite, v0 * b2 + (g32 * g32) * omb2, 0.0)

    # sqrt through fp64 is the correctly rounded fp32 sqrt (sqrt_rn); torch's CPU fp32 sqrt is not (1 ulp off
    # on ~20% of random inputs with torch 2.13), which would make the reference disagree with the kernel.
    sqrt_v = v.double().sqrt().float()
    new_p = (p.float() + step_size * (m / (sqrt_v + eps_hat))).to(p.dtype)
    new_p = (new_p.float() * decay).to(p.dtype)
    p.copy_(torch.where(finite, new_p, p))

    am1 = torch.nn.functional.pad(m.abs(), (0, pad)).view(nb, BLOCKSIZE).amax(dim=1)
    am2 = torch.nn.functional.pad(v, (0, pad)).view(nb, BLOCKSIZE).amax(dim=1)
    c1 = encode_8bit(m / am1[blk], qmap1).to(torch.int32)
    c2 = encode_8bit(v / am2[blk], qmap2)
    wrong_sign = torch.signbit(qmap1[c1.long()]) != torch.signbit(m)
    c1 = torch.where(wrong_sign, c1 + torch.where(m > 0, 1, -1), c1)
    state1.copy_((c1 & 0xFF).to(torch.uint8))
    state2.copy_(c2)
    absmax1.copy_(am1)
    absmax2.copy_(am2)


@torch.no_grad()
def adamw32_ref(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                k: AdamWCoeffs) -> None:
    """torch.optim.AdamW's single-tensor step with fp32 states, in place; p, g any float dtype, flat.

    Uses torch's own ops (its CPU sqrt included) so that on fp32 CPU tensors it is bit-identical to
    torch.optim.AdamW(foreach=False); the Triton twin uses sqrt_rn and agrees to an ulp.
    """
    p32 = p.float() * _f32(k.decay)
    g32 = g.float()
    exp_avg.lerp_(g32, k.one_minus_beta1)
    exp_avg_sq.mul_(k.beta2).addcmul_(g32, g32, value=k.one_minus_beta2)
    denom = (exp_avg_sq.sqrt() / k.bias_c2_sqrt).add_(k.eps_hat)
    p.copy_(p32.addcdiv_(exp_avg, denom, value=-k.step_size))


# -- dispatch and the custom ops ---------------------------------------------------------------------------------------
def triton_kernels(device: torch.device, dtype: torch.dtype | None = None):
    """kernels/adamw.py (the launchers) when the update of tensors on `device` (of `dtype`) runs in Triton, else None
    (the references run): the one reference-vs-Triton decision of this op, `backend.choose`'s rule. Imports triton
    only when the answer is Triton."""
    if backend.choose(device, dtype) != "triton":
        return None
    from ..kernels import adamw
    return adamw


def _adamw8bit(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, k: AdamWCoeffs) -> None:
    kernels = triton_kernels(p.device, p.dtype)
    if kernels is None:
        adamw8bit_ref(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, k)
    else:
        kernels.adamw8bit(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, k, BLOCKSIZE)
        torch.autograd.graph.increment_version([p])  # Triton writes bypass the version counter


def _adamw32(p, g, exp_avg, exp_avg_sq, k: AdamWCoeffs) -> None:
    kernels = triton_kernels(p.device, p.dtype)
    if kernels is None:
        adamw32_ref(p, g, exp_avg, exp_avg_sq, k)
    else:
        kernels.adamw32(p, g, exp_avg, exp_avg_sq, k, BLOCKSIZE)
        torch.autograd.graph.increment_version([p])


def adamw8bit_step(p: torch.Tensor, g: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor,
                   absmax1: torch.Tensor, absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor,
                   k: AdamWCoeffs) -> None:
    """One 8-bit blockwise AdamW step in place (adamw8bit_ref's arguments and rule); flat contiguous
    tensors. The custom op `qlora_core::adamw8bit_step` under torch.compile, the plain call otherwise."""
    if backend.compiling():
        torch.ops.qlora_core.adamw8bit_step(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2,
                                            list(dataclasses.astuple(k)))
    else:
        _adamw8bit(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, k)


def adamw32_step(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 k: AdamWCoeffs) -> None:
    """One AdamW step with fp32 states in place (adamw32_ref's arguments and rule); flat tensors. The
    custom op `qlora_core::adamw32_step` under torch.compile, the plain call otherwise."""
    if backend.compiling():
        torch.ops.qlora_core.adamw32_step(p, g, exp_avg, exp_avg_sq, list(dataclasses.astuple(k)))
    else:
        _adamw32(p, g, exp_avg, exp_avg_sq, k)


@torch.library.custom_op("qlora_core::adamw8bit_step",
                         mutates_args=("p", "state1", "state2", "absmax1", "absmax2"))
def _adamw8bit_op(p: torch.Tensor, g: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor,
                  absmax1: torch.Tensor, absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor,
                  coeffs: list[float]) -> None:
    _adamw8bit(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, AdamWCoeffs(*coeffs))


@_adamw8bit_op.register_fake
def _(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, coeffs):
    return None


@torch.library.custom_op("qlora_core::adamw32_step", mutates_args=("p", "exp_avg", "exp_avg_sq"))
def _adamw32_op(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                coeffs: list[float]) -> None:
    _adamw32(p, g, exp_avg, exp_avg_sq, AdamWCoeffs(*coeffs))


@_adamw32_op.register_fake
def _(p, g, exp_avg, exp_avg_sq, coeffs):
    return None
