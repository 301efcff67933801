"""An AdamW step in float64 written from its published formula, and the checks that hold PagedAdamW's one-step
results to it (tests/test_optim.py on the CPU, tests/test_gpu_optim.py on CUDA).

Nothing here imports qlora_core's optimizer code (qlora_core.optim_ref, adamw_coeffs): the point is a reference
that does not share the implementation's coefficient function. The tests start this reference from the
optimizer's own state before every step (as bitsandbytes' optimizer tests re-sync), so the comparison sees one
step's error and the tolerances below are derived per step, not accumulated.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

BLOCK = 256  # 8-bit optimizer state block
EPS32 = 2.0 ** -23  # fp32 machine epsilon: eps * |x| >= one ulp of x
# The 8-bit path rounds betas to fp32 before use, as bitsandbytes' kernel receives them: 1 - fp32(0.999) is
# 1.29e-5 relative off 0.001, which moves v by up to that much and sqrt(v), the update, by half of it; the bias
# correction 1 - beta2^t moves the same way. 2e-5 of the update's magnitude covers both, plus fp32 rounding of
# m (a few ulps of its terms) and of the divide.
UPDATE_RTOL = 2e-5
PARAM_ULPS = 4  # fp32 roundings on the way to p (the update, its add, the decay's multiply): ~2 ulps + margin


class Step64(NamedTuple):
    """One float64 AdamW step: new p, m, v, the update u, and u_mag = |u| with |m| replaced by the sum of the
    magnitudes of its two terms (where b1 m and (1 - b1) g nearly cancel, fp32 rounding of m is relative to those
    terms, not to the small m)."""
    p: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    u: torch.Tensor
    u_mag: torch.Tensor


def adamw_step64(p, g, m, v, step: int, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 decay_first: bool = True) -> Step64:
    """One AdamW step in float64 from (p, m, v) (any shape, any float dtype; results float64, same shape):

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        u = -lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
        p = p (1 - lr wd) + u      (decay_first: torch.optim.AdamW, bitsandbytes CPU and 32-bit)
        p = (p + u) (1 - lr wd)    (not decay_first: bitsandbytes' CUDA 8-bit kernel, which PagedAdamW follows)
    """
    b1, b2 = betas
    p, g, m, v = (t.detach().double() for t in (p, g, m, v))
    terms = b1 * m.abs() + (1 - b1) * g.abs()
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = (v / (1 - b2 ** step)).sqrt() + eps
    u = -lr * (m / (1 - b1 ** step)) / denom
    decay = 1 - lr * weight_decay
    return Step64(p * decay + u if decay_first else (p + u) * decay, m, v, u, lr * terms / (1 - b1 ** step) / denom)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """qmap[code] * absmax[i // 256], one fp32 multiply (what the optimizer starts its step from), as float64, flat."""
    n = codes.numel()
    scale = absmax.float().repeat_interleave(BLOCK)[:n]
    return (qmap.float()[codes.reshape(-1).long()] * scale).double()


def param_tolerance(p0: torch.Tensor, ref: Step64) -> torch.Tensor:
    """Per-element bound on |p - p_ref| after the step `ref` from p0: PARAM_ULPS fp32 ulps of the operands (|p0| +
    |u|, not of the result: they may nearly cancel) plus UPDATE_RTOL of the update's magnitude (ref.u_mag)."""
    p0 = p0.reshape(ref.u.shape).double().abs()
    return PARAM_ULPS * EPS32 * (p0 + ref.u.abs()) + UPDATE_RTOL * ref.u_mag


def block_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| per 256-element block of the flat x (the tail block over its valid elements), float64."""
    x = x.reshape(-1).double().abs()
    pad = (-x.numel()) % BLOCK
    return torch.nn.functional.pad(x, (0, pad)).view(-1, BLOCK).amax(dim=1)


def nearest_code_violations(codes: torch.Tensor, absmax: torch.Tensor, ref: torch.Tensor, qmap: torch.Tensor,
                            rel_slack: float, signed: bool) -> int:
    """How many elements' codes are not (one of) the nearest qmap entries to ref / max|ref| of their block.

    ref is the float64 state the step should have produced (m or v); a code counts as nearest when its distance
    to the normalized value is within 2 * rel_slack * |value| + 1e-7 of the best (the stored state was computed in
    fp32 with fp32 betas: a value within that of a midpoint may round either way). signed (m): bitsandbytes'
    sign fix is required: a negative value whose nearest code is +0 must take the next negative code instead.
    Blocks whose reference absmax is 0 are skipped (their codes are a convention, tested elsewhere).
    """
    ref = ref.reshape(-1).double()
    am_ref = block_absmax(ref).repeat_interleave(BLOCK)[:ref.numel()]
    live = am_ref > 0
    z = ref[live] / am_ref[live]
    q = qmap.double()
    c = codes.reshape(-1).long()[live]
    dist = (q[None, :] - z[:, None]).abs()  # (n, 256)
    best = dist.min(dim=1)
    ok = dist.gather(1, c[:, None])[:, 0] <= best.values + 2 * rel_slack * z.abs() + 1e-7
    if signed:
        zero = int((q == 0).nonzero()[0])
        fix = (best.indices == zero) & (z < 0)
        ok = torch.where(fix, c == zero - 1, ok)
    return int((~ok).sum())
