"""Decode / small-batch fused 4-bit linear: y (M, N) = x (M, K) @ dequantize(q).T + bias for M = 1..128.

Reference: `qlora_core.linear.dequantize_as` + `torch.nn.functional.linear` (the CPU path of nf4_linear).

Design
- At small M the op is bound by reading the weight: 0.5 byte/element of codes (+ ~1/64 byte of 8-bit absmax)
  against 2 bytes/element for cuBLAS on a bf16 weight, so the ceiling is ~3.7x cuBLAS. Each program owns
  BLOCK_N output features and a K range of UNROLL sub-tiles of 2*HC columns (HC <= blocksize/2, so one
  absmax per row per sub-tile). Codes are read as 16-byte vectors and split into the high nibble (even
  columns) and low nibble (odd columns): no interleaving, each pairs with x[2j] / x[2j+1].
- Memory parallelism comes from many resident programs, not from software pipelining: Triton does not
  pipeline these loads usefully (a lut[code] gather depends on the code load; with num_stages > 1 the gathers
  became 4-byte cp.async copies), so the K range is split over SPLIT_K programs (~8 per SM) that atomically
  add fp32 partials, then one cast to x's dtype.
- M == 1: CUDA-core dot product in fp32 with the unrounded fp32 W = lut * absmax, scaled once per row and
  sub-tile. (The tensor-core paths round W to x's dtype, as dequantize(q) does; both are within the tolerance
  against the exact float64 product; see tests/test_linear_interpret.py.)
- 2 <= M <= 128 (BLOCK_M = next power of two >= 16): swap-AB, y.T tile = W tile @ x.T on the tensor cores
  with W rounded to x's dtype (dequantize(q)'s values; see the absmax note in nf4_tile); rows of x beyond M are masked to zero.
- fp32 x uses input_precision="ieee" (tf32 would be 3e-4 relative, outside the fp32 tolerance).
Limits: forward only, M <= 128 (the input gradient uses nf4_matmul's transposed kernel).
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
            # x is read contiguously (vector loads) and split into even / odd columns in registers; in the
            # aligned layout a sub-tile is wholly inside K or wholly past it, so the mask is constant over it.
            offs_c = kk + tl.arange(0, C)
            if ALIGNED:
                cmask = (offs_c * 0 + kk) < K  # constant over the tile (a tensor: see nf4_tile.load_pair_tile)
            else:
                cmask = offs_c < K
            if BLOCK_M == 1:
                xv = tl.load(x_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
                x_e, x_o = tl.split(tl.reshape(xv, (HC, 2)))
                # fp32 W (lut * absmax, unrounded): scale once per row and absmax block
                acc += a[:, None] * (v_e * x_e[None, :] + v_o * x_o[None, :])
            else:
                xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :],
                             mask=(offs_m < M)[:, None] & cmask, other=0.0)
                x_e, x_o = tl.split(tl.reshape(xv, (BLOCK_M, HC, 2)))
                w_e = cast_rne(v_e * a[:, None], xv.dtype)  # exactly dequantize(q) in x's dtype
                w_o = cast_rne(v_o * a[:, None], xv.dtype)
                acc = mma(w_e, tl.trans(x_e), acc)
                acc = mma(w_o, tl.trans(x_o), acc)
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
    """x (M, K) contiguous, 1 <= M <= 128 -> (M, N) in x's dtype. Block sizes default to the tuned table."""
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
    (1, torch.bfloat16): (32, 2, 4, 1), (1, torch.float16): (32, 2, 4, 1), (1, torch.float32): (32, 2, 4, 1),
    (16, torch.bfloat16): (64, 2, 4, 1), (16, torch.float16): (64, 2, 4, 1), (16, torch.float32): (32, 1, 4, 1),
}
