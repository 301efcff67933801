"""The linear_ce op (fused lm_head + cross entropy) on a GPU: odd shapes and the Llama-3.1-8B shapes (d 4096, vocab
128256, 8192 rows), forward and backward against float64 (cases and tolerance rule: tests/_block_cases.py), plus
its memory bound, autocast, its one-backward contract, the custom op torch.compile runs and CUDA tensors routed
to the kernel.

Run on the device: `python -m pytest -m gpu tests/test_gpu_linear_ce.py -q`.
"""
import pytest
import torch

from qlora_core import backend
from qlora_core.ops import linear_ce
from tests import _block_cases as C

pytestmark = pytest.mark.gpu
DEV = "cuda"


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
    N, d, V = 8192, 4096, 128256
    h, w, y = C.ce_inputs(N, d, V, torch.bfloat16, DEV, ignored=0.1, weight_grad=weight_grad)
    wanted = [h, w] if weight_grad else [h]
    run = lambda: torch.autograd.grad(linear_ce.fused_linear_cross_entropy(h, w, y), wanted)  # noqa: E731
    run()  # warm-up: kernels compiled, cuBLAS workspace allocated
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = run()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    rows = linear_ce.DEFAULT_CHUNK_LOGITS // V
    allowed = rows * V * 2 + N * d * 2 + N * 4 + (V * d * (4 + 2) if weight_grad else 0) + (64 << 20)
    assert extra <= allowed, f"fused CE used {extra / 2**20:.0f} MiB above its inputs, bound {allowed / 2**20:.0f} MiB"
    assert extra < N * V * 2 + (V * d * 6 if weight_grad else 0), "as much as the full logits"
    assert all(torch.isfinite(g).all() for g in grads)


def test_fused_ce_autocast_matches_chunk_ce():
    """Under bf16 autocast with fp32 hidden states (an fp32 final norm) the op uses bf16 logits, as F.linear
    would: same loss and dh as train.py's chunk loss (ops/linear_ce.py's _chunk_ce) under the same autocast."""
    h = torch.randn(300, 576, device=DEV, requires_grad=True)
    w = (torch.randn(49152, 576, device=DEV) * 0.1).to(torch.bfloat16)
    y = torch.randint(0, 49152, (300,), device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = linear_ce.fused_linear_cross_entropy(h, w, y)
        want = linear_ce._chunk_ce(h, w, y, -100)
    (dh,) = torch.autograd.grad(got, h)
    (dh_want,) = torch.autograd.grad(want, h)
    assert dh.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(dh, dh_want, rtol=1e-2, atol=1e-4)  # one bf16 rounding of grad_logits apart


def test_fused_ce_second_backward_raises():
    h = torch.randn(5, 64, device=DEV, requires_grad=True)
    loss = linear_ce.fused_linear_cross_entropy(h, torch.randn(100, 64, device=DEV), torch.arange(5, device=DEV))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_cuda_tensors_route_to_triton():
    assert backend.choose(torch.device(DEV)) == "triton"
    x = torch.randn(3, 64, device=DEV, requires_grad=True)
    loss = linear_ce.fused_linear_cross_entropy(x, torch.randn(10, 64, device=DEV), torch.arange(3, device=DEV))
    assert loss.grad_fn.name().endswith("FusedLinearCrossEntropyFunctionBackward")


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("dtype", C.DTYPES)
def test_custom_op(dtype, weight_grad):
    """What torch.compile runs: opcheck of fused_linear_cross_entropy, compiled == eager bit for bit."""
    C.op_ce(123, 576, 4000, dtype, DEV, 40 * 4000, weight_grad)
