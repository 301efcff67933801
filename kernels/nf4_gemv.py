"""Decode / small-batch fused 4-bit linear: y (M, N) = x (M, K) @ dequantize(q).T + bias for M = 1..16.

Reference: `qlora_core.linear.dequantize_as` + `torch.nn.functional.linear` (the CPU path of nf4_linear).

Design
- At M <= 16 the op is bound by reading the weight: 0.5 byte/element of codes (+ ~1/64 byte of 8-bit absmax)
  against 2 bytes/element for cuBLAS on a bf16 weight, so the ceiling is ~3.7x cuBLAS; everything else must
  stay off the critical path. Each program owns BLOCK_N output features and streams their rows of packed
  codes in (BLOCK_N, BLOCK_K/2)-byte tiles; small BLOCK_N gives N/BLOCK_N programs (>= 2 per SM for N >= 4096)
  so many independent 16-byte loads are in flight per SM. When N is small (k/v projections: N = 1024) the
  K range is split over SPLIT_K programs that atomically add fp32 partials (then one cast).
- M == 1: CUDA-core dot product with fp32 accumulation. W elements are rounded to x's dtype first (the
  function is x @ dequantize(q).T, and dequantize rounds; skipping the rounding changed bf16 results by up
  to 3 ulp and broke the tolerance). For fp32 x nothing is rounded, so lut[code] * x is summed within each
  absmax block and only then scaled: one multiply per block, not per element.
- 2 <= M <= 16: the dequantized tile (rounded to x's dtype, exactly dequantize(q)'s values) goes to the
  tensor cores with the rows padded to 16 (mma needs M >= 16); the padding costs nothing measurable since
  the work is memory bound.
- fp32 x uses input_precision="ieee" (tf32 would be 3e-4 relative, outside the fp32 tolerance).
Limits: forward only (dx at small M uses nf4_matmul's transposed kernel with BLOCK_M = 16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_core import backend

from .nf4_tile import INTERPRET, cast_rne, load_tile, load_tile_parts, q_args


@triton.jit
def _gemv_kernel(x_ptr, out_ptr, bias_ptr, data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr, lut_ptr,
                 M, N, K, stride_xm, stride_om,
                 BS: tl.constexpr, DQ: tl.constexpr, ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_k * tiles * BLOCK_K
    k_hi = tl.minimum(K, k_lo + tiles * BLOCK_K)
    NBLK: tl.constexpr = BLOCK_K // BS if BLOCK_K > BS else 1
    SUB: tl.constexpr = BLOCK_K // NBLK
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if BLOCK_M == 1:
            x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0)
            if ALIGNED and x.dtype == tl.float32:
                vals, a = load_tile_parts(data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr, lut_ptr,
                                          offs_n, k0, N, K, BLOCK_K, BS, DQ, ALIGNED)
                part = tl.sum(tl.reshape(vals * x[None, :], (BLOCK_N, NBLK, SUB)), axis=2)  # (BN, NBLK)
                acc += tl.sum(part * a, axis=1)
            else:
                w = load_tile(data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr, lut_ptr,
                              offs_n, k0, N, K, BLOCK_K, BS, DQ, ALIGNED)
                # W is dequantize(q) in x's dtype: round each element before the dot product
                w = cast_rne(w, x.dtype).to(tl.float32)
                acc += tl.sum(w * x.to(tl.float32)[None, :], axis=1)
        else:
            xm = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            w = load_tile(data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr, lut_ptr,
                          offs_n, k0, N, K, BLOCK_K, BS, DQ, ALIGNED)
            w = cast_rne(w, xm.dtype)  # exactly dequantize(q) in x's dtype
            if INTERPRET:
                acc = tl.dot(xm.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
            elif xm.dtype == tl.float32:
                acc = tl.dot(xm, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(xm, tl.trans(w), acc)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            b = tl.where(pid_k == 0, b, 0.0)
        if BLOCK_M == 1:
            acc += b
        else:
            acc += b[None, :]
    if BLOCK_M == 1:
        ptrs = out_ptr + offs_n
        mask = offs_n < N
    else:
        ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, cast_rne(acc, out_ptr.dtype.element_ty), mask=mask)


def _split_k(n_tiles: int, k_tiles: int) -> int:
    """Programs along K so that >= ~2 waves of programs exist (132 SMs on H100), each with >= 2 K tiles."""
    split = 1
    while n_tiles * split < 264 and k_tiles // (split * 2) >= 2 and split < 16:
        split *= 2
    return split


def gemv(x: torch.Tensor, q, bias: torch.Tensor | None, block_n: int | None = None, block_k: int | None = None,
         num_warps: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """x (M, K) contiguous, 1 <= M <= 16 -> (M, N) in x's dtype. Block sizes default to the tuned table."""
    m, k = x.shape
    n = q.shape[0]
    if not 1 <= m <= 16:
        raise ValueError(f"gemv handles 1..16 rows, got M={m}")
    block_m = 1 if m == 1 else 16
    if backend.interpreting():
        cfg = (8, 64, 4) if m == 1 else (16, 64, 4)
    else:
        cfg = _TUNED.get((block_m, x.dtype), (8, 512, 4))
    block_n = block_n or cfg[0]
    block_k = block_k or cfg[1]
    num_warps = num_warps or cfg[2]
    n_tiles = triton.cdiv(n, block_n)
    split = split_k or _split_k(n_tiles, triton.cdiv(k, block_k))
    if split > 1:
        out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    data, absmax, code256, nested, offset, lut, dq = q_args(q)
    _gemv_kernel[(n_tiles, split)](
        x, out, bias if bias is not None else out, data, absmax, code256, nested, offset, lut,
        m, n, k, x.stride(0), out.stride(0),
        BS=q.blocksize, DQ=dq, ALIGNED=(k % q.blocksize == 0), HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=num_warps)
    return out if split == 1 else out.to(x.dtype)


# (BLOCK_M, dtype) -> (BLOCK_N, BLOCK_K, num_warps), measured on an H100 by benchmarks/bench_matmul.py --tune.
_TUNED: dict = {
    (1, torch.bfloat16): (8, 512, 4), (1, torch.float16): (8, 512, 4), (1, torch.float32): (8, 512, 4),
    (16, torch.bfloat16): (16, 256, 4), (16, torch.float16): (16, 256, 4), (16, torch.float32): (16, 128, 4),
}
