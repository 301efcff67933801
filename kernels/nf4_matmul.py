"""Tiled fused 4-bit matmuls: forward y = x @ W.T + bias and the input gradient dx = dy @ W, W = dequantize(q).

Reference: `qlora_core.linear.dequantize_as` + `torch.nn.functional.linear` / `dy @ W` (nf4_linear's CPU path).

Design
- Classic tiled GEMM (grouped program order for L2 reuse of x tiles); the W operand is not loaded from a
  bf16 weight but dequantized in registers from the packed codes (`nf4_tile.load_pair_tile`: 16-byte code
  loads split into high nibbles = even columns and low nibbles = odd columns, one absmax per row per
  sub-tile of <= blocksize columns), rounded to x's dtype (dequantize(q)'s values, up to the 1-ulp absmax note in nf4_tile) and fed to tl.dot
  with fp32 accumulation: y += x_even @ W_even.T + x_odd @ W_odd.T, so no nibble interleaving is needed.
- Forward reduces over K: W tile (BLOCK_N, BLOCK_K), used transposed (or, SWAP_AB, y.T = W @ x.T with W as
  the A operand). The input gradient reduces over N: the W tile (BLOCK_N, BLOCK_K) is already the
  (reduction, output) operand; dx's even and odd columns accumulate separately and are interleaved once in
  the epilogue. Both read the same contiguous code bytes; no transposed copy of the codes is ever made.
- Measured on an H100 (docs/benchmarks.md) these lose to dequantize + cuBLAS except dx at small M for
  K >= 2N: each element costs a table gather plus ~10 instructions on the CUDA cores, not overlapped with
  the MMAs, and Triton's pipeliner cannot prefetch a gather that depends on the code load (with
  num_stages > 1 it turned the gathers into 4-byte cp.async copies, 10x slower), so num_stages = 1.
  kernels/nf4_linear.py decides which path runs.
- Hopper configs: autotuned per (M bucket, N, K, DQ, layout) over the table below; fp32 and the interpreter
  (CPU tests) run one small fixed config; the interpreter upcasts dot operands to fp32 (tl.dot on bf16 is
  wrong there). QLORA_CORE_AUTOTUNE=0 uses the table's first row (GPU tests, compile time).
- fp32 x uses input_precision="ieee" so fp32 results keep fp32 accuracy (tf32 would not meet the tolerance).
Limits: x / dy row-major with unit stride along the reduction; N*K < 2**31.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from qlora_core import backend

from .nf4_tile import cast_rne, load_pair_tile, mma, q_args


@triton.jit
def _tile_ids(M, NOUT, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row tiles walk the output columns together (x / dy tiles stay in L2)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_o = tl.cdiv(NOUT, BLOCK_O)
    width = GROUP_M * grid_o
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_o = (pid % width) // size_m
    return pid_m, pid_o


@triton.jit
def _fwd_kernel(x_ptr, out_ptr, bias_ptr, data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr, lut_ptr,
                M, N, K, stride_xm, stride_om, M_BUCKET,
                BS: tl.constexpr, DQ: tl.constexpr, ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                SWAP_AB: tl.constexpr = False):
    # sub-tiles of C columns lie inside one absmax block per row (aligned layouts)
    C: tl.constexpr = BS if (ALIGNED and BLOCK_K > BS) else BLOCK_K
    HC: tl.constexpr = C // 2
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T tile: W is the register (A) operand
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        for u in tl.static_range(BLOCK_K // C):
            kk = k0 + u * C
            offs_k = kk + tl.arange(0, C)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            x_e, x_o = tl.split(tl.reshape(x, (BLOCK_M, HC, 2)))  # columns kk + 2j, kk + 2j + 1
            v_e, v_o, a = load_pair_tile(data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr, lut_ptr,
                                         offs_n, kk, N, K, HC, BS, DQ, ALIGNED)
            w_e = cast_rne(v_e * a[:, None], x.dtype)  # (BLOCK_N, HC), exactly dequantize(q)'s values
            w_o = cast_rne(v_o * a[:, None], x.dtype)
            if SWAP_AB:
                acc = mma(w_e, tl.trans(x_e), acc)
                acc = mma(w_o, tl.trans(x_o), acc)
            else:
                acc = mma(x_e, tl.trans(w_e), acc)
                acc = mma(x_o, tl.trans(w_o), acc)
    b = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    if SWAP_AB:
        if HAS_BIAS:
            acc += b[:, None]
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], cast_rne(acc, out_ptr.dtype.element_ty),
                 mask=mask)
    else:
        if HAS_BIAS:
            acc += b[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], cast_rne(acc, out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _dx_kernel(dy_ptr, out_ptr, data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr, lut_ptr,
               M, N, K, stride_dm, stride_om, M_BUCKET,
               BS: tl.constexpr, DQ: tl.constexpr, ALIGNED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # the output tile's BLOCK_K columns must sit in one absmax block per row for the aligned loader
    PAIR_ALIGNED: tl.constexpr = ALIGNED and BLOCK_K <= BS
    HC: tl.constexpr = BLOCK_K // 2
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    acc_e = tl.zeros((BLOCK_M, HC), dtype=tl.float32)  # dx columns k0 + 2j
    acc_o = tl.zeros((BLOCK_M, HC), dtype=tl.float32)  # dx columns k0 + 2j + 1
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dm + offs_n[None, :],
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        v_e, v_o, a = load_pair_tile(data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr, lut_ptr,
                                     offs_n, k0, N, K, HC, BS, DQ, PAIR_ALIGNED)
        acc_e = mma(dy, cast_rne(v_e * a[:, None], dy.dtype), acc_e)
        acc_o = mma(dy, cast_rne(v_o * a[:, None], dy.dtype), acc_o)
    acc = tl.reshape(tl.join(acc_e, acc_o), (BLOCK_M, BLOCK_K))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :], cast_rne(acc, out_ptr.dtype.element_ty),
             mask=mask)


def _configs(kind: str, small_m: bool) -> list:
    # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). num_stages=1: with more stages Triton's
    # pipeliner turns the table gathers (lut[code]) into 4-byte cp.async copies through shared memory (seen
    # in the PTX; 10x slower). Small output tiles keep >= 1 wave of programs at M <= 128; large tiles
    # amortise the dequantize at large M (each W tile is decoded once per BLOCK_M rows). For dx the output
    # tile is BLOCK_K wide and BLOCK_N is the reduction step.
    if kind == "fwd":
        rows = ([(16, 32, 128, 1, 4, 1), (16, 64, 128, 1, 4, 1), (32, 64, 128, 1, 4, 1), (16, 32, 256, 1, 4, 1)]
                if small_m else
                [(64, 64, 128, 8, 4, 1), (128, 32, 128, 8, 4, 1), (128, 64, 64, 8, 4, 1), (64, 128, 64, 8, 4, 1),
                 (128, 128, 64, 8, 8, 1), (128, 256, 64, 8, 8, 1), (256, 128, 64, 8, 8, 1)])
    else:
        rows = ([(16, 128, 64, 1, 4, 1), (16, 64, 64, 1, 4, 1), (16, 256, 32, 1, 4, 1), (32, 128, 64, 1, 4, 1)]
                if small_m else
                [(64, 128, 64, 8, 4, 1), (128, 64, 64, 8, 4, 1), (128, 128, 64, 8, 8, 1), (64, 64, 64, 8, 4, 1),
                 (256, 64, 64, 8, 8, 1), (128, 64, 32, 8, 4, 1)])
    cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
            for bm, bn, bk, g, w, s in rows]
    if kind == "fwd":
        # swap-AB: y.T = W @ x.T so the dequantized W tile is the MMA's A operand (registers on Hopper)
        sw = ([(32, 64, 128, 1, 4, 1), (64, 128, 64, 8, 4, 1)] if small_m else
              [(128, 128, 64, 8, 8, 1), (256, 128, 64, 8, 8, 1), (128, 256, 64, 8, 8, 1)])
        cfgs += [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g, "SWAP_AB": True},
                               num_warps=w, num_stages=s) for bm, bn, bk, g, w, s in sw]
    return cfgs


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, small_m: bool):
    base = _fwd_kernel if kind == "fwd" else _dx_kernel
    # The dequantize (lut gather + scale) dominates the inner loop; the tuner sees it per shape.
    return triton.autotune(configs=_configs(kind, small_m), key=["M_BUCKET", "N", "K", "DQ", "ALIGNED"])(base)


def _fixed_config(kind: str, m: int, dtype: torch.dtype) -> dict | None:
    """A fixed config instead of autotuning: small tiles in the interpreter and for fp32 (the ieee fp32 dot
    needs 4-byte tiles in shared memory: the bf16 table's 256-wide tiles overflow the 227 KB); the table's
    first row when QLORA_CORE_AUTOTUNE=0 (GPU tests, to keep compile time down); None = autotune."""
    if backend.interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, GROUP_M=2)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    if os.environ.get("QLORA_CORE_AUTOTUNE", "1") == "0":
        c = _configs(kind, m <= 64)[0]
        return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    return None


def _bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def matmul_fwd(x: torch.Tensor, q, bias: torch.Tensor | None, config: dict | None = None) -> torch.Tensor:
    """x (M, K) contiguous -> (M, N) = x @ dequantize(q).T + bias, in x's dtype."""
    m, k = x.shape
    n = q.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    data, absmax, code256, nested, offset, lut, dq = q_args(q)
    args = (x, out, bias if bias is not None else out, data, absmax, code256, nested, offset, lut,
            m, n, k, x.stride(0), out.stride(0), _bucket(m))
    flags = dict(BS=q.blocksize, DQ=dq, ALIGNED=(k % q.blocksize == 0), HAS_BIAS=bias is not None)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    config = config or _fixed_config("fwd", m, x.dtype)
    if config is not None:
        _fwd_kernel[grid](*args, **flags, **config)
    else:
        _tuned("fwd", m <= 64)[grid](*args, **flags)
    return out


def matmul_dx(dy: torch.Tensor, q, config: dict | None = None) -> torch.Tensor:
    """dy (M, N) contiguous -> dx (M, K) = dy @ dequantize(q), in dy's dtype."""
    m, n = dy.shape
    k = q.shape[1]
    out = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    data, absmax, code256, nested, offset, lut, dq = q_args(q)
    args = (dy, out, data, absmax, code256, nested, offset, lut, m, n, k, dy.stride(0), out.stride(0), _bucket(m))
    flags = dict(BS=q.blocksize, DQ=dq, ALIGNED=(k % q.blocksize == 0))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
    config = config or _fixed_config("dx", m, dy.dtype)
    if config is not None:
        _dx_kernel[grid](*args, **flags, **config)
    else:
        _tuned("dx", m <= 64)[grid](*args, **flags)
    return out
