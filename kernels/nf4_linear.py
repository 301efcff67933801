"""The one place that picks how a 4-bit linear runs on the Triton backend: by M (rows of x) and the shape.

Reference: `qlora_core.linear` CPU path (F.linear on `dequantize_as(q, x.dtype)`); every path here returns
the same function of (x, q, bias) within the matmul tolerance, and the W values used are bit-exact with it.

Paths (forward y = x @ W.T + bias; input gradient dx = dy @ W):
- "gemv"   (forward, M <= GEMV_MAX_M): kernels/nf4_gemv.py, split-K, bound by reading the packed weight.
- "tiled"  (forward GEMV_MAX_M < M < large_m, dx M < large_m): kernels/nf4_matmul.py, dequantize fused into the tiles.
- "cublas" (M >= large_m): kernels/nf4_tile.dequantize_transient into a buffer of x's dtype, then cuBLAS.
  At large M the GEMM is compute bound (2*M*N*K flops against one N*K dequantize pass, ~3-7% extra at
  M = 4096 on an H100) and cuBLAS' Hopper GEMM (wgmma + TMA, warp-specialised) outruns a Triton GEMM whose
  B operand must go registers -> shared memory after the dequantize. NOTE: the buffer is a local of this
  call, dropped before returning: the caching allocator reuses its memory for the next layer, but no bf16
  weight outlives the op (peak memory grows by one N*K weight of x's dtype only while the op runs).
The thresholds are measured by benchmarks/bench_matmul.py (docs/benchmarks.md); `path=` overrides for tests
and the benchmark.
"""
from __future__ import annotations

import torch

PATHS = ("gemv", "tiled", "cublas")

# Smallest M that goes to dequantize + cuBLAS, per direction (H100 measurements, docs/benchmarks.md).
LARGE_M = {"fwd": 1024, "dx": 1024}
# Largest M that the forward sends to the split-K decode kernel (nf4_gemv handles up to 128).
GEMV_MAX_M = 128


def choose_path(direction: str, m: int, n: int, k: int) -> str:
    if direction == "fwd" and m <= GEMV_MAX_M:
        return "gemv"
    return "cublas" if m >= LARGE_M[direction] else "tiled"


def _check_path(path: str | None, direction: str) -> None:
    if path is not None and (path not in PATHS or (direction == "dx" and path == "gemv")):
        raise ValueError(f"unknown {direction} path {path!r}; expected one of {PATHS} (no gemv for dx)")


def linear_forward(x: torch.Tensor, q, bias: torch.Tensor | None, path: str | None = None) -> torch.Tensor:
    """x (M, K) contiguous on the GPU (or CPU under TRITON_INTERPRET=1) -> (M, N) in x's dtype."""
    _check_path(path, "fwd")
    m, k = x.shape
    n = q.shape[0]
    if m == 0:
        return x.new_empty((0, n))
    path = path or choose_path("fwd", m, n, k)
    if path == "gemv":
        from . import nf4_gemv
        return nf4_gemv.gemv(x, q, bias)
    if path == "tiled":
        from . import nf4_matmul
        return nf4_matmul.matmul_fwd(x, q, bias)
    from . import nf4_tile
    w = nf4_tile.dequantize_transient(q, x.dtype)  # (N, K), freed on return
    return torch.nn.functional.linear(x, w, bias)


def linear_input_grad(dy: torch.Tensor, q, path: str | None = None) -> torch.Tensor:
    """dy (M, N) contiguous -> dx (M, K) = dy @ dequantize(q) in dy's dtype."""
    _check_path(path, "dx")
    m, n = dy.shape
    k = q.shape[1]
    if m == 0:
        return dy.new_zeros((0, k))
    path = path or choose_path("dx", m, n, k)
    if path == "tiled":
        from . import nf4_matmul
        return nf4_matmul.matmul_dx(dy, q)
    from . import nf4_tile
    w = nf4_tile.dequantize_transient(q, dy.dtype)  # (N, K), freed on return
    return dy @ w
