"""Decode 4-bit codes in registers: one 32-bit word (8 codes) -> 8 fp32 values, with PTX byte permutes.

Reference: qlora_core.formats.code_table (lut) and bitsandbytes' packing (qlora_core.reference.pack_nibbles);
tests/test_regdecode_ptx.py runs the PTX in an emulator against the table, tests/test_gpu_linear.py compares the
compiled PTX with the table-gather path bit for bit.

Why: a table gather per code (tl.load(lut + code), served by L1) costs several instructions and an L1
wavefront per weight, and the decode-bound kernels (small M) were issue-bound at 480-700 GB/s on an H100.

The decoded value (the trick that makes `prmt` enough)
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
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from qlora_core.formats import code_table

from .nf4_tile import absmax_load

_T_STEP = 2.0 ** -14  # spacing of fp32 values with 15 mantissa bits in [2, 4)


def t_values(quant_type: str) -> list[float]:
    """The 16 decoded values t = lut[c] / 2 + 3, rounded to a multiple of 2**-14 (exact in fp32)."""
    lut = code_table(quant_type, "cpu").double().tolist()
    return [round((v / 2.0 + 3.0) / _T_STEP) * _T_STEP for v in lut]


def _byte_tables(quant_type: str) -> tuple[list[int], list[int]]:
    """(b2 table, b1 table): 4 little-endian words each, byte c = that byte of t_c's fp32 bits."""
    bits = [struct.unpack("<I", struct.pack("<f", t))[0] for t in t_values(quant_type)]
    assert all(b >> 24 == 0x40 and b & 0xFF == 0 for b in bits), "t outside [2, 4) or too many mantissa bits"
    b2 = [(b >> 16) & 0xFF for b in bits]
    b1 = [(b >> 8) & 0xFF for b in bits]
    words = lambda bs: [bs[4 * i] | bs[4 * i + 1] << 8 | bs[4 * i + 2] << 16 | bs[4 * i + 3] << 24 for i in range(4)]
    return words(b2), words(b1)


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


_TABLES: dict = {}


def tables(quant_type: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(t values fp32 (16,), byte-table words int32 (8,): b2 then b1) on device, cached."""
    key = (quant_type, str(device))
    if key not in _TABLES:
        b2, b1 = _byte_tables(quant_type)
        words = [w - (1 << 32) if w >= 1 << 31 else w for w in b2 + b1]
        _TABLES[key] = (torch.tensor(t_values(quant_type), dtype=torch.float32, device=device),
                        torch.tensor(words, dtype=torch.int32, device=device))
    return _TABLES[key]


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
    as int32 (row_w = first word of each row), and the absmax reads (BN, NB) (nf4_tile.absmax_load; for
    blocksize > 64 neighbouring 64-column blocks share one). Blocks >= b_hi and masked rows read as 0."""
    ow = tl.arange(0, 8)
    bmask = blk < b_hi
    w = tl.load(data_ptr + row_w[:, None, None] + (blk * 8)[None, :, None] + ow[None, None, :],
                mask=rmask[:, None, None] & bmask[None, :, None], other=0)
    raw, nest = absmax_load(absmax_ptr, nested_ptr, offs_n[:, None] * (K // BS) + (blk * 64 // BS)[None, :],
                            rmask[:, None] & bmask[None, :], DQ)
    return w, raw, nest


@triton.jit
def _decode_words_kernel(words_ptr, out_ptr, tlut_ptr, tab_ptr, n, ASM: tl.constexpr, USE_ASM: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(words_ptr + offs, mask=mask, other=0)
    tab = load_tables(tab_ptr)
    t = decode_word(w, tlut_ptr, tab, ASM, USE_ASM)
    for i in tl.static_range(8):
        tl.store(out_ptr + offs * 8 + i, t[i], mask=mask)


def decode_words(words: torch.Tensor, quant_type: str, use_asm: bool) -> torch.Tensor:
    """Decode int32 words (n,) -> (n, 8) fp32 t values in decode order [1, 0, 3, 2, 5, 4, 7, 6] (for tests)."""
    n = words.numel()
    out = torch.empty((n, 8), dtype=torch.float32, device=words.device)
    tlut, tab = tables(quant_type, words.device)
    _decode_words_kernel[(triton.cdiv(n, 256),)](words, out, tlut, tab, n, ASM=ASM, USE_ASM=use_asm, BLOCK=256)
    return out
