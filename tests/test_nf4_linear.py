"""nf4_linear on the CPU reference path against float64 math, plus the autograd contract (nothing dense saved).

Reference: y64 = x64 @ W64.T + b64 with W64 the exact quantized weight, lut[code] * absmax as an fp32 product
(the format spec, ops/quant4.dequantize_4bit_ref) taken to float64. Tolerance (STYLE.md): 2x the max error of
PyTorch's own same-dtype F.linear / matmul on W = qlora_core.dequantize(q) (rounded to the dtype) against the
same float64 result, plus DTYPE_ATOL[dtype].
"""
import pytest
import torch

import qlora_core as qc
from qlora_core.ops.nf4_linear import NF4LinearFunction, NF4LinearInputError
from qlora_core.ops.quant4 import dequantize_as
from tests.helpers import DTYPE_ATOL, assert_close_verbose

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bound(torch_out: torch.Tensor, ref64: torch.Tensor, dtype) -> float:
    return 2.0 * (torch_out.double() - ref64).abs().max().item() + DTYPE_ATOL[dtype]


def _make(n, k, dtype, quant_type="nf4", double_quant=True, blocksize=64):
    w = torch.randn(n, k, dtype=dtype)
    q = qc.quantize(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    return q, qc.dequantize(q)  # W in dtype, the spec's values


def _exact64(q):
    return dequantize_as(q, torch.float32).double()  # lut * absmax before any rounding to a 16-bit dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,k", [((1,), 7, 65), ((3, 5), 33, 130), ((13,), 64, 257)])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_backward_vs_float64(dtype, lead, n, k, quant_type, double_quant, with_bias):
    q, w = _make(n, k, dtype, quant_type, double_quant)
    x = torch.randn(*lead, k, dtype=dtype, requires_grad=True)
    b = torch.randn(n, dtype=dtype, requires_grad=True) if with_bias else None
    y = qc.nf4_linear(x, q, b)
    assert y.shape == (*lead, n) and y.dtype == dtype

    x64, w64 = x.detach().double(), _exact64(q)
    y64 = x64 @ w64.T + (b.detach().double() if with_bias else 0.0)
    ours_torch = torch.nn.functional.linear(x.detach(), w, None if b is None else b.detach())
    assert_close_verbose(y, y64, atol=_bound(ours_torch, y64, dtype), rtol=0, name="y")

    dy = torch.randn_like(y)
    y.backward(dy)
    dx64 = dy.double() @ w64
    assert_close_verbose(x.grad, dx64, atol=_bound(dy @ w, dx64, dtype), rtol=0, name="dx")
    if with_bias:
        db64 = dy.double().reshape(-1, n).sum(0)
        db_torch = dy.reshape(-1, n).sum(0)
        assert_close_verbose(b.grad, db64, atol=_bound(db_torch, db64, dtype), rtol=0, name="dbias")


def test_mixed_dtype_weight_is_rounded_once():
    # q stored as fp32 but x in bf16: W must be bf16(fp32 product), i.e. equal to dequantize(q).bfloat16().
    q, w32 = _make(9, 70, torch.float32)
    x = torch.randn(4, 70, dtype=torch.bfloat16)
    y = qc.nf4_linear(x, q)
    w = w32.to(torch.bfloat16)
    y64 = x.double() @ w32.double().T
    assert_close_verbose(y, y64, atol=_bound(x @ w.T, y64, torch.bfloat16), rtol=0, name="y")


def test_noncontiguous_input_and_zero_rows():
    q, w = _make(11, 40, torch.float32, double_quant=False)
    x = torch.randn(40, 6).T  # (6, 40), non-contiguous
    y64 = x.double() @ w.double().T
    assert_close_verbose(qc.nf4_linear(x, q), y64, atol=_bound(x @ w.T, y64, torch.float32), rtol=0)
    assert qc.nf4_linear(torch.randn(0, 40), q).shape == (0, 11)


def test_weight_grad_is_none_and_q_untouched():
    q, _ = _make(8, 64, torch.float32)
    x = torch.randn(3, 64, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    y = qc.nf4_linear(x, q, b)
    # autograd edges exist for the tensor inputs only (x, bias); the QuantizedTensor has none.
    edges = [fn for fn, _ in y.grad_fn.next_functions]
    assert len(edges) == 2 and all(type(fn).__name__ == "AccumulateGrad" for fn in edges)
    ctx_out = NF4LinearFunction.backward(y.grad_fn, torch.ones_like(y))
    assert ctx_out[1] is None and ctx_out[0].shape == x.shape and ctx_out[2].shape == b.shape
    for t in (q.data, q.absmax, q.nested_absmax, q.offset):
        assert not t.requires_grad and t.grad is None


def _saved_during(fn):
    seen = []

    def pack(t):
        seen.append((t.numel(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


@pytest.mark.parametrize("double_quant", [True, False])
def test_no_dequantized_weight_saved(double_quant):
    n, k = 48, 96
    q, w = _make(n, k, torch.bfloat16, double_quant=double_quant)
    x = torch.randn(5, k, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, dtype=torch.bfloat16, requires_grad=True)
    # Positive control: the hook does see a dense weight when one is saved.
    wp = w.clone().requires_grad_(True)
    _, dense = _saved_during(lambda: torch.nn.functional.linear(x, wp, b))
    assert any(numel >= n * k and dt.is_floating_point for numel, dt in dense)

    y, seen = _saved_during(lambda: qc.nf4_linear(x, q, b))
    assert seen, "nothing was saved: the packed state must go through save_for_backward"
    assert (q.data.numel(), torch.uint8) in seen  # the packed codes are what is kept
    big_float = [(numel, dt) for numel, dt in seen if dt.is_floating_point and numel >= n * k]
    assert not big_float, f"a dense float tensor of >= N*K elements was saved for backward: {big_float}"
    total_bytes_bound = q.data.numel() + q.absmax.numel() * 4 + 2048
    assert sum(numel * dt.itemsize for numel, dt in seen) <= total_bytes_bound
    y.sum().backward()
    assert x.grad is not None and b.grad is not None


def test_input_errors_are_named():
    q, _ = _make(6, 32, torch.float32)
    with pytest.raises(NF4LinearInputError, match="last dim must equal K=32"):
        qc.nf4_linear(torch.randn(2, 31), q)
    with pytest.raises(NF4LinearInputError, match="dtype torch.float64 unsupported"):
        qc.nf4_linear(torch.randn(2, 32, dtype=torch.float64), q)
    with pytest.raises(NF4LinearInputError, match="bias must have shape"):
        qc.nf4_linear(torch.randn(2, 32), q, torch.randn(5))
    with pytest.raises(NF4LinearInputError, match="bias dtype"):
        qc.nf4_linear(torch.randn(2, 32), q, torch.randn(6, dtype=torch.float16))
    q3 = qc.quantize(torch.randn(2, 3, 32), double_quant=False)
    with pytest.raises(NF4LinearInputError, match="q must be 2-D"):
        qc.nf4_linear(torch.randn(2, 32), q3)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        qc.nf4_linear(torch.randn(2, 32), torch.randn(6, 32))
