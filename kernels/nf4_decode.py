"""Shared NF4 decode of the fused 4-bit linear kernels (kernels/nf4_linear.py): the tables they read, a weight's
kernel arguments, the absmax restore, the table-gather tile loader and the register decode.

Reference: W[n, k] = dtype(lut[code(n*K + k)] * absmax[(n*K + k) // blocksize]), the absmax restored as
code256[qa] * nested[b >> 8] + offset for double quant (`dequantize_as` and `QuantizedTensor.absmax_fp32` in
qlora_core/ops/quant4.py). This folder imports nothing from qlora_core: the caller passes the format's tables as
`Tables`, built once per (quant type, device) by `tables` from the CPU tables (qlora_core/ops/nf4_linear.py).

Table gathers (`load_pair_tile`, the generic decode kernel and the tiled dx kernel)
- Aligned layout (K % blocksize == 0: every real checkpoint): a sub-tile of <= blocksize columns lies in one
  absmax block per row, so the codes are read as 16-byte vectors (alignment hint; rows start on 16-byte
  boundaries) and used as two halves, high nibbles = even columns and low nibbles = odd columns, with one
  restored absmax per row: no join/reshape in hot loops.
- Generic layouts (odd K; blocks straddle rows): flat index n*K + k per element, one byte and one absmax
  gather per element. Correct for every shape, used only by shapes no model has (tests hit it).
- The 16-entry table is read with `tl.load(lut_ptr + code)`: 64 bytes that stay in L1 for the whole kernel.
- NOTE: the fused kernels let LLVM contract code256*nested + offset into one FMA, so a restored absmax may
  differ from `absmax_fp32()` by 1 ulp of fp32 (then rounded to bf16/fp16 with W: rarely visible; the fused
  paths are held to the matmul tolerance, not to bit-exactness). The dequantize-then-cuBLAS path uses
  kernels/quant4.dequantize_4bit, which matches `dequantize(q)` bit for bit.

Register decode (the M = 1..16 decode kernels): one 32-bit word (8 codes) -> 8 fp32 values with PTX byte
permutes. Why: a table gather per code (served by L1) costs several instructions and an L1 wavefront per weight,
and the decode-bound kernels (small M) were issue-bound at 480-700 GB/s on an H100.
- A weight's table value v = lut[c] (|v| <= 1) is represented as t = v / 2 + 3, which lies in [2.5, 3.5]:
  every t has the fp32 exponent of 2.0, so its fp32 bits are 0x40 | b2 | b1 | 0x00 with two code-dependent
  bytes (the top 15 mantissa bits; t is rounded to a multiple of 2**-14, so v = 2 * (t - 3) is exact to
  2**-14, finer than the bf16/fp16 rounding dequantize(q) itself applies). Two 16-entry byte tables (b2, b1)
  fit in 8 registers; `prmt` looks up 4 codes per instruction pair (selector = code & 7, then a third
  `prmt` picks the half by code bit 3), two more interleave b2/b1 and one per weight adds the constant bytes:
  ~4 instructions per weight.
- Column order inside a word: byte j holds column 2j in its high nibble and 2j+1 in its low nibble
  (bitsandbytes' packing), so the 8 decoded values are columns [1, 0, 3, 2, 5, 4, 7, 6] of the word.
- USE_ASM=False decodes with a 16-entry fp32 table of the same t values (the interpreter cannot run PTX).
tests/test_nf4_linear_ptx.py runs the PTX in an emulator against the table; tests/test_gpu_nf4_linear.py compares
the compiled PTX with the table path bit for bit.
Limits: q 2-D with N*K < 2**31 (the format's own limit, int32 indexing); blocksize a power of two.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_T_STEP = 2.0 ** -14  # spacing of fp32 values with 15 mantissa bits in [2, 4)


# -- the tables and a weight's kernel arguments ------------------------------------------------------------------------
class Tables(NamedTuple):
    """The tables the kernels read for one 4-bit quant type, on one device (built by `tables`)."""
    lut: torch.Tensor      # (16,) fp32 code table: W = lut[code] * absmax
    dequant: torch.Tensor  # (16,) fp32 dequantize levels (FP4 code 8 is -0.0): kernels/quant4.dequantize_4bit's
    code256: torch.Tensor  # (256,) fp32 signed dynamic map: restores a double-quantized absmax
    tlut: torch.Tensor     # (16,) fp32 register-decode values t = lut / 2 + 3 (`t_values`)
    tab: torch.Tensor      # (8,) int32 register-decode byte tables, b2 then b1 (`byte_tables`)


def t_values(lut: torch.Tensor) -> list[float]:
    """The 16 decoded values t = lut[c] / 2 + 3 of a CPU code table, rounded to a multiple of 2**-14 (exact in
    fp32)."""
    return [round((v / 2.0 + 3.0) / _T_STEP) * _T_STEP for v in lut.double().tolist()]


def byte_tables(lut: torch.Tensor) -> tuple[list[int], list[int]]:
    """(b2 table, b1 table) of a CPU code table: 4 little-endian words each, byte c = that byte of t_c's fp32
    bits."""
    bits = [struct.unpack("<I", struct.pack("<f", t))[0] for t in t_values(lut)]
    assert all(b >> 24 == 0x40 and b & 0xFF == 0 for b in bits), "t outside [2, 4) or too many mantissa bits"
    b2 = [(b >> 16) & 0xFF for b in bits]
    b1 = [(b >> 8) & 0xFF for b in bits]
    words = lambda bs: [bs[4 * i] | bs[4 * i + 1] << 8 | bs[4 * i + 2] << 16 | bs[4 * i + 3] << 24 for i in range(4)]
    return words(b2), words(b1)


def tables(lut: torch.Tensor, dequant: torch.Tensor, code256: torch.Tensor, device) -> Tables:
    """The Tables on `device` from the format's CPU fp32 tables: code table and dequantize levels (16,), the
    signed dynamic map (256,). Build once per (quant type, device): it copies to the device."""
    b2, b1 = byte_tables(lut)
    words = [w - (1 << 32) if w >= 1 << 31 else w for w in b2 + b1]
    return Tables(lut.to(device), dequant.to(device), code256.to(device),
                  torch.tensor(t_values(lut), dtype=torch.float32, device=device),
                  torch.tensor(words, dtype=torch.int32, device=device))


def q_args(q, t: Tables) -> tuple:
    """Kernel pointer arguments of a 4-bit weight q (a QuantizedTensor) and its tables:
    (data, absmax, code256, nested, offset, lut, DQ)."""
    data = q.data.reshape(-1)
    if q.double_quant:
        return (data, q.absmax, t.code256, q.nested_absmax, q.offset.reshape(1), t.lut, True)
    return (data, q.absmax, q.absmax, q.absmax, q.absmax, t.lut, False)  # unused pointers: any tensor


# -- absmax restore and the table-gather tile loader -------------------------------------------------------------------
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


# -- register decode ---------------------------------------------------------------------------------------------------
def _decode_asm() -> str:
    """PTX: one 32-bit word of codes ($8) and the 8 byte-table words ($9..$16: b2 then b1, 4 each) -> 8 fp32
    bit patterns ($0..$7) of columns [1, 0, 3, 2, 5, 4, 7, 6]. The tables come in as registers loaded once
    per program: as immediates ptxas re-materialised them before every use (one extra instruction per weight)."""
    lines = ["{", ".reg .b32 kc, w, q, s, lo, hi, b2, b1, x, y;",
             "mov.b32 kc, 0x00000040;"]  # byte 4 of a prmt pair = 0x40 (the exponent byte), byte 5 = 0x00
    for shift, out in ((0, 0), (16, 4)):
        lines += [
            f"shr.u32 w, $8, {shift};",
            "and.b32 q, w, 0x7777;",                 # selectors: code & 7 for 4 codes
            "shr.u32 s, w, 1;",
            "and.b32 s, s, 0x4444;",                 # code bit 3 -> +4: take the byte from the upper table half
            "or.b32 s, s, 0x3210;",
            "prmt.b32 lo, $9, $10, q;", "prmt.b32 hi, $11, $12, q;", "prmt.b32 b2, lo, hi, s;",
            "prmt.b32 lo, $13, $14, q;", "prmt.b32 hi, $15, $16, q;", "prmt.b32 b1, lo, hi, s;",
            "prmt.b32 x, b1, b2, 0x5140;",           # [b2_1 b1_1 b2_0 b1_0]
            "prmt.b32 y, b1, b2, 0x7362;",           # [b2_3 b1_3 b2_2 b1_2]
            f"prmt.b32 ${out + 0}, x, kc, 0x4105;",  # [0x40 b2_0 b1_0 0x00]
            f"prmt.b32 ${out + 1}, x, kc, 0x4325;",
            f"prmt.b32 ${out + 2}, y, kc, 0x4105;",
            f"prmt.b32 ${out + 3}, y, kc, 0x4325;",
        ]
    lines.append("}")
    return "\n".join(lines)


ASM = _decode_asm()


@triton.jit
def decode_word(w, tlut_ptr, tab, ASM: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 word of 8 codes -> 8 fp32 t values for columns [1, 0, 3, 2, 5, 4, 7, 6] of the word.
    tab: the 8 byte-table words (int32 scalars) for the PTX path."""
    if USE_ASM:
        r = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                                      [w, tab[0], tab[1], tab[2], tab[3], tab[4], tab[5], tab[6], tab[7]],
                                      dtype=(tl.int32,) * 8, is_pure=True, pack=1)
        return (r[0].to(tl.float32, bitcast=True), r[1].to(tl.float32, bitcast=True),
                r[2].to(tl.float32, bitcast=True), r[3].to(tl.float32, bitcast=True),
                r[4].to(tl.float32, bitcast=True), r[5].to(tl.float32, bitcast=True),
                r[6].to(tl.float32, bitcast=True), r[7].to(tl.float32, bitcast=True))
    else:
        return (tl.load(tlut_ptr + (w & 0xF)), tl.load(tlut_ptr + ((w >> 4) & 0xF)),
                tl.load(tlut_ptr + ((w >> 8) & 0xF)), tl.load(tlut_ptr + ((w >> 12) & 0xF)),
                tl.load(tlut_ptr + ((w >> 16) & 0xF)), tl.load(tlut_ptr + ((w >> 20) & 0xF)),
                tl.load(tlut_ptr + ((w >> 24) & 0xF)), tl.load(tlut_ptr + ((w >> 28) & 0xF)))


@triton.jit
def decode_columns(w, tlut_ptr, tab, ASM: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 words (BN, NB, 8) -> fp32 t values (BN, NB, 8 words, 8 columns) in column order: `decode_word`'s 8
    slots joined back in registers (tl.join adds an in-thread dimension, so a thread ends up holding a word's 8
    consecutive columns). Flat column = 4i + 2j + s for join levels (i, j, s), so the innermost join pairs
    even/odd columns."""
    t1, t0, t3, t2, t5, t4, t7, t6 = decode_word(w, tlut_ptr, tab, ASM, USE_ASM)
    tt = tl.join(tl.join(tl.join(t0, t4), tl.join(t2, t6)), tl.join(tl.join(t1, t5), tl.join(t3, t7)))
    return tl.reshape(tt, (w.shape[0], w.shape[1], 8, 8))


def decodable(x: torch.Tensor, q) -> bool:
    """True when the register-decode kernels can run (x, q): bf16/fp16 x (the decoded values are exact to 2**-14,
    finer than bf16/fp16 weights but not fp32's 2**-24), blocksize >= 64 and K % blocksize == 0 (every real
    checkpoint), so each 64-column block of a row has one absmax."""
    return x.dtype in (torch.bfloat16, torch.float16) and q.blocksize >= 64 and q.shape[1] % q.blocksize == 0


@triton.jit
def load_tables(tab_ptr):
    """The 8 byte-table words (int32 scalars, b2 then b1) for `decode_word`'s PTX path, read once per program."""
    return (tl.load(tab_ptr + 0), tl.load(tab_ptr + 1), tl.load(tab_ptr + 2), tl.load(tab_ptr + 3),
            tl.load(tab_ptr + 4), tl.load(tab_ptr + 5), tl.load(tab_ptr + 6), tl.load(tab_ptr + 7))


@triton.jit
def load_code_words(data_ptr, absmax_ptr, nested_ptr, offs_n, rmask, row_w, blk, b_hi, K, BS: tl.constexpr,
                    DQ: tl.constexpr):
    """Codes (BN, NB, 8 words) int32 of rows offs_n and 64-column blocks `blk` (NB,) from the packed data viewed
    as int32 (row_w = first word of each row), and the absmax reads (BN, NB) (`absmax_load`; for
    blocksize > 64 neighbouring 64-column blocks share one). Blocks >= b_hi and masked rows read as 0."""
    ow = tl.arange(0, 8)
    bmask = blk < b_hi
    w = tl.load(data_ptr + row_w[:, None, None] + (blk * 8)[None, :, None] + ow[None, None, :],
                mask=rmask[:, None, None] & bmask[None, :, None], other=0)
    raw, nest = absmax_load(absmax_ptr, nested_ptr, offs_n[:, None] * (K // BS) + (blk * 64 // BS)[None, :],
                            rmask[:, None] & bmask[None, :], DQ)
    return w, raw, nest
