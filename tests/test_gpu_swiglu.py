"""The swiglu op on a GPU: odd shapes and the Llama-3.1-8B shapes (I 14336, 8192 rows), forward and backward
against float64 (cases and tolerance rule: tests/_block_cases.py), the custom ops torch.compile runs, and CUDA
tensors routed to the kernels.

Run on the device: `python -m pytest -m gpu tests/test_gpu_swiglu.py -q`.
"""
import pytest
import torch

from qlora_core import backend
from tests import _block_cases as C

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("fused,inplace", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("dtype", C.DTYPES)
@pytest.mark.parametrize("M,I", [(1, 14336), (7, 96), (123, 576), (431, 14336)])
def test_swiglu_odd_shapes(M, I, dtype, fused, inplace):
    C.case_swiglu(M, I, dtype, DEV, fused, inplace)


@pytest.mark.parametrize("M", [2048, 8192])
def test_swiglu_8b(M):
    C.case_swiglu(M, 14336, torch.bfloat16, DEV, fused=True, inplace=True)


def test_cuda_tensors_route_to_triton():
    from qlora_core.ops import swiglu
    assert backend.choose(torch.device(DEV)) == "triton"
    x = torch.randn(3, 64, device=DEV, requires_grad=True)
    assert swiglu.swiglu(x * 1).grad_fn.name().endswith("SwiGLUFunctionBackward")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", C.DTYPES)
def test_custom_ops(dtype, fused):
    """What torch.compile runs: opcheck of swiglu / swiglu_backward, compiled == eager bit for bit."""
    C.op_swiglu(7, 1100, dtype, DEV, fused)
