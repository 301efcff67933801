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
- 2 <= M <= 128 (BLOCK_M = next power of two >= 16): the dequantized tile (rounded to x's dtype, exactly dequantize(q)'s values) goes to the
  tensor cores with the rows padded to 16 (mma needs M >= 16); the padding costs nothing measurable since
  the work is memory bound.
- fp32 x uses input_precision="ieee" (tf32 would be 3e-4 relative, outside the fp32 tolerance).
Limits: forward only, M <= 128 (dx at small M uses nf4_matmul's transposed kernel with BLOCK_M = 16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_core import backend

from .nf4_tile import cast_rne, load_pair_tile, mma, q_args


@triton.jit
def _gemv_kernel(x_ptr, out_ptr, bias_ptr, data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr, lut_ptr,
                 M, N, K, stride_xm, stride_om,
                 BS: tl.constexpr, DQ: tl.constexpr, ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HC: tl.constexpr, UNROLL: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    C: tl.constexpr = 2 * HC  # columns per sub-tile (<= blocksize: one absmax per row)
    STEP: tl.constexpr = C * UNROLL
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    cj = tl.arange(0, HC)
    tiles = tl.cdiv(tl.cdiv(K, STEP), SPLIT_K)
    k_lo = pid_k * tiles * STEP
    k_hi = tl.minimum(K, k_lo + tiles * STEP)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, HC), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T tile (swap-AB: W is the A operand)
    for k0 in range(k_lo, k_hi, STEP):
        for u in tl.static_range(UNROLL):
            kk = k0 + u * C
            v_e, v_o, a = load_pair_tile(data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr, lut_ptr,
                                         offs_n, kk, N, K, HC, BS, DQ, ALIGNED)
            col = kk + 2 * cj
            if BLOCK_M == 1:
                x_e = tl.load(x_ptr + col, mask=col < K, other=0.0).to(tl.float32)
                x_o = tl.load(x_ptr + col + 1, mask=col + 1 < K, other=0.0).to(tl.float32)
                # fp32 W (lut * absmax, unrounded): scale once per row and absmax block
                acc += a[:, None] * (v_e * x_e[None, :] + v_o * x_o[None, :])
            else:
                xm = (offs_m[None, :] < M) & (col[:, None] < K)
                x_e = tl.load(x_ptr + offs_m[None, :] * stride_xm + col[:, None], mask=xm, other=0.0)
                x_o = tl.load(x_ptr + offs_m[None, :] * stride_xm + col[:, None] + 1,
                              mask=(offs_m[None, :] < M) & (col[:, None] + 1 < K), other=0.0)
                w_e = cast_rne(v_e * a[:, None], x_e.dtype)  # exactly dequantize(q) in x's dtype
                w_o = cast_rne(v_o * a[:, None], x_e.dtype)
                acc = mma(w_e, x_e, acc)
                acc = mma(w_o, x_o, acc)
    if BLOCK_M == 1:
        out = tl.sum(acc, axis=1)
    else:
        out = acc
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            b = tl.where(pid_k == 0, b, 0.0)
        if BLOCK_M == 1:
            out += b
        else:
            out += b[:, None]
    if BLOCK_M == 1:
        ptrs = out_ptr + offs_n
        mask = offs_n < N
    else:
        ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if SPLIT_K > 1:
        tl.atomic_add(ptrs, out, mask=mask)
    else:
        tl.store(ptrs, cast_rne(out, out_ptr.dtype.element_ty), mask=mask)


def _split_k(n_tiles: int, k_steps: int) -> int:
    """Programs along K: enough programs for ~8 per SM (132 SMs on an H100), each >= 1 step of the K loop.

    The per-step loads (codes, then the table gathers that depend on them) are not software-pipelined, so
    memory parallelism comes from many resident programs: measured 405 GB/s with 2 programs per SM.
    """
    split = 1
    while n_tiles * split < 1056 and split * 2 <= k_steps:
        split *= 2
    return split


def gemv(x: torch.Tensor, q, bias: torch.Tensor | None, block_n: int | None = None, unroll: int | None = None,
         num_warps: int | None = None, split_k: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """x (M, K) contiguous, 1 <= M <= 16 -> (M, N) in x's dtype. Block sizes default to the tuned table."""
    m, k = x.shape
    n = q.shape[0]
    if not 1 <= m <= 128:
        raise ValueError(f"gemv handles 1..128 rows, got M={m}")
    block_m = 1 if m == 1 else max(16, triton.next_power_of_2(m))
    aligned = k % q.blocksize == 0
    if backend.interpreting():
        cfg = (16, 2, 4, 1)
    else:
        cfg = _TUNED.get((block_m, x.dtype), (64, 1, 4, 1))
    block_n = block_n or cfg[0]
    unroll = unroll or cfg[1]
    num_warps = num_warps or cfg[2]
    num_stages = num_stages or cfg[3]
    hc = min(q.blocksize, 64) // 2 if aligned else 32  # sub-tile of <= 64 columns inside one absmax block
    n_tiles = triton.cdiv(n, block_n)
    split = split_k or _split_k(n_tiles, triton.cdiv(k, 2 * hc * unroll))
    split = min(split, triton.cdiv(k, 2 * hc * unroll))
    if split > 1:
        out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    data, absmax, code256, nested, offset, lut, dq = q_args(q)
    _gemv_kernel[(n_tiles, split)](
        x, out, bias if bias is not None else out, data, absmax, code256, nested, offset, lut,
        m, n, k, x.stride(0), out.stride(0),
        BS=q.blocksize, DQ=dq, ALIGNED=aligned, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, HC=hc, UNROLL=unroll, SPLIT_K=split,
        num_warps=num_warps, num_stages=num_stages)
    return out if split == 1 else out.to(x.dtype)


# (BLOCK_M, dtype) -> (BLOCK_N, UNROLL, num_warps, num_stages), measured on an H100 by
# benchmarks/bench_matmul.py --tune (docs/benchmarks.md). num_stages=1 on the MMA paths: with more stages
# Triton's pipeliner turns the table gathers into 4-byte cp.async copies through shared memory (seen in
# the PTX), which made M=16 ~10x slower.
_TUNED: dict = {
    (1, torch.bfloat16): (32, 4, 4, 1), (1, torch.float16): (32, 4, 4, 1), (1, torch.float32): (32, 4, 4, 1),
    (16, torch.bfloat16): (64, 1, 4, 1), (16, torch.float16): (64, 1, 4, 1), (16, torch.float32): (32, 1, 4, 1),
}
