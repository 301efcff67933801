"""The block kernels on a GPU: odd shapes and the Llama-3.1-8B shapes (d 4096, I 14336, 32/8 heads of 128, vocab
128256, 8192 rows), forward and backward against float64 (cases and tolerance rule: tests/_block_cases.py),
plus the fused cross entropy's memory bound, autocast and its one-backward contract.

Run on the device: `python -m pytest -m gpu tests/test_gpu_block_kernels.py -q`.
"""
import pytest
import torch

from qlora_core import backend
from tests import _block_cases as C

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("dtype", C.DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 4096), (7, 96), (123, 576), (431, 64), (431, 4096)])
def test_rmsnorm_odd_shapes(rows, d, dtype, weight_grad):
    C.case_rmsnorm((rows, d), dtype, DEV, weight_grad)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])  # fp32: norms kept in fp32, fp32 output
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rmsnorm_8b(weight_grad, weight_dtype):
    C.case_rmsnorm((4, 2048, 4096), torch.bfloat16, DEV, weight_grad, weight_dtype=weight_dtype)


@pytest.mark.parametrize("dtype", C.DTYPES)
@pytest.mark.parametrize("shape,mode", [((1, 1, 4, 2, 64), "qkv"), ((1, 7, 9, 3, 64), "pair"),
                                        ((2, 123, 32, 8, 128), "views"), ((1, 431, 3, 1, 128), "qkv")])
def test_rope_odd_shapes(shape, mode, dtype):
    B, T, H, KVH, D = shape
    C.case_rope(B, T, H, KVH, D, dtype, DEV, per_row=(mode != "qkv"), mode=mode)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("B,T", [(1, 2048), (4, 2048)])
def test_rope_8b(B, T, per_row):
    C.case_rope(B, T, 32, 8, 128, torch.bfloat16, DEV, per_row=per_row, mode="qkv", table_dtype=torch.float32)


@pytest.mark.parametrize("fused,inplace", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("dtype", C.DTYPES)
@pytest.mark.parametrize("M,I", [(1, 14336), (7, 96), (123, 576), (431, 14336)])
def test_swiglu_odd_shapes(M, I, dtype, fused, inplace):
    C.case_swiglu(M, I, dtype, DEV, fused, inplace)


@pytest.mark.parametrize("M", [2048, 8192])
def test_swiglu_8b(M):
    C.case_swiglu(M, 14336, torch.bfloat16, DEV, fused=True, inplace=True)


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("dtype", C.DTYPES)
@pytest.mark.parametrize("N,d,V,chunk", [(1, 64, 1000, 2 ** 27), (7, 96, 1000, 3 * 1000), (123, 576, 49152, 2 ** 27),
                                         (431, 576, 49152, 100 * 49152), (123, 4096, 128256, 2 ** 27)])
def test_fused_ce_odd_shapes(N, d, V, chunk, dtype, weight_grad):
    C.case_ce(N, d, V, dtype, DEV, chunk, weight_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_ce_all_ignored(dtype):
    C.case_ce(431, 576, 49152, dtype, DEV, 2 ** 27, weight_grad=True, ignored=1.0)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_fused_ce_8b(weight_grad):
    C.case_ce(8192, 4096, 128256, torch.bfloat16, DEV, 2 ** 27, weight_grad, ignored=0.1)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_fused_ce_memory_is_bounded(weight_grad):
    """8B lm_head at 8192 rows: the op allocates one logits chunk, dh, the per-row losses and (trainable weight
    only) the fp32 dW accumulator and its cast; never the (N, V) logits (2 GiB in bf16, 4 GiB in fp32)."""
    from qlora_core.kernels import fused_linear_ce as fce
    N, d, V = 8192, 4096, 128256
    h, w, y = C.ce_inputs(N, d, V, torch.bfloat16, DEV, ignored=0.1, weight_grad=weight_grad)
    wanted = [h, w] if weight_grad else [h]
    run = lambda: torch.autograd.grad(fce.fused_linear_cross_entropy(h, w, y), wanted)  # noqa: E731
    run()  # warm-up: kernels compiled, cuBLAS workspace allocated
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = run()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    rows = fce.DEFAULT_CHUNK_LOGITS // V
    allowed = rows * V * 2 + N * d * 2 + N * 4 + (V * d * (4 + 2) if weight_grad else 0) + (64 << 20)
    assert extra <= allowed, f"fused CE used {extra / 2**20:.0f} MiB above its inputs, bound {allowed / 2**20:.0f} MiB"
    assert extra < N * V * 2 + (V * d * 6 if weight_grad else 0), "as much as the full logits"
    assert all(torch.isfinite(g).all() for g in grads)


def test_fused_ce_autocast_matches_chunk_ce():
    """Under bf16 autocast with fp32 hidden states (an fp32 final norm) the op uses bf16 logits, as F.linear
    would: same loss and dh as train.py's _chunk_ce under the same autocast."""
    from qlora_core.kernels import fused_linear_ce as fce
    h = torch.randn(300, 576, device=DEV, requires_grad=True)
    w = (torch.randn(49152, 576, device=DEV) * 0.1).to(torch.bfloat16)
    y = torch.randint(0, 49152, (300,), device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = fce.fused_linear_cross_entropy(h, w, y)
        want = fce._chunk_ce(h, w, y, -100)
    (dh,) = torch.autograd.grad(got, h)
    (dh_want,) = torch.autograd.grad(want, h)
    assert dh.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(dh, dh_want, rtol=1e-2, atol=1e-4)  # one bf16 rounding of grad_logits apart


def test_fused_ce_second_backward_raises():
    from qlora_core.kernels import fused_linear_ce as fce
    h = torch.randn(5, 64, device=DEV, requires_grad=True)
    loss = fce.fused_linear_cross_entropy(h, torch.randn(100, 64, device=DEV), torch.arange(5, device=DEV))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_cuda_tensors_route_to_triton():
    from qlora_core.kernels import fused_linear_ce as fce
    from qlora_core.kernels import rmsnorm, rope, swiglu
    assert backend.choose(torch.device(DEV)) == "triton"
    x = torch.randn(3, 64, device=DEV, requires_grad=True)
    assert rmsnorm.rms_norm(x, torch.ones(64, device=DEV), 1e-6).grad_fn.name().endswith("RMSNormFunctionBackward")
    assert swiglu.swiglu(x * 1).grad_fn.name().endswith("SwiGLUFunctionBackward")
    cos, sin = C.rope_tables(torch.arange(3, device=DEV), 32, torch.float32)
    q = x.reshape(1, 3, 64) * 1  # not a view: a view's grad_fn would be CopySlices' view node
    assert rope.apply_rope_qkv_(q, 2, cos, sin).grad_fn.name().endswith("RoPEFunctionBackward")
    loss = fce.fused_linear_cross_entropy(x, torch.randn(10, 64, device=DEV), torch.arange(3, device=DEV))
    assert loss.grad_fn.name().endswith("FusedLinearCrossEntropyFunctionBackward")
