"""Small-batch fused 4-bit linear on the tensor cores: y (M, N) = x (M, K) @ dequantize(q).T + bias, 2 <= M <= 128.

Reference: `qlora_core.linear.dequantize_as` + `torch.nn.functional.linear` (the CPU path of nf4_linear);
tests/test_linear_interpret.py and tests/test_gpu_linear.py hold it to the float64 product.

Design
- At small M the op reads the weight once and is bound by decoding it (kernels/nf4_gemv.py, which gathers
  the table per code, ran at 0.74-0.83x cuBLAS at M = 16 on an H100). Here the codes are decoded in registers
  (kernels/nf4_regdecode.py: t = lut/2 + 3 from `prmt` byte lookups), scaled to W = 2 * a * (t - 3) =
  t * 2a - 6a (one FMA) and rounded to x's dtype, i.e. dequantize(q)'s values (up to the 2**-14 table
  exactness, which can move a rounding by one ulp); the products run on the tensor cores (swap-AB:
  y.T tile = W tile @ x.T tile, so BLOCK_M may be as small as 16).
- A word of codes decodes to 8 columns in the order [1, 0, 3, 2, 5, 4, 7, 6]; they are joined back into column
  order in registers (nf4_regdecode.decode_columns, as in kernels/nf4_gemv1.py), so a thread holds 8
  consecutive columns of W and the tile reaches the MMA's shared-memory operand in 16-byte stores: one dot of
  K = 64 * NB per step. The first version ran one dot per decode slot (column 8w + j of every word, x loaded
  with stride 8): 8 small dots and ~6x the shared-memory stores and barriers, 17-29% slower on an H200
  (docs/benchmarks.md).
- One launch; split-K (when N / BLOCK_N gives too few programs) goes through kernels/splitk.py (not bitwise
  reproducible then).
Limits: bf16/fp16 x, K % blocksize == 0, blocksize >= 64; other cases use kernels/nf4_gemv.py.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from qlora_core import backend

from . import splitk
from .nf4_regdecode import ASM, decodable, decode_columns, load_code_words, load_tables, tables
from .nf4_tile import absmax_finish, cast_rne, mma, q_args


@triton.jit
def _gemv_mma_kernel(x_ptr, out_ptr, bias_ptr, data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr,
                     tlut_ptr, tab_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_om,
                     ASM: tl.constexpr, USE_ASM: tl.constexpr, BS: tl.constexpr, DQ: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                     SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    rmask = offs_n < N
    ob = tl.arange(0, NB)
    oc = tl.arange(0, NB * 64)     # the step's columns
    b_lo, b_hi = splitk.k_blocks(pid_k, K, NB, SPLIT_K)
    row_w = tl.multiple_of(offs_n * (K // 8), 8)
    xrow = (offs_m * stride_xm)[None, :]
    tab = load_tables(tab_ptr)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # loads of step i + 1 issued before step i is decoded (see kernels/nf4_gemv1.py)
    w_n, r_n, n_n = load_code_words(data_ptr, absmax_ptr, nested_ptr, offs_n, rmask, row_w, b_lo + ob, b_hi, K,
                                    BS, DQ)
    for b0 in range(b_lo, b_hi, NB):
        w, raw, nest = w_n, r_n, n_n
        w_n, r_n, n_n = load_code_words(data_ptr, absmax_ptr, nested_ptr, offs_n, rmask, row_w, b0 + NB + ob, b_hi,
                                        K, BS, DQ)
        a = absmax_finish(raw, nest, code256_ptr, offset_ptr, DQ)
        a2 = (2.0 * a)[:, :, None, None]
        a6 = (6.0 * a)[:, :, None, None]
        tt = decode_columns(w, tlut_ptr, tab, ASM, USE_ASM)       # (BN, NB, 8 words, 8 columns), column order
        wt = cast_rne(tt * a2 - a6, dt)                            # dequantize(q)'s values
        xt = tl.load(x_ptr + xrow + (b0 * 64 + oc)[:, None],                  # (NB*64, BLOCK_M) = x[m, k].T
                     mask=((b0 + oc // 64) < b_hi)[:, None] & (offs_m < M)[None, :], other=0.0)
        acc = mma(tl.reshape(wt, (BLOCK_N, NB * 64)), xt, acc)
    ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    omask = (offs_m[None, :] < M) & rmask[:, None]
    bias = tl.load(bias_ptr + offs_n, mask=rmask, other=0.0).to(tl.float32)[:, None] if HAS_BIAS else 0.0
    # split-K workspace rows are M-strided: ws[m * N + n]
    splitk.store(acc, bias, ptrs, ws_ptr + offs_m[None, :] * N + offs_n[:, None], omask, cnt_ptr, pid_n, SPLIT_K)


def supports(x: torch.Tensor, q) -> bool:
    """True when this kernel handles (x, q): 1..128 rows, and nf4_regdecode.decodable (bf16/fp16, aligned)."""
    return 1 <= x.shape[0] <= 128 and decodable(x, q)


class MmaConfig(NamedTuple):
    """Tiling of the small-M tensor-core kernel (a plain tuple in the same order works too)."""
    block_n: int = 64  # weight rows (output features) per program: the MMA's M side (swap-AB)
    nb: int = 2  # 64-column absmax blocks per K step: one dot of K = 64 * nb
    num_warps: int = 4
    num_stages: int = 1


# BLOCK_M (rows of x, rounded up) -> tiling: at BLOCK_M = 16, with split-K 8, the best sum over the three 8B shapes
# of 10 tilings x splits 1-8 on an H200 (17.5 / 43.6 / 41.3 us; (64, 4) with split 4 was within 3%,
# docs/benchmarks.md); larger BLOCK_M are not dispatched (dequantize + cuBLAS is faster there).
DEFAULT_CONFIG = {16: MmaConfig(), 32: MmaConfig(), 64: MmaConfig(), 128: MmaConfig(num_warps=8)}
DEFAULT_SPLIT_K = 8
INTERPRETER_CONFIG = MmaConfig(16, 2, 1, 1)  # small tiles: the interpreter runs every program in Python


def gemv_mma(x: torch.Tensor, q, bias: torch.Tensor | None, config: MmaConfig | tuple | None = None,
             split_k: int | None = None, use_asm: bool | None = None) -> torch.Tensor:
    """x (M, K) contiguous bf16/fp16 with M <= 128, q (N, K) 4-bit, K % blocksize == 0 -> y (M, N) in x's dtype.

    config: an MmaConfig (default DEFAULT_CONFIG[BLOCK_M]); split_k defaults to DEFAULT_SPLIT_K K splits (at most
    one per K step); use_asm defaults to True off the interpreter.
    """
    if not supports(x, q):
        raise ValueError(f"gemv_mma needs 1..128 bf16/fp16 rows, K % blocksize == 0 and blocksize >= 64; got x "
                         f"{tuple(x.shape)} {x.dtype}, q {tuple(q.shape)} blocksize {q.blocksize}")
    m, k = x.shape
    n = q.shape[0]
    block_m = max(16, triton.next_power_of_2(m))
    interp = backend.interpreting()
    if use_asm is None:
        use_asm = not interp
    block_n, nb, num_warps, num_stages = config or (INTERPRETER_CONFIG if interp else DEFAULT_CONFIG[block_m])
    if split_k is None:
        split_k = min(DEFAULT_SPLIT_K, triton.cdiv(k // 64, nb))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws, cnt = splitk.workspace(x.device, m * n, triton.cdiv(n, block_n)) if split_k > 1 else (out, out)
    data, absmax, code256, nested, offset, _lut, dq = q_args(q)
    tlut, tab = tables(q.quant_type, x.device)
    _gemv_mma_kernel[(triton.cdiv(n, block_n), split_k)](
        x, out, bias if bias is not None else out, data.view(torch.int32), absmax, code256, nested, offset,
        tlut, tab, ws, cnt, m, n, k, x.stride(0), out.stride(0),
        ASM=ASM, USE_ASM=use_asm, BS=q.blocksize, DQ=dq, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, NB=nb, SPLIT_K=split_k, num_warps=num_warps, num_stages=num_stages)
    return out
