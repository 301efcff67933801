"""Shared Triton pieces of the fused 4-bit matmuls: load a (R, C) tile of W = dequantize(q) straight from the
packed codes and the (nested) absmax, the absmax restore, and the interpreter-safe cast and dot.

Reference: `qlora_core.quant.dequantize` / `qlora_core.reference.dequantize_4bit_ref` (W[n, k] =
dtype(lut[code(n*K + k)] * absmax[(n*K + k) // blocksize]), absmax restored as code256[qa] * nested[b >> 8]
+ offset for double quant, `QuantizedTensor.absmax_fp32`).

Design
- `load_pair_tile` (the matmuls): for an aligned layout (K % blocksize == 0: every real checkpoint) a
  sub-tile of <= blocksize columns lies in one absmax block per row, so the codes are read as 16-byte
  vectors (alignment hint; rows start on 16-byte boundaries) and used as two halves, high nibbles = even
  columns and low nibbles = odd columns, with one restored absmax per row: no join/reshape in hot loops.
- Generic layouts (odd K; blocks straddle rows): flat index n*K + k per element, one byte and one absmax
  gather per element. Correct for every shape, used only by shapes no model has (tests hit it).
- The 16-entry table is read with `tl.load(lut_ptr + code)`: 64 bytes that stay in L1 for the whole kernel.
- NOTE: the fused kernels let LLVM contract code256*nested + offset into one FMA, so a restored absmax may
  differ from `absmax_fp32()` by 1 ulp of fp32 (then rounded to bf16/fp16 with W: rarely visible; the fused
  paths are held to the matmul tolerance, not to bit-exactness). The dequantize-then-cuBLAS path uses
  kernels/quant4.dequantize_4bit, which matches `dequantize(q)` bit for bit.
Limits: q 2-D with N*K < 2**31 (the format's own limit, int32 indexing); blocksize a power of two.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_core.formats import code_table, dynamic_map

from .common import INTERPRET, cast_rne, mma  # noqa: F401 (re-exported for the tile kernels)


def q_args(q) -> tuple:
    """Kernel pointer arguments of a QuantizedTensor: (data, absmax, code256, nested, offset, lut, DQ)."""
    data = q.data.reshape(-1)
    lut = code_table(q.quant_type, q.device)
    if q.double_quant:
        return (data, q.absmax, dynamic_map(True, q.device), q.nested_absmax, q.offset.reshape(1), lut, True)
    return (data, q.absmax, q.absmax, q.absmax, q.absmax, lut, False)  # unused pointers: any tensor


@triton.jit
def _absmax_at(absmax_ptr, code256_ptr, nested_ptr, offset_ptr, b, mask, DQ: tl.constexpr):
    """fp32 absmax of block indices `b` (any shape)."""
    if DQ:
        qa = tl.load(absmax_ptr + b, mask=mask, other=0).to(tl.int32)
        a = tl.load(code256_ptr + qa) * tl.load(nested_ptr + (b >> 8), mask=mask, other=0.0)
        a = a + tl.load(offset_ptr)
    else:
        a = tl.load(absmax_ptr + b, mask=mask, other=0.0)
    return a


@triton.jit
def absmax_load(absmax_ptr, nested_ptr, b, mask, DQ: tl.constexpr):
    """The memory reads of `_absmax_at` without its dependent table lookup, for kernels that prefetch: a
    gather that depends on a load just issued would stall the prefetch. Returns (raw, nested) for
    `absmax_finish`: (8-bit code as int32, nested fp32) with double quant, else (fp32 absmax, same)."""
    if DQ:
        qa = tl.load(absmax_ptr + b, mask=mask, other=0).to(tl.int32)
        return qa, tl.load(nested_ptr + (b >> 8), mask=mask, other=0.0)
    else:
        a = tl.load(absmax_ptr + b, mask=mask, other=0.0)
        return a, a


@triton.jit
def absmax_finish(raw, nest, code256_ptr, offset_ptr, DQ: tl.constexpr):
    """fp32 absmax from `absmax_load`'s reads (the same value `_absmax_at` gives)."""
    if DQ:
        return tl.load(code256_ptr + raw) * nest + tl.load(offset_ptr)
    else:
        return raw


@triton.jit
def load_pair_tile(data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr, lut_ptr,
                   offs_r, k0, N, K,
                   HC: tl.constexpr, BS: tl.constexpr, DQ: tl.constexpr, ALIGNED: tl.constexpr):
    """Columns k0 + 2j ("even") and k0 + 2j + 1 ("odd"), j < HC, of W's rows offs_r, without interleaving.

    Returns (v_even (R, HC), v_odd (R, HC), a (R,)) with W = v * a[:, None] in fp32; rows >= N and columns
    >= K give 0. Aligned path (K % BS == 0, 2*HC <= BS, k0 % (2*HC) == 0): the columns lie in one absmax
    block per row, so v is the bare table value (lut[byte >> 4], lut[byte & 15]: one byte load feeds both
    halves, no join/reshape) and a the row's absmax, restored once per row. Generic path: v already scaled
    (per-element byte and absmax gathers) and a = 1. Callers pair v_even with x[..., k0 + 2j] and v_odd with
    x[..., k0 + 2j + 1], so the dot products never need the interleaved order.
    """
    cj = tl.arange(0, HC)
    rmask = offs_r < N
    if ALIGNED:
        # K % C == 0 here, so a sub-tile is either wholly inside K or (an unrolled step past K) wholly out:
        # a row-constant mask keeps the loads vectorizable. (k0 < K is compared as a tensor: triton 3.9's
        # interpreter turns `bool tensor & scalar comparison` into an int32 mask, which its loads reject.)
        rin = rmask & ((offs_r * 0 + k0) < K)
        mask = rin[:, None] & (cj[None, :] < HC)
        # Row starts are 16-byte aligned (K % 32 == 0 since K % BS == 0, BS >= 32; k0 % 32 == 0): telling
        # the compiler turns 1-byte loads into 16-byte vector loads.
        base = tl.multiple_of(offs_r * (K // 2) + k0 // 2, 16)
        byts = tl.load(data_ptr + base[:, None] + cj[None, :], mask=mask, other=0)
        v_even = tl.load(lut_ptr + (byts >> 4).to(tl.int32))
        v_odd = tl.load(lut_ptr + (byts & 0xF).to(tl.int32))
        a = _absmax_at(absmax_ptr, code256_ptr, nested_ptr, offset_ptr, offs_r * (K // BS) + k0 // BS,
                       rin, DQ)
    else:
        col = k0 + 2 * cj
        idx = offs_r[:, None] * K + col[None, :]
        m_e = rmask[:, None] & (col[None, :] < K)
        m_o = rmask[:, None] & (col[None, :] + 1 < K)
        b_e = tl.load(data_ptr + (idx >> 1), mask=m_e, other=0).to(tl.int32)
        b_o = tl.load(data_ptr + ((idx + 1) >> 1), mask=m_o, other=0).to(tl.int32)
        c_e = (b_e >> ((1 - (idx & 1)) * 4)) & 0xF
        c_o = (b_o >> ((1 - ((idx + 1) & 1)) * 4)) & 0xF
        a_e = _absmax_at(absmax_ptr, code256_ptr, nested_ptr, offset_ptr, idx // BS, m_e, DQ)
        a_o = _absmax_at(absmax_ptr, code256_ptr, nested_ptr, offset_ptr, (idx + 1) // BS, m_o, DQ)
        v_even = tl.where(m_e, tl.load(lut_ptr + c_e) * a_e, 0.0)
        v_odd = tl.where(m_o, tl.load(lut_ptr + c_o) * a_o, 0.0)
        a = tl.full((offs_r.shape[0],), 1.0, tl.float32)
    return v_even, v_odd, a
