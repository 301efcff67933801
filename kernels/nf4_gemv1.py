"""Decode kernel for one row of x: y (1, N) = x (1, K) @ dequantize(q).T + bias, table held in registers.

Reference: `qlora_core.linear.dequantize_as` + `torch.nn.functional.linear` (the CPU path of nf4_linear);
tests/test_linear_interpret.py and tests/test_gpu_linear.py hold it to the float64 product.

Why a second decode kernel (kernels/nf4_gemv.py is the general one, M = 1..128): at M = 1 the op reads 0.5
byte per weight, so on an H100 it has to retire ~4 weights per byte read, and the general kernel spends
12-15 instructions per weight (two table gathers through L1 per code byte, unpacking, scaling): it ran
at 480-700 GB/s, issue-bound. Here each 32-bit word of codes (8 weights) is decoded in registers with
PTX byte permutes (`prmt`), ~4 instructions per weight, and nothing but the codes and absmax is loaded.

The decode (kernels/nf4_regdecode.py) yields t = v / 2 + 3 for a table value v = lut[c], exact to 2**-14.
- sum_k x_k v_k = 2 * (sum_k x_k t_k - 3 * sum_k x_k): the correction is per word (8 weights) and shared
  by all rows of the tile, so a weight costs one FMA on top of its decode.
- Column order inside a word: byte j holds column 2j in its high nibble and 2j+1 in its low nibble
  (bitsandbytes' packing), so the 8 decoded values are columns [1, 0, 3, 2, 5, 4, 7, 6] of the word; they
  are joined back into column order in registers (tl.join adds an in-thread dimension), so x is used as
  loaded, 16 bytes at a time.
- Loads are pipelined by hand: the codes, absmax bytes and x of step i + 1 are issued before step i is
  decoded, and the absmax table lookup (a gather that depends on a load) happens at use, not in the prefetch.

Tiling: a program owns BLOCK_N rows and walks K in steps of NB absmax blocks of 64 columns (8 words per
row per block: one absmax per (row, block), broadcast over its words). Split-K (for enough resident warps
when N is small) stays one launch (kernels/splitk.py; not bitwise reproducible).
USE_ASM=False decodes with a table gather of the same t values (the interpreter cannot run PTX).
Limits: bf16/fp16 x, K % blocksize == 0, blocksize >= 64 (every real checkpoint); other cases use
kernels/nf4_gemv.py.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from qlora_core import backend

from . import splitk
from .nf4_regdecode import ASM, decodable, decode_columns, load_code_words, load_tables, tables
from .nf4_tile import absmax_finish, q_args


@triton.jit
def _load_step(x_ptr, data_ptr, absmax_ptr, nested_ptr, offs_n, rmask, row_w, blk, b_hi,
               K, BS: tl.constexpr, DQ: tl.constexpr):
    """Codes (BN, NB, 8 words) int32, the absmax reads (BN, NB) (see nf4_tile.absmax_load) and x (NB, 8 words,
    8 columns) fp32 of the 64-column blocks `blk` (NB,); blocks >= b_hi and rows >= N read as 0."""
    ow = tl.arange(0, 8)
    bmask = blk < b_hi
    w, raw, nest = load_code_words(data_ptr, absmax_ptr, nested_ptr, offs_n, rmask, row_w, blk, b_hi, K, BS, DQ)
    xv = tl.load(x_ptr + (blk * 64)[:, None, None] + (ow * 8)[None, :, None] + ow[None, None, :],
                 mask=bmask[:, None, None], other=0.0).to(tl.float32)
    return w, raw, nest, xv


@triton.jit
def _gemv1_kernel(x_ptr, out_ptr, bias_ptr, data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr, tlut_ptr,
                  tab_ptr, ws_ptr, cnt_ptr, N, K,
                  ASM: tl.constexpr, USE_ASM: tl.constexpr, BS: tl.constexpr, DQ: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, SPLIT_K: tl.constexpr,
                  PREFETCH: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = offs_n < N
    ob = tl.arange(0, NB)          # 64-column blocks of a step
    b_lo, b_hi = splitk.k_blocks(pid_k, K, NB, SPLIT_K)
    row_w = tl.multiple_of(offs_n * (K // 8), 8)  # first code word of each row: 32-byte aligned (K % 64 == 0)
    acc = tl.zeros((BLOCK_N, NB, 8), dtype=tl.float32)
    tab = load_tables(tab_ptr)
    # Software pipelining by hand: the loads of step i + 1 are issued before step i is decoded, so each warp
    # keeps one step of codes in flight while it computes (Triton's pipeliner does not touch this loop).
    w_n, r_n, n_n, x_n = _load_step(x_ptr, data_ptr, absmax_ptr, nested_ptr, offs_n, rmask, row_w, b_lo + ob, b_hi,
                                    K, BS, DQ)
    for b0 in range(b_lo, b_hi, NB):
        w, raw, nest, xv = w_n, r_n, n_n, x_n
        if PREFETCH:
            w_n, r_n, n_n, x_n = _load_step(x_ptr, data_ptr, absmax_ptr, nested_ptr, offs_n, rmask, row_w,
                                            b0 + NB + ob, b_hi, K, BS, DQ)
        else:
            w, raw, nest, xv = _load_step(x_ptr, data_ptr, absmax_ptr, nested_ptr, offs_n, rmask, row_w, b0 + ob,
                                          b_hi, K, BS, DQ)
        a = absmax_finish(raw, nest, code256_ptr, offset_ptr, DQ)  # (BN, NB); the table gather hits L1
        # the 8 slots joined back into column order, so x is used as loaded: (BN, NB, 8 words, 8 columns) * x[None]
        tt = decode_columns(w, tlut_ptr, tab, ASM, USE_ASM)
        d = tl.sum(tt * xv[None, :, :, :], axis=3) - 3.0 * tl.sum(xv, axis=2)[None, :, :]
        acc += a[:, :, None] * d
    out = 2.0 * tl.sum(tl.sum(acc, axis=2), axis=1)
    bias = tl.load(bias_ptr + offs_n, mask=rmask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    splitk.store(out, bias, out_ptr + offs_n, ws_ptr + offs_n, rmask, cnt_ptr, pid_n, SPLIT_K)


def supports(x: torch.Tensor, q) -> bool:
    """True when this kernel handles (x, q): one row, and nf4_regdecode.decodable (bf16/fp16, aligned layout)."""
    return x.shape[0] == 1 and decodable(x, q)


class Gemv1Config(NamedTuple):
    """Tiling of the one-row kernel (a plain tuple in the same order works too). The defaults are the best of
    benchmarks/bench_matmul.py --tune-gemv1 on all three 8B shapes on an H100 (docs/benchmarks.md)."""
    block_n: int = 8  # rows per program
    nb: int = 8  # 64-column absmax blocks per K step (8 words of codes per row and block)
    num_warps: int = 2
    num_stages: int = 1  # no effect measured: Triton does not pipeline this loop (prefetch does it by hand)
    prefetch: bool = True  # issue step i + 1's loads before decoding step i


DEFAULT_CONFIG = Gemv1Config()
INTERPRETER_CONFIG = Gemv1Config(4, 2, 1, 1, True)  # small tiles: the interpreter runs every program in Python


def default_split(n_tiles: int, k_steps: int) -> int:
    """Programs along K: 1 once there are >= 256 row tiles (split-K measured slower at N = 4096, 14336 on an
    H100); for smaller N enough K splits for ~256 programs, at most 8 and at most one per K step."""
    split = 1
    while n_tiles * split < 256 and split < 8 and split * 2 <= k_steps:
        split *= 2
    return split


def gemv1(x: torch.Tensor, q, bias: torch.Tensor | None, config: Gemv1Config | tuple | None = None,
          split_k: int | None = None, use_asm: bool | None = None) -> torch.Tensor:
    """x (1, K) contiguous bf16/fp16, q (N, K) 4-bit with K % blocksize == 0 -> y (1, N) in x's dtype.

    config: a Gemv1Config (default DEFAULT_CONFIG); split_k defaults to `default_split`; use_asm defaults to
    True off the interpreter.
    """
    if not supports(x, q):
        raise ValueError(f"gemv1 needs one bf16/fp16 row, K % blocksize == 0 and blocksize >= 64; got x "
                         f"{tuple(x.shape)} {x.dtype}, q {tuple(q.shape)} blocksize {q.blocksize}")
    n, k = q.shape
    interp = backend.interpreting()
    if use_asm is None:
        use_asm = not interp
    block_n, nb, num_warps, num_stages, prefetch = config or (INTERPRETER_CONFIG if interp else DEFAULT_CONFIG)
    if split_k is None:
        split_k = default_split(triton.cdiv(n, block_n), triton.cdiv(k // 64, nb))
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    ws, cnt = splitk.workspace(x.device, n, triton.cdiv(n, block_n)) if split_k > 1 else (out, out)
    data, absmax, code256, nested, offset, _lut, dq = q_args(q)
    tlut, tab = tables(q.quant_type, x.device)
    grid = (triton.cdiv(n, block_n), split_k)
    _gemv1_kernel[grid](
        x, out, bias if bias is not None else out, data.view(torch.int32), absmax, code256, nested, offset,
        tlut, tab, ws, cnt, n, k,
        ASM=ASM, USE_ASM=use_asm, BS=q.blocksize, DQ=dq, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, NB=nb, SPLIT_K=split_k, PREFETCH=bool(prefetch), num_warps=num_warps,
        num_stages=num_stages)
    return out

