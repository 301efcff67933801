"""The one place that picks how a 4-bit linear runs on the Triton backend: by M (rows of x) and the shape.

Reference: `qlora_core.linear` CPU path (F.linear on `dequantize_as(q, x.dtype)`); every path here returns
the same function of (x, q, bias) within the matmul tolerance of the exact float64 product. The cuBLAS path
uses W bit-exact with dequantize(q), the tensor-core paths dequantize(q)'s values up to a 1-ulp absmax
contraction (nf4_tile), the register-decode paths (nf4_gemv1, nf4_gemv_mma) the table values to 2**-14.

Paths (forward y = x @ W.T + bias; input gradient dx = dy @ W):
- "gemv"   (forward, M <= GEMV_MAX_M): reads the packed weight directly. bf16/fp16 x on an aligned layout
           (K % blocksize == 0, blocksize >= 64) decodes the codes in registers (kernels/nf4_regdecode.py):
           one row in kernels/nf4_gemv1.py (CUDA cores), 2..16 rows in kernels/nf4_gemv_mma.py (tensor
           cores); everything else goes to kernels/nf4_gemv.py (table gathers).
- "tiled"  (dx at small M with K >= 2N; any M by request): kernels/nf4_matmul.py, dequantize fused into tiles.
- "cublas" (everything else, and all fp32): kernels/quant4.dequantize_4bit (the library's dequantizer,
  ~92% of copy bandwidth on an H100) into a buffer of x's dtype, then cuBLAS. At large M the GEMM is
  compute bound (2*M*N*K flops against one N*K dequantize pass, ~4-9% extra at M = 4096 on an H100) and
  cuBLAS' Hopper GEMM (wgmma + TMA, warp-specialised) outruns our Triton GEMMs, whose dequantize (one table
  gather per element) is not overlapped with the MMAs.
  NOTE: the buffer is a local of this call, dropped before returning: the caching allocator reuses its
  memory for the next layer, but no dense weight outlives the op (peak memory grows by one N*K weight of
  x's dtype only while the op runs; bench_matmul.py reports kept = 0 MB).
The thresholds are measured by benchmarks/bench_matmul.py (docs/benchmarks.md); `path=` overrides for tests
and the benchmark.
"""
from __future__ import annotations

import torch

PATHS = ("gemv", "tiled", "cublas")

# Forward: the split-K decode kernel up to this M; above it dequantize + cuBLAS. Measured on an H100
# (docs/benchmarks.md): at M = 128 the fused tiled kernel took 74-310 us and the decode kernel 111-165 us
# against 31-118 us for dequantize + cuBLAS, so neither fused kernel is dispatched above M = 16.
GEMV_MAX_M = 16
# Input gradient: the fused transposed kernel only for small M with K >= 2N (down-projection shape: 79 us
# against 107 us at M = 1..16); everywhere else dequantize + cuBLAS was faster.
DX_TILED_MAX_M = 16


def choose_path(direction: str, m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """"gemv" | "tiled" | "cublas" for this direction, M and (N, K). fp32 always takes "cublas": Triton's
    ieee fp32 dot is slow and cuBLAS fp32 is the reference's own arithmetic."""
    if dtype == torch.float32:
        return "cublas"
    if direction == "fwd":
        return "gemv" if m <= GEMV_MAX_M else "cublas"
    return "tiled" if (m <= DX_TILED_MAX_M and k >= 2 * n) else "cublas"


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
    path = path or choose_path("fwd", m, n, k, x.dtype)
    if path == "gemv":
        from . import nf4_gemv, nf4_gemv1, nf4_gemv_mma
        if nf4_gemv1.supports(x, q):
            return nf4_gemv1.gemv1(x, q, bias)
        if nf4_gemv_mma.supports(x, q):
            return nf4_gemv_mma.gemv_mma(x, q, bias)
        return nf4_gemv.gemv(x, q, bias)
    if path == "tiled":
        from . import nf4_matmul
        return nf4_matmul.matmul_fwd(x, q, bias)
    from . import quant4
    w = quant4.dequantize_4bit(q, dtype=x.dtype)  # (N, K), freed on return
    return torch.nn.functional.linear(x, w, bias)


def linear_input_grad(dy: torch.Tensor, q, path: str | None = None) -> torch.Tensor:
    """dy (M, N) contiguous -> dx (M, K) = dy @ dequantize(q) in dy's dtype."""
    _check_path(path, "dx")
    m, n = dy.shape
    k = q.shape[1]
    if m == 0:
        return dy.new_zeros((0, k))
    path = path or choose_path("dx", m, n, k, dy.dtype)
    if path == "tiled":
        from . import nf4_matmul
        return nf4_matmul.matmul_dx(dy, q)
    from . import quant4
    w = quant4.dequantize_4bit(q, dtype=dy.dtype)  # (N, K), freed on return
    return dy @ w
