"""Triton kernels of the 4-bit linear: y = x @ W.T + bias and dx = dy @ W with W = dequantize(q), and the one place
that picks which runs on the Triton backend, by M (rows of x) and the shape.

Reference: `qlora_core/ops/nf4_linear.py`'s CPU path (F.linear on `dequantize_as(q, x.dtype)`); every path here
returns the same function of (x, q, bias) within the matmul tolerance of the exact float64 product. The cuBLAS path
uses W bit-exact with dequantize(q), the tensor-core paths dequantize(q)'s values up to a 1-ulp absmax contraction
(kernels/nf4_decode.py), the register-decode paths the table values to 2**-14. The format's tables come from the
caller as `nf4_decode.Tables` (this folder imports nothing from qlora_core).

Paths (forward y = x @ W.T + bias; input gradient dx = dy @ W). The branches are named in FWD_BRANCHES and
DX_BRANCHES and picked in one place (`fwd_branch`, `dx_branch`); `path=` forces one (tests run each on the CPU):
- "gemv"   (forward, M <= GEMV_MAX_M, the decode family): reads the packed weight directly. bf16/fp16 x on an
           aligned layout (K % blocksize == 0, blocksize >= 64) decodes the codes in registers (nf4_decode.py):
           one row in "gemv1" (CUDA cores), 2..16 rows in "gemv_mma" (tensor cores); everything else goes to
           "gemv_generic" (the `gemv` kernel, table gathers). path="gemv" lets `decode_branch` pick among the three.
- "tiled"  (dx at small M with K >= 2N): `matmul_dx`, dequantize fused into the tiles of a transposed GEMM.
- "cublas" (everything else, and all fp32): kernels/quant4.dequantize_4bit (the library's dequantizer,
  ~92% of copy bandwidth on an H100) into a buffer of x's dtype, then cuBLAS. At large M the GEMM is
  compute bound (2*M*N*K flops against one N*K dequantize pass, ~4-9% extra at M = 4096 on an H100) and
  cuBLAS' Hopper GEMM (wgmma + TMA, warp-specialised) outruns Triton GEMMs whose dequantize (one table
  gather per element) is not overlapped with the MMAs: a fused tiled forward kernel lost everywhere
  (74-310 us at M = 128 against 31-118 us) and was removed.
  NOTE: the buffer is a local of this call, dropped before returning: the caching allocator reuses its
  memory for the next layer, but no dense weight outlives the op (peak memory grows by one N*K weight of
  x's dtype only while the op runs; bench_nf4_linear.py reports kept = 0 MB).
Tile sizes follow kernels/common.TILING (the GPU's measured tiles, or small ones under the interpreter; tests force
either). The thresholds are measured by benchmarks/bench_nf4_linear.py (docs/benchmarks.md); `path=` overrides for tests
and the benchmark. Training goes through neither: its grouped projections dequantize into one buffer and call
cuBLAS from qlora_core/ops/nf4_linear.py (the decode kernels serve inference at M <= 16).

Why decode kernels at small M: the op is bound by reading the weight, 0.5 byte/element of codes (+ ~1/64 byte
of 8-bit absmax) against 2 bytes/element for cuBLAS on a bf16 weight, so the ceiling is ~3.7x cuBLAS. Triton does
not pipeline these loads usefully (a lut[code] gather depends on the code load; with num_stages > 1 the gathers
became 4-byte cp.async copies through shared memory, ~10x slower at M = 16), so memory parallelism comes from
many resident programs (split-K, kernels/splitk.py) and, in the register-decode kernels, loads of step i + 1
issued by hand before step i is decoded.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import quant4, splitk
from .common import TILING, cast_rne, interpreting, mma
from .nf4_decode import (ASM, Tables, absmax_finish, decodable, decode_columns, load_code_words, load_pair_tile,
                         load_tables, q_args)

# Forward: the decode kernels up to this M; above it dequantize + cuBLAS. Measured on an H100 (docs/benchmarks.md):
# at M = 128 the decode kernel took 111-165 us against 31-118 us for dequantize + cuBLAS.
GEMV_MAX_M = 16
# Input gradient: the fused transposed kernel only for small M with K >= 2N (down-projection shape: 79 us
# against 107 us at M = 1..16); everywhere else dequantize + cuBLAS was faster.
DX_TILED_MAX_M = 16


# The kernels each direction can run (see the header); fwd_branch / dx_branch pick one, `path=` forces one.
FWD_BRANCHES = ("gemv1", "gemv_mma", "gemv_generic", "cublas")
DX_BRANCHES = ("tiled", "cublas")


def choose_path(direction: str, m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """"gemv" (the decode family) | "tiled" | "cublas" for this direction ("fwd" or "dx"), M and (N, K). fp32
    always takes "cublas": Triton's ieee fp32 dot is slow and cuBLAS fp32 is the reference's own arithmetic."""
    if dtype == torch.float32:
        return "cublas"
    if direction == "fwd":
        return "gemv" if m <= GEMV_MAX_M else "cublas"
    return "tiled" if (m <= DX_TILED_MAX_M and k >= 2 * n) else "cublas"


def decode_branch(x: torch.Tensor, q) -> str:
    """The decode kernel of FWD_BRANCHES that serves x (M, K): register decode where the layout allows it."""
    if gemv1_supports(x, q):
        return "gemv1"
    return "gemv_mma" if mma_supports(x, q) else "gemv_generic"


def fwd_branch(x: torch.Tensor, q) -> str:
    """The one of FWD_BRANCHES that linear_forward runs for x (M, K) and q (N, K)."""
    if choose_path("fwd", x.shape[0], q.shape[0], q.shape[1], x.dtype) == "cublas":
        return "cublas"
    return decode_branch(x, q)


def dx_branch(dy: torch.Tensor, q) -> str:
    """The one of DX_BRANCHES that linear_input_grad runs for dy (M, N) and q (N, K)."""
    return choose_path("dx", dy.shape[0], q.shape[0], q.shape[1], dy.dtype)


_FWD_PATHS = (*FWD_BRANCHES, "gemv")  # what path= takes: a branch, or the decode family ("gemv", choose_path's name)


def _check_path(path: str | None, direction: str) -> None:
    allowed = _FWD_PATHS if direction == "fwd" else DX_BRANCHES
    if path is not None and path not in allowed:
        raise ValueError(f"unknown {direction} path {path!r}; expected one of {allowed}")


def linear_forward(x: torch.Tensor, q, t: Tables, bias: torch.Tensor | None, path: str | None = None) -> torch.Tensor:
    """x (M, K) contiguous on the GPU (or CPU under TRITON_INTERPRET=1), q (N, K) with its tables t -> (M, N) in
    x's dtype."""
    _check_path(path, "fwd")
    if x.shape[0] == 0:
        return x.new_empty((0, q.shape[0]))
    path = fwd_branch(x, q) if path is None else decode_branch(x, q) if path == "gemv" else path
    # a forced decode kernel that cannot serve x raises its own "needs" error
    if path == "gemv1":
        return gemv1(x, q, t, bias)
    if path == "gemv_mma":
        return gemv_mma(x, q, t, bias)
    if path == "gemv_generic":
        return gemv(x, q, t, bias)
    w = quant4.dequantize_4bit(q, t.dequant, t.code256, dtype=x.dtype)  # (N, K), freed on return
    return torch.nn.functional.linear(x, w, bias)


def linear_input_grad(dy: torch.Tensor, q, t: Tables, path: str | None = None) -> torch.Tensor:
    """dy (M, N) contiguous -> dx (M, K) = dy @ dequantize(q) in dy's dtype."""
    _check_path(path, "dx")
    if dy.shape[0] == 0:
        return dy.new_zeros((0, q.shape[1]))
    path = path or dx_branch(dy, q)
    if path == "tiled":
        return matmul_dx(dy, q, t)
    w = quant4.dequantize_4bit(q, t.dequant, t.code256, dtype=dy.dtype)  # (N, K), freed on return
    return dy @ w


# -- gemv: the generic decode kernel (table gathers), any layout and dtype, M = 1..128 ---------------------------------
# Each program owns BLOCK_N output features and a K range of UNROLL sub-tiles of 2*HC columns (HC <= blocksize/2,
# so one absmax per row per sub-tile; codes read as 16-byte vectors, nf4_decode.load_pair_tile). M == 1: a
# CUDA-core dot product in fp32 with the unrounded fp32 W = lut * absmax, scaled once per row and sub-tile. 2 <= M
# <= 128 (BLOCK_M = next power of two >= 16): swap-AB, y.T tile = W tile @ x.T on the tensor cores with W rounded
# to x's dtype (dequantize(q)'s values); rows of x beyond M are masked to zero. fp32 x uses input_precision="ieee"
# (tf32 would be 3e-4 relative, outside the fp32 tolerance). Split-K as gemv1 / gemv_mma (kernels/splitk.py).
@triton.jit
def _gemv_kernel(x_ptr, out_ptr, bias_ptr, data_ptr, absmax_ptr, code256_ptr, nested_ptr, offset_ptr, lut_ptr,
                 ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_om,
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
                cmask = (offs_c * 0 + kk) < K  # constant over the tile (a tensor: see nf4_decode.load_pair_tile)
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
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        if BLOCK_M > 1:
            bias = bias[:, None]
    if BLOCK_M == 1:
        ptrs = out_ptr + offs_n
        ws = ws_ptr + offs_n
        mask = offs_n < N
    else:
        ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        ws = ws_ptr + offs_m[None, :] * N + offs_n[:, None]  # slots are (M, N) row-major
        mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    splitk.store(out, bias, ptrs, ws, mask, cnt_ptr, pid_n, pid_k, M * N, SPLIT_K)


def _gemv_split(n_tiles: int, k_steps: int) -> int:
    """Programs along K: enough programs for ~8 per SM (132 SMs on an H100), each >= 1 step of the K loop.

    The per-step loads (codes, then the table gathers that depend on them) are not software-pipelined, so
    memory parallelism comes from many resident programs: measured 405 GB/s with 2 programs per SM.
    """
    split = 1
    while n_tiles * split < 1056 and split * 2 <= k_steps:
        split *= 2
    return split


# (BLOCK_M, dtype) -> (BLOCK_N, UNROLL, num_warps, num_stages), measured on an H100 by
# benchmarks/bench_nf4_linear.py --tune (docs/benchmarks.md). num_stages=1 on the MMA paths: with more stages
# Triton's pipeliner turns the table gathers into 4-byte cp.async copies through shared memory (seen in
# the PTX), which made M=16 ~10x slower.
GEMV_TUNED: dict = {
    (1, torch.bfloat16): (32, 2, 4, 1), (1, torch.float16): (32, 2, 4, 1), (1, torch.float32): (32, 2, 4, 1),
    (16, torch.bfloat16): (64, 2, 4, 1), (16, torch.float16): (64, 2, 4, 1), (16, torch.float32): (32, 1, 4, 1),
}


def gemv(x: torch.Tensor, q, t: Tables, bias: torch.Tensor | None, block_n: int | None = None,
         unroll: int | None = None, num_warps: int | None = None, split_k: int | None = None,
         num_stages: int | None = None) -> torch.Tensor:
    """x (M, K) contiguous, 1 <= M <= 128 -> (M, N) in x's dtype. Block sizes default to GEMV_TUNED."""
    m, k = x.shape
    n = q.shape[0]
    if not 1 <= m <= 128:
        raise ValueError(f"gemv handles 1..128 rows, got M={m}")
    block_m = 1 if m == 1 else max(16, triton.next_power_of_2(m))
    aligned = k % q.blocksize == 0
    if TILING[-1] == "interpreter":
        cfg = (16, 2, 4, 1)
    else:
        cfg = GEMV_TUNED.get((block_m, x.dtype), (64, 1, 4, 1))
    block_n = block_n or cfg[0]
    unroll = unroll or cfg[1]
    num_warps = num_warps or cfg[2]
    num_stages = num_stages or cfg[3]
    hc = min(q.blocksize, 64) // 2 if aligned else 32  # sub-tile of <= 64 columns inside one absmax block
    n_tiles = triton.cdiv(n, block_n)
    split = split_k or _gemv_split(n_tiles, triton.cdiv(k, 2 * hc * unroll))
    split = min(split, triton.cdiv(k, 2 * hc * unroll))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws, cnt = splitk.workspace(x.device, split * m * n, n_tiles) if split > 1 else (out, out)
    data, absmax, code256, nested, offset, lut, dq = q_args(q, t)
    _gemv_kernel[(n_tiles, split)](
        x, out, bias if bias is not None else out, data, absmax, code256, nested, offset, lut, ws, cnt,
        m, n, k, x.stride(0), out.stride(0),
        BS=q.blocksize, DQ=dq, ALIGNED=aligned, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, HC=hc, UNROLL=unroll, SPLIT_K=split,
        num_warps=num_warps, num_stages=num_stages)
    return out


# -- gemv1: one row of x, codes decoded in registers (bf16/fp16, aligned layouts) --------------------------------------
# At M = 1 the op reads 0.5 byte per weight, so on an H100 it has to retire ~4 weights per byte read; `gemv`
# spends 12-15 instructions per weight (two table gathers through L1 per code byte, unpacking, scaling) and ran at
# 480-700 GB/s, issue-bound. Here each 32-bit word of codes (8 weights) is decoded in registers with `prmt`
# (nf4_decode.decode_columns: ~4 instructions per weight, t = v / 2 + 3), and only codes and absmax are loaded.
# sum_k x_k v_k = 2 * (sum_k x_k t_k - 3 * sum_k x_k): the correction is per word and shared by all rows of the
# tile, so a weight costs one FMA on top of its decode. The 8 slots are joined back into column order in registers,
# so x is used as loaded, 16 bytes at a time. Loads are pipelined by hand: codes, absmax bytes and x of step i + 1
# are issued before step i is decoded, and the absmax table lookup (a gather that depends on a load) happens at
# use. A program owns BLOCK_N rows and walks K in steps of NB absmax blocks of 64 columns (8 words per row and
# block, one absmax per (row, block)). Split-K stays one launch (kernels/splitk.py; sums in a fixed order).
@triton.jit
def _load_step(x_ptr, data_ptr, absmax_ptr, nested_ptr, offs_n, rmask, row_w, blk, b_hi,
               K, BS: tl.constexpr, DQ: tl.constexpr):
    """Codes (BN, NB, 8 words) int32, the absmax reads (BN, NB) (see nf4_decode.absmax_load) and x (NB, 8 words,
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
    splitk.store(out, bias, out_ptr + offs_n, ws_ptr + offs_n, rmask, cnt_ptr, pid_n, pid_k, N, SPLIT_K)


def gemv1_supports(x: torch.Tensor, q) -> bool:
    """True when `gemv1` handles (x, q): one row, and nf4_decode.decodable (bf16/fp16, aligned layout)."""
    return x.shape[0] == 1 and decodable(x, q)


class Gemv1Config(NamedTuple):
    """Tiling of the one-row kernel (a plain tuple in the same order works too). The defaults are the best of
    benchmarks/bench_nf4_linear.py --tune-gemv1 on all three 8B shapes on an H100 (docs/benchmarks.md)."""
    block_n: int = 8  # rows per program
    nb: int = 8  # 64-column absmax blocks per K step (8 words of codes per row and block)
    num_warps: int = 2
    num_stages: int = 1  # no effect measured: Triton does not pipeline this loop (prefetch does it by hand)
    prefetch: bool = True  # issue step i + 1's loads before decoding step i


GEMV1_CONFIG = Gemv1Config()
GEMV1_INTERPRETER_CONFIG = Gemv1Config(4, 2, 1, 1, True)  # small tiles: the interpreter runs every program in Python


def gemv1_split(n_tiles: int, k_steps: int) -> int:
    """Programs along K: 1 once there are >= 256 row tiles (split-K measured slower at N = 4096, 14336 on an
    H100); for smaller N enough K splits for ~256 programs, at most 8 and at most one per K step."""
    split = 1
    while n_tiles * split < 256 and split < 8 and split * 2 <= k_steps:
        split *= 2
    return split


def gemv1(x: torch.Tensor, q, t: Tables, bias: torch.Tensor | None, config: Gemv1Config | tuple | None = None,
          split_k: int | None = None, use_asm: bool | None = None) -> torch.Tensor:
    """x (1, K) contiguous bf16/fp16, q (N, K) 4-bit with K % blocksize == 0 -> y (1, N) in x's dtype.

    config: a Gemv1Config (default GEMV1_CONFIG); split_k defaults to `gemv1_split`; use_asm defaults to
    True off the interpreter.
    """
    if not gemv1_supports(x, q):
        raise ValueError(f"gemv1 needs one bf16/fp16 row, K % blocksize == 0 and blocksize >= 64; got x "
                         f"{tuple(x.shape)} {x.dtype}, q {tuple(q.shape)} blocksize {q.blocksize}")
    n, k = q.shape
    if use_asm is None:
        use_asm = not interpreting()  # the interpreter cannot run PTX
    small = TILING[-1] == "interpreter"
    block_n, nb, num_warps, num_stages, prefetch = config or (GEMV1_INTERPRETER_CONFIG if small else GEMV1_CONFIG)
    if split_k is None:
        split_k = gemv1_split(triton.cdiv(n, block_n), triton.cdiv(k // 64, nb))
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    ws, cnt = splitk.workspace(x.device, split_k * n, triton.cdiv(n, block_n)) if split_k > 1 else (out, out)
    data, absmax, code256, nested, offset, _lut, dq = q_args(q, t)
    grid = (triton.cdiv(n, block_n), split_k)
    _gemv1_kernel[grid](
        x, out, bias if bias is not None else out, data.view(torch.int32), absmax, code256, nested, offset,
        t.tlut, t.tab, ws, cnt, n, k,
        ASM=ASM, USE_ASM=use_asm, BS=q.blocksize, DQ=dq, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, NB=nb, SPLIT_K=split_k, PREFETCH=bool(prefetch), num_warps=num_warps,
        num_stages=num_stages)
    return out


# -- gemv_mma: 2..16 rows on the tensor cores, codes decoded in registers ----------------------------------------------
# `gemv` (table gathers) ran at 0.74-0.83x cuBLAS at M = 16 on an H100. Here the codes are decoded in registers
# (t = lut/2 + 3), scaled to W = 2 * a * (t - 3) = t * 2a - 6a (one FMA) and rounded to x's dtype, i.e.
# dequantize(q)'s values (up to the 2**-14 table exactness, which can move a rounding by one ulp); the products run
# on the tensor cores (swap-AB: y.T tile = W tile @ x.T tile, so BLOCK_M may be as small as 16). A word's 8 columns
# are joined back into column order in registers, so a thread holds 8 consecutive columns of W and the tile reaches
# the MMA's shared-memory operand in 16-byte stores: one dot of K = 64 * NB per step. (One dot per decode slot, x
# loaded with stride 8, was 17-29% slower on an H200: 8 small dots and ~6x the shared-memory stores and barriers.)
# Split-K (when N / BLOCK_N gives too few programs) stays one launch (kernels/splitk.py).
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
    # loads of step i + 1 issued before step i is decoded (as in gemv1)
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
    # split-K workspace slots are (M, N) row-major: ws[k * M * N + m * N + n]
    splitk.store(acc, bias, ptrs, ws_ptr + offs_m[None, :] * N + offs_n[:, None], omask, cnt_ptr, pid_n, pid_k,
                 M * N, SPLIT_K)


def mma_supports(x: torch.Tensor, q) -> bool:
    """True when `gemv_mma` handles (x, q): 1..128 rows, and nf4_decode.decodable (bf16/fp16, aligned)."""
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
MMA_CONFIG = {16: MmaConfig(), 32: MmaConfig(), 64: MmaConfig(), 128: MmaConfig(num_warps=8)}
MMA_SPLIT_K = 8
MMA_INTERPRETER_CONFIG = MmaConfig(16, 2, 1, 1)  # small tiles: the interpreter runs every program in Python


def gemv_mma(x: torch.Tensor, q, t: Tables, bias: torch.Tensor | None, config: MmaConfig | tuple | None = None,
             split_k: int | None = None, use_asm: bool | None = None) -> torch.Tensor:
    """x (M, K) contiguous bf16/fp16 with M <= 128, q (N, K) 4-bit, K % blocksize == 0 -> y (M, N) in x's dtype.

    config: an MmaConfig (default MMA_CONFIG[BLOCK_M]); split_k defaults to MMA_SPLIT_K K splits (at most
    one per K step); use_asm defaults to True off the interpreter.
    """
    if not mma_supports(x, q):
        raise ValueError(f"gemv_mma needs 1..128 bf16/fp16 rows, K % blocksize == 0 and blocksize >= 64; got x "
                         f"{tuple(x.shape)} {x.dtype}, q {tuple(q.shape)} blocksize {q.blocksize}")
    m, k = x.shape
    n = q.shape[0]
    block_m = max(16, triton.next_power_of_2(m))
    if use_asm is None:
        use_asm = not interpreting()  # the interpreter cannot run PTX
    small = TILING[-1] == "interpreter"
    block_n, nb, num_warps, num_stages = config or (MMA_INTERPRETER_CONFIG if small else MMA_CONFIG[block_m])
    if split_k is None:
        split_k = min(MMA_SPLIT_K, triton.cdiv(k // 64, nb))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws, cnt = splitk.workspace(x.device, split_k * m * n, triton.cdiv(n, block_n)) if split_k > 1 else (out, out)
    data, absmax, code256, nested, offset, _lut, dq = q_args(q, t)
    _gemv_mma_kernel[(triton.cdiv(n, block_n), split_k)](
        x, out, bias if bias is not None else out, data.view(torch.int32), absmax, code256, nested, offset,
        t.tlut, t.tab, ws, cnt, m, n, k, x.stride(0), out.stride(0),
        ASM=ASM, USE_ASM=use_asm, BS=q.blocksize, DQ=dq, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, NB=nb, SPLIT_K=split_k, num_warps=num_warps, num_stages=num_stages)
    return out


# -- matmul_dx: the input gradient as a tiled GEMM with W dequantized in the tiles -------------------------------------
# dx = dy @ W reduces over N: the W tile (BLOCK_N, BLOCK_K) loaded by nf4_decode.load_pair_tile (even / odd
# columns from the high / low nibbles, one absmax per row per sub-tile) is already the (reduction, output) operand,
# rounded to dy's dtype (dequantize(q)'s values, up to the 1-ulp absmax note in nf4_decode) and fed to tl.dot with
# fp32 accumulation; dx's even and odd columns accumulate separately and are interleaved once in the epilogue. No
# transposed copy of the codes is made. Grouped program order keeps dy tiles in L2. Dispatched only at small M with
# K >= 2N (down-projection shape: 79 us against 107 us for dequantize + cuBLAS at M = 1..16 on an H100); each element
# costs a table gather plus ~10 CUDA-core instructions not overlapped with the MMAs, so num_stages = 1 (more stages
# turned the gathers into 4-byte cp.async copies, 10x slower). Hopper configs: autotuned per (M bucket, N, K, DQ,
# layout) over `_DX_CONFIGS`; fp32 and the interpreter (CPU tests) run one small fixed config; QLORA_CORE_AUTOTUNE=0
# uses the table's first row (GPU tests, compile time). Limits: dy row-major with unit stride; N*K < 2**31.
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


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) by M <= 64 or not. The output tile is BLOCK_K wide
# and BLOCK_N is the reduction step. Small output tiles keep >= 1 wave of programs at M <= 128; large tiles amortise
# the dequantize at large M (each W tile is decoded once per BLOCK_M rows).
_DX_CONFIGS = {
    True: [(16, 128, 64, 1, 4, 1), (16, 64, 64, 1, 4, 1), (16, 256, 32, 1, 4, 1), (32, 128, 64, 1, 4, 1)],
    False: [(64, 128, 64, 8, 4, 1), (128, 64, 64, 8, 4, 1), (128, 128, 64, 8, 8, 1), (64, 64, 64, 8, 4, 1),
            (256, 64, 64, 8, 8, 1), (128, 64, 32, 8, 4, 1)],
}


@functools.lru_cache(maxsize=None)
def _dx_tuned(small_m: bool):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
               for bm, bn, bk, g, w, s in _DX_CONFIGS[small_m]]
    # The dequantize (lut gather + scale) dominates the inner loop; the tuner sees it per shape.
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "DQ", "ALIGNED"])(_dx_kernel)


def _dx_fixed_config(m: int, dtype: torch.dtype) -> dict | None:
    """A fixed config instead of autotuning: small tiles in the interpreter and for fp32 (the ieee fp32 dot
    needs 4-byte tiles in shared memory: the bf16 table's 256-wide tiles overflow the 227 KB); the table's
    first row when QLORA_CORE_AUTOTUNE=0 (GPU tests, to keep compile time down); None = autotune."""
    if TILING[-1] == "interpreter":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, GROUP_M=2)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    if os.environ.get("QLORA_CORE_AUTOTUNE", "1") == "0":
        bm, bn, bk, g, w, s = _DX_CONFIGS[m <= 64][0]
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=s)
    return None


def _bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def matmul_dx(dy: torch.Tensor, q, t: Tables, config: dict | None = None) -> torch.Tensor:
    """dy (M, N) contiguous -> dx (M, K) = dy @ dequantize(q), in dy's dtype."""
    m, n = dy.shape
    k = q.shape[1]
    out = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    data, absmax, code256, nested, offset, lut, dq = q_args(q, t)
    args = (dy, out, data, absmax, code256, nested, offset, lut, m, n, k, dy.stride(0), out.stride(0), _bucket(m))
    flags = dict(BS=q.blocksize, DQ=dq, ALIGNED=(k % q.blocksize == 0))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
    config = config or _dx_fixed_config(m, dy.dtype)
    if config is not None:
        _dx_kernel[grid](*args, **flags, **config)
    else:
        _dx_tuned(m <= 64)[grid](*args, **flags)
    return out
