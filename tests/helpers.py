"""Shared test helpers: one readable assertion for float comparisons, the dtype tolerance table, and the
bitsandbytes import for GPU comparisons."""
import pytest
import torch

# Tolerance rule (STYLE.md): no worse than 2x PyTorch's own same-dtype error against a float64 reference,
# plus this dtype atol.
DTYPE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = ""):
    """assert_close with a report: mismatch count, first indices, max/mean diff, NaN/Inf disagreement."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN pattern differs ({int(nan_a.sum())} vs {int(nan_e.sum())})"
    diff = (a - e).abs().nan_to_num(0.0)
    bad = diff > atol + rtol * e.abs().nan_to_num(0.0)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
            f"first at {idx}; max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}")


def matmul_error_bound(x: torch.Tensor, w: torch.Tensor, ref64: torch.Tensor) -> float:
    """2x the max abs error of PyTorch's own same-dtype matmul x @ w.T against the float64 reference."""
    torch_err = (torch.nn.functional.linear(x, w).double() - ref64).abs().max().item()
    return 2.0 * torch_err


def bnb_cuda():
    """bitsandbytes with its CUDA library loaded, for tests that compare against its CUDA kernels.

    A missing package or a CPU-only load is a failure, never a skip: a GPU test that silently skipped its only
    independent reference would pass without having compared anything.
    """
    try:
        import bitsandbytes
        from bitsandbytes.cextension import lib
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken native library raising anything)
        pytest.fail(f"bitsandbytes must import on the GPU machine (pip install bitsandbytes==0.50.2): {e!r}")
    if not getattr(lib, "compiled_with_cuda", False):
        pytest.fail(f"bitsandbytes {bitsandbytes.__version__} loaded without its CUDA library "
                    f"({type(lib).__name__}): the comparison would run bitsandbytes' CPU/default backend")
    return bitsandbytes
