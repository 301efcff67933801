"""The rmsnorm op on a GPU: odd shapes and the Llama-3.1-8B shapes (d 4096, 8192 rows), forward and backward
against float64 (cases and tolerance rule: tests/_block_cases.py), the custom ops torch.compile runs, and CUDA
tensors routed to the kernels.

Run on the device: `python -m pytest -m gpu tests/test_gpu_rmsnorm.py -q`.
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


def test_cuda_tensors_route_to_triton():
    from qlora_core.ops import rmsnorm
    assert backend.choose(torch.device(DEV)) == "triton"
    x = torch.randn(3, 64, device=DEV, requires_grad=True)
    assert rmsnorm.rms_norm(x, torch.ones(64, device=DEV), 1e-6).grad_fn.name().endswith("RMSNormFunctionBackward")


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_custom_ops(dtype, wdtype):
    """What torch.compile runs: opcheck of rms_norm / rms_norm_backward, compiled == eager bit for bit."""
    C.op_rmsnorm((3, 41, 576), dtype, DEV, True, weight_dtype=wdtype)
    C.op_rmsnorm((7, 4096), dtype, DEV, False, weight_dtype=wdtype)
