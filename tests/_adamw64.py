"""An AdamW step in float64 written from its published formula, the checks that hold PagedAdamW's one-step
results to it, and the driver that produces them (tests/test_optim.py on the CPU, tests/test_gpu_optim.py on CUDA).

The reference does not use qlora_core's optimizer code (qlora_core/ops/adamw.py, adamw_coeffs): the point is one
that does not share the implementation's coefficient function. The tests start it from the optimizer's own state
before every step (as bitsandbytes' optimizer tests re-sync), so a comparison sees one step's error and the
tolerances below are derived per step, not accumulated.

DECAY makes weight decay the largest term of a step: lr*wd*|p| = 5% of p ~ N(0, 1) against Adam's own step of
about lr = 1%, and ~1e4 times the parameter tolerance, so a wrong, missing or misplaced decay cannot hide.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from qlora_core.formats import dynamic_map

BLOCK = 256  # 8-bit optimizer state block
EPS32 = 2.0 ** -23  # fp32 machine epsilon: eps * |x| >= one ulp of x
# The 8-bit path rounds betas to fp32 before use, as bitsandbytes' kernel receives them: 1 - fp32(0.999) is
# 1.29e-5 relative off 0.001, which moves v by up to that much and sqrt(v), the update, by half of it; the bias
# correction 1 - beta2^t moves the same way. 2e-5 of the update's magnitude covers both, plus fp32 rounding of
# m (a few ulps of its terms) and of the divide.
UPDATE_RTOL = 2e-5
PARAM_ULPS = 4  # fp32 roundings on the way to p (the update, its add, the decay's multiply): ~2 ulps + margin
DECAY = dict(lr=1e-2, weight_decay=5.0)
ORDER = DECAY["lr"] * DECAY["weight_decay"]  # decaying after the update instead of before adds -lr*wd*update
ONE_STEP_SHAPES = [(64, 300), (300,)]  # 8-bit state (19200 elements, a tail block) and fp32 state (< 4096)
ONE_STEPS = 6


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


def param_tolerance(p0: torch.Tensor, ref: Step64, update_rtol: float = UPDATE_RTOL) -> torch.Tensor:
    """Per-element bound on |p - p_ref| after the step `ref` from p0: PARAM_ULPS fp32 ulps of the operands (|p0| +
    |u|, not of the result: they may nearly cancel) plus update_rtol of the update's magnitude (ref.u_mag)."""
    p0 = p0.reshape(ref.u.shape).double().abs()
    return PARAM_ULPS * EPS32 * (p0 + ref.u.abs()) + update_rtol * ref.u_mag


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


# ---- checks -------------------------------------------------------------------------------------------------
def moments(st: dict | None, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, v) float64 flat from one parameter's PagedAdamW state_dict entry (zeros before its first step)."""
    if st is None:
        return torch.zeros(numel, dtype=torch.float64), torch.zeros(numel, dtype=torch.float64)
    if "state1" in st:
        return (dequantize(st["state1"], st["absmax1"], dynamic_map(True)),
                dequantize(st["state2"], st["absmax2"], dynamic_map(False)))
    return st["exp_avg"].reshape(-1).double(), st["exp_avg_sq"].reshape(-1).double()


def check_params(p: torch.Tensor, p_ref: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    """Assert |p - p_ref| <= tol elementwise (any shapes of equal numel; p on any device)."""
    err = (p.detach().cpu().double().reshape(-1) - p_ref.cpu().double().reshape(-1)).abs()
    tol = tol.cpu().reshape(-1)
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} parameters beyond tolerance, max excess "
                           f"{(err - tol).max():.3e}, max error {err.max():.3e}")


def check_8bit_state(st: dict, m_ref: torch.Tensor, v_ref: torch.Tensor, what: str) -> None:
    """8-bit state entry vs the moments the step should have produced: absmax = max|m|, max|v| per block (fp32
    betas: 1e-7 relative for m, up to 1.3e-5 for v, UPDATE_RTOL's reason), codes the nearest (sign fix included)."""
    q1, q2 = dynamic_map(True), dynamic_map(False)
    torch.testing.assert_close(st["absmax1"].double(), block_absmax(m_ref), rtol=1e-6, atol=0, msg=what)
    torch.testing.assert_close(st["absmax2"].double(), block_absmax(v_ref), rtol=2e-5, atol=0, msg=what)
    assert nearest_code_violations(st["state1"], st["absmax1"], m_ref, q1, 1e-6, signed=True) == 0, what
    assert nearest_code_violations(st["state2"], st["absmax2"], v_ref, q2, 2e-5, signed=False) == 0, what


# ---- driver -------------------------------------------------------------------------------------------------
def one_steps(bits: int, device: str = "cpu"):
    """PagedAdamW(**DECAY) on ONE_STEP_SHAPES (fp32 params on `device`) for ONE_STEPS steps; yields per step and
    parameter (t, p0, st0, g, p, st): CPU copies of the parameter and its state_dict entry (None before step 1)
    before and after the step, and the gradient. Step 1 puts tiny negative gradients next to a large one in the
    first block, where the nearest code of m is +0 and bitsandbytes' sign fix must take the next negative code."""
    from qlora_core.optim import PagedAdamW
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in ONE_STEP_SHAPES]
    opt = PagedAdamW(params, optim_bits=bits, **DECAY)
    for t in range(1, ONE_STEPS + 1):
        grads = [torch.randn(s, generator=gen) * 1e-2 for s in ONE_STEP_SHAPES]
        if t == 1:
            grads[0].view(-1)[:4] = torch.tensor([1.0, -1e-9, -3e-9, 2e-9])
        p0 = [p.detach().cpu().clone() for p in params]
        st0 = opt.state_dict()["state"]
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt.step()
        st = opt.state_dict()["state"]
        for i, p in enumerate(params):
            yield t, p0[i], st0.get(i), grads[i], p.detach().cpu().clone(), st[i]


def check_one_steps_against_float64(bits: int, device: str) -> None:
    """Every step of `one_steps(bits, device)` against adamw_step64 from the optimizer's own state before it:
    parameters within param_tolerance, 8-bit states by check_8bit_state, fp32 moments within 4 ulps of the
    tensor's largest; 8-bit tensors decay after the update (bitsandbytes' CUDA order), fp32-state ones before
    (torch's). Also asserts the premise: decay is the step's largest term and far above the tolerance."""
    for t, p0, st0, g, p, st in one_steps(bits, device):
        what = f"{device} step {t}, shape {tuple(p.shape)}, {bits}-bit"
        eight = "state1" in st
        assert eight == (bits == 8 and p.numel() >= 4096), what
        m0, v0 = moments(st0, p.numel())
        ref = adamw_step64(p0.reshape(-1), g.reshape(-1), m0, v0, t, decay_first=not eight, **DECAY)
        tol = param_tolerance(p0, ref)
        decay = ORDER * p0.reshape(-1).double().abs()
        assert decay.median() > 3 * ref.u.abs().median() and (decay > 1e3 * tol).float().mean() > 0.99, what
        check_params(p, ref.p, tol, what)
        if eight:
            check_8bit_state(st, ref.m, ref.v, what)
        else:
            for k, want in (("exp_avg", ref.m), ("exp_avg_sq", ref.v)):
                torch.testing.assert_close(st[k].reshape(-1).double(), want, rtol=4 * EPS32,
                                           atol=4 * EPS32 * want.abs().max().item(), msg=f"{what} {k}")
