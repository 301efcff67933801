"""The rope op on a GPU: odd shapes and the Llama-3.1-8B shapes (32/8 heads of 128, T 2048), forward and backward
against float64 (cases and tolerance rule: tests/_block_cases.py), the custom op torch.compile runs, and CUDA
tensors routed to the kernel.

Run on the device: `python -m pytest -m gpu tests/test_gpu_rope.py -q`.
"""
import pytest
import torch

from qlora_core import backend
from tests import _block_cases as C

pytestmark = pytest.mark.gpu
DEV = "cuda"


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


def test_cuda_tensors_route_to_triton():
    from qlora_core.ops import rope
    assert backend.choose(torch.device(DEV)) == "triton"
    x = torch.randn(3, 64, device=DEV, requires_grad=True)
    cos, sin = C.rope_tables(torch.arange(3, device=DEV), 32, torch.float32)
    q = x.reshape(1, 3, 64) * 1  # not a view: a view's grad_fn would be CopySlices' view node
    assert rope.apply_rope_qkv_(q, 2, cos, sin).grad_fn.name().endswith("RoPEFunctionBackward")


@pytest.mark.parametrize("dtype", C.DTYPES)
def test_custom_op(dtype):
    """What torch.compile runs: opcheck of rope, compiled apply_rope_qkv_ / apply_rope_ == eager bit for bit."""
    C.op_rope(2, 7, 4, 2, 64, dtype, DEV, per_row=True, table_dtype=torch.float32)
    C.op_rope(1, 9, 3, 1, 128, dtype, DEV, per_row=False)
