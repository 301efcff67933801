"""Fused AdamW step in Triton: 8-bit blockwise states (bitsandbytes' format) or fp32 states, one pass over memory.

One program handles ROWS quantization blocks of BLOCK elements (the caller's block size, 256 for bnb's format): it
loads p, g and the state codes, dequantizes
(qmap[code]*absmax), updates m and v, writes the parameter, reduces the new per-block absmax and requantizes
with the CUDA binary-search nearest/tie rule and bnb's sign fix. Per element that is 16 bytes of traffic for
fp32 params (p r/w, g, two codes r/w), against 28 for fp32 states. The semantics are those of the references in
qlora_core/ops/adamw.py (`adamw8bit_ref`, `adamw32_ref`), which are the spec; the one-tensor launchers take their
arguments plus the block size. The per-step coefficients `k` are any object with AdamWCoeffs' attributes (beta1,
beta2, one_minus_beta1, one_minus_beta2, step_size, eps_hat, decay, bias_c2_sqrt).

Design notes:
  * Division and sqrt use the IEEE-rounded forms (div_rn, sqrt_rn) so codes match the reference except where
    the compiler contracts a multiply-add into an FMA (1 ulp in m or p; a code can then move by one at a
    midpoint). Under TRITON_INTERPRET=1 (numpy, no FMA) the kernel reproduces the reference exactly.
  * The 256-entry maps are read with gathers (8 per element per state, L1-resident: the map is 1 KB); bnb keeps
    them in shared memory, which Triton does not expose.
  * Launch overhead, not bandwidth, bounds small tensors: Triton's Python launcher costs ~35 us (measured on
    H100, 451 LoRA tensors -> 17.7 ms a step). So the optimizer uses a multi-tensor form, one launch per page:
    `_adamw_multi_kernel` reads a static per-page segment table (param index, start, count, state offsets)
    and a per-step table of param and grad element offsets from an anchor tensor, each program handling ROWS
    blocks that may come from different tensors. `_adamw_kernel` is the plain one-tensor form
    (tests, fallback when a page's tensors differ in step count or grad dtype). Launches go back to back on
    one stream with no host synchronization.
Triton is imported here, never at qlora_core import time; this folder imports nothing from qlora_core.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant4 import encode_8bit as _encode_8bit  # the shared CUDA-rule 8-bit encoder

ROWS = 4  # blocks per program: 1024-element tiles of 256-element blocks, 4 warps


@triton.jit
def _step_tile(p_ptrs, g_ptrs, s1_ptrs, s2_ptrs, am1_ptrs, am2_ptrs, mask, rmask, qmap1_ptr, qmap2_ptr,
               beta1, beta2, omb1, omb2, step_size, eps_hat, decay, bias_c2_sqrt, QUANT: tl.constexpr):
    # One (ROWS, BLOCK) tile: row r is one quantization block; am*_ptrs and rmask are (ROWS,).
    p = tl.load(p_ptrs, mask=mask, other=0.0)
    pf = p.to(tl.float32)
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    if QUANT:
        c1 = tl.load(s1_ptrs, mask=mask, other=0).to(tl.int32)
        c2 = tl.load(s2_ptrs, mask=mask, other=0).to(tl.int32)
        a1 = tl.load(am1_ptrs, mask=rmask, other=0.0)
        a2 = tl.load(am2_ptrs, mask=rmask, other=0.0)
        m0 = tl.load(qmap1_ptr + c1) * a1[:, None]
        v0 = tl.load(qmap2_ptr + c2) * a2[:, None]
        finite = (g - g) == 0.0  # false for NaN and +-Inf
        m = tl.where(finite, m0 * beta1 + g * omb1, 0.0)
        v = tl.where(finite, v0 * beta2 + (g * g) * omb2, 0.0)
        upd = tl.math.div_rn(m, tl.math.sqrt_rn(v) + eps_hat)
        newp = (pf + step_size * upd).to(p.dtype).to(tl.float32)
        newp = (newp * decay).to(p.dtype)
        tl.store(p_ptrs, tl.where(finite, newp, p), mask=mask)

        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
        new_a1 = tl.max(tl.abs(m), axis=1)
        new_a2 = tl.max(v, axis=1)
        tl.store(am1_ptrs, new_a1, mask=rmask)
        tl.store(am2_ptrs, new_a2, mask=rmask)
        q1 = _encode_8bit(tl.math.div_rn(m, new_a1[:, None]), qmap1_ptr)
        q2 = _encode_8bit(tl.math.div_rn(v, new_a2[:, None]), qmap2_ptr)
        # bnb's sign fix: signbit(qmap1[q1]) != signbit(m) -> step one code towards m's sign (uint8 wrap).
        sb_code = tl.load(qmap1_ptr + q1).to(tl.int32, bitcast=True) < 0
        sb_m = m.to(tl.int32, bitcast=True) < 0
        q1 = tl.where(sb_code != sb_m, q1 + tl.where(m > 0.0, 1, -1), q1)
        tl.store(s1_ptrs, (q1 & 255).to(tl.uint8), mask=mask)
        tl.store(s2_ptrs, q2.to(tl.uint8), mask=mask)
    else:
        # torch.optim.AdamW, single-tensor form: decay first, lerp (weight < 0.5 branch), addcmul, addcdiv.
        m0 = tl.load(s1_ptrs, mask=mask, other=0.0)
        v0 = tl.load(s2_ptrs, mask=mask, other=0.0)
        pd = pf * decay
        m = m0 + omb1 * (g - m0)
        v = v0 * beta2 + (omb2 * g) * g
        denom = tl.math.div_rn(tl.math.sqrt_rn(v), bias_c2_sqrt) + eps_hat
        newp = pd + (-step_size) * tl.math.div_rn(m, denom)
        tl.store(s1_ptrs, m, mask=mask)
        tl.store(s2_ptrs, v, mask=mask)
        tl.store(p_ptrs, newp.to(p.dtype), mask=mask)


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, p_off, n, s1_ptr, s2_ptr, s1_off, s2_off, am1_ptr, am2_ptr, am1_off,
                  am2_off, qmap1_ptr, qmap2_ptr, beta1, beta2, omb1, omb2, step_size, eps_hat, decay,
                  bias_c2_sqrt, QUANT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # Elements [p_off, p_off + n) of the flat p and g; state arrays start at the given element offsets of
    # their base pointers.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (ROWS, BLOCK), relative to the segment
    _step_tile(p_ptr + p_off + offs, g_ptr + p_off + offs, s1_ptr + s1_off + offs, s2_ptr + s2_off + offs,
               am1_ptr + am1_off + rows, am2_ptr + am2_off + rows, offs < n, rows * BLOCK < n,
               qmap1_ptr, qmap2_ptr, beta1, beta2, omb1, omb2, step_size, eps_hat, decay, bias_c2_sqrt, QUANT)


@triton.jit
def _adamw_multi_kernel(seg_ptr, addr_ptr, blk_ptr, nblk, anchor_ptr, s_base, am_base, qmap1_ptr, qmap2_ptr,
                        beta1, beta2, omb1, omb2, step_size, eps_hat, decay, bias_c2_sqrt,
                        ALIGNED: tl.constexpr, VEC: tl.constexpr, QUANT: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr):
    # seg_ptr: int64 (nseg, 8) = param index, start, count, off1, off2, am_off1, am_off2, 0 (state offsets in
    # elements of s_base / am_base); addr_ptr: int64 (nparams, 2) = element offsets of p and of its grad from
    # anchor_ptr (a tensor of the params' dtype); blk_ptr: int32 (nblk, 2) = segment, block in the segment.
    # Addressing from a pointer argument plus offsets (not int->pointer casts) keeps the compiler's alignment
    # and contiguity facts: with ALIGNED (every offset a multiple of 16 bytes, checked on the host) the
    # loads and stores are 16-byte vectors; without it the 32-bit step ran 2.5x slower on H100.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < nblk
    seg = tl.load(blk_ptr + 2 * rows, mask=rmask, other=0).to(tl.int64)
    bidx = tl.load(blk_ptr + 2 * rows + 1, mask=rmask, other=0).to(tl.int64)
    row = seg_ptr + 8 * seg
    param = tl.load(row, mask=rmask, other=0)
    start = tl.load(row + 1, mask=rmask, other=0)
    count = tl.load(row + 2, mask=rmask, other=0)
    off1 = tl.load(row + 3, mask=rmask, other=0)
    off2 = tl.load(row + 4, mask=rmask, other=0)
    am_off1 = tl.load(row + 5, mask=rmask, other=0)
    am_off2 = tl.load(row + 6, mask=rmask, other=0)
    p_base = tl.load(addr_ptr + 2 * param, mask=rmask, other=0) + start
    g_base = tl.load(addr_ptr + 2 * param + 1, mask=rmask, other=0) + start
    if ALIGNED:
        p_base = tl.multiple_of(p_base, VEC)
        g_base = tl.multiple_of(g_base, VEC)
        off1 = tl.multiple_of(off1, 16)
        off2 = tl.multiple_of(off2, 16)
    local = bidx[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # element within the segment
    mask = rmask[:, None] & (local < count[:, None])
    _step_tile(anchor_ptr + p_base[:, None] + local, anchor_ptr + g_base[:, None] + local,
               s_base + off1[:, None] + local, s_base + off2[:, None] + local,
               am_base + am_off1 + bidx, am_base + am_off2 + bidx, mask, rmask,
               qmap1_ptr, qmap2_ptr, beta1, beta2, omb1, omb2, step_size, eps_hat, decay, bias_c2_sqrt, QUANT)


def launch(p, g, p_off, n, s1, s2, s1_off, s2_off, am1, am2, am1_off, am2_off, qmap1, qmap2, k, quant: bool,
           blocksize: int) -> None:
    """One-tensor launcher on base tensors plus element offsets; blocksize: elements per 8-bit state block (also
    the row width of the 32-bit update's tile)."""
    if n == 0:
        return
    grid = (triton.cdiv(triton.cdiv(n, blocksize), ROWS),)
    _adamw_kernel[grid](p, g, p_off, n, s1, s2, s1_off, s2_off, am1, am2, am1_off, am2_off, qmap1, qmap2,
                        k.beta1, k.beta2, k.one_minus_beta1, k.one_minus_beta2, k.step_size, k.eps_hat,
                        k.decay, k.bias_c2_sqrt, QUANT=quant, ROWS=ROWS, BLOCK=blocksize, num_warps=4)


def launch_multi(seg_table, addr_table, blk_table, nblk: int, anchor: torch.Tensor, aligned: bool,
                 page: torch.Tensor, qmap1, qmap2, k, quant: bool, blocksize: int) -> None:
    """Multi-tensor launcher: every segment of one page (same state bits, param dtype and coefficients).

    seg_table int64 (nseg, 8), blk_table int32 (nblk, 2) live on the device (static per page);
    addr_table int64 (nparams, 2) holds this step's param / grad element offsets from `anchor` (a tensor of
    the params' dtype); `aligned` says all of them are multiples of 16 bytes; page is the uint8 page buffer.
    """
    if nblk == 0:
        return
    f32 = page.view(torch.float32)
    grid = (triton.cdiv(nblk, ROWS),)
    _adamw_multi_kernel[grid](seg_table, addr_table, blk_table, nblk, anchor, page if quant else f32, f32,
                              qmap1, qmap2, k.beta1, k.beta2, k.one_minus_beta1, k.one_minus_beta2, k.step_size,
                              k.eps_hat, k.decay, k.bias_c2_sqrt, ALIGNED=aligned, VEC=16 // anchor.element_size(),
                              QUANT=quant, ROWS=ROWS, BLOCK=blocksize, num_warps=4)


def adamw8bit(p: torch.Tensor, g: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor,
              absmax1: torch.Tensor, absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor, k,
              blocksize: int) -> None:
    """Triton twin of ops/adamw.adamw8bit_ref (its arguments plus the block size; flat contiguous tensors, in
    place)."""
    launch(p, g, 0, p.numel(), state1, state2, 0, 0, absmax1, absmax2, 0, 0, qmap1, qmap2, k, True, blocksize)


def adamw32(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, k,
            blocksize: int) -> None:
    """Triton twin of ops/adamw.adamw32_ref (its arguments plus the tile row width; flat contiguous tensors, fp32
    states, in place)."""
    launch(p, g, 0, p.numel(), exp_avg, exp_avg_sq, 0, 0, exp_avg, exp_avg, 0, 0, exp_avg, exp_avg, k, False,
           blocksize)
