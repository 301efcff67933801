"""The rmsnorm op on the CPU: qlora_core/ops/rmsnorm.py (spec, routing, custom op) and kernels/rmsnorm.py.

  * the reference `rms_norm_ref` (the spec) against llama.py's RMSNorm, and the CPU routing (no triton);
  * under torch.compile the reference is traced as it is: compiled == eager bit for bit, no custom op;
  * the Triton kernels under TRITON_INTERPRET=1, forward and backward against float64 (tests/_block_cases.py has
    the cases and the tolerance rule), and the custom ops the Triton path takes under torch.compile
    (`qlora_core::rms_norm` / `rms_norm_backward`): `torch.library.opcheck` over the dtypes the op takes (bf16 x
    with an fp32 weight included), and compiled == eager bit for bit.
    TRITON_INTERPRET must be set before triton is first imported, so that group runs in a fresh subprocess:
    `python tests/test_rmsnorm.py rmsnorm`. Shapes are small (the interpreter runs every program in Python);
    tests/test_gpu_rmsnorm.py runs the 8B shapes.
"""
import sys

import pytest
import torch

from qlora_core import backend
from qlora_core.ops import rmsnorm
from tests import _block_cases as C
from tests.helpers import run_interpreter_group

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
               (torch.bfloat16, torch.float32)]  # (x, weight): bf16 activations with an fp32 norm weight too


@pytest.mark.parametrize("dtype,wdtype", DTYPE_PAIRS)
def test_rms_norm_ref_is_llama_rmsnorm(dtype, wdtype):
    from qlora_core.llama import RMSNorm
    norm = RMSNorm(96, 1e-5, dtype=wdtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = torch.randn(3, 7, 96).mul_(4).to(dtype)
    want = norm(x)
    got = rmsnorm.rms_norm_ref(x, norm.weight, 1e-5)
    assert got.dtype == want.dtype == torch.promote_types(dtype, wdtype)
    assert torch.equal(got, want)
    # CPU routing: the reference, differentiable; a frozen weight gets no gradient
    x.requires_grad_()
    norm.weight.requires_grad_(False)
    y = rmsnorm.rms_norm(x, norm.weight, 1e-5)
    assert torch.equal(y, want)
    y.sum().backward()
    assert x.grad is not None and norm.weight.grad is None


@pytest.mark.parametrize("dtype,wdtype", DTYPE_PAIRS)
def test_unit_offset_ref_is_transformers_gemma3_rmsnorm(dtype, wdtype):
    """unit_offset=True is transformers' Gemma3RMSNorm (x * (1 + w) in fp32, cast to x's dtype) bit for bit."""
    gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3", reason="test extra: transformers")
    norm = gemma3.Gemma3RMSNorm(96, eps=1e-5).to(wdtype)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.2)
    x = torch.randn(3, 7, 96).mul_(4).to(dtype)
    want = norm(x)
    assert want.dtype == dtype and (want - rmsnorm.rms_norm_ref(x, norm.weight, 1e-5)).abs().max() > 0
    assert torch.equal(rmsnorm.rms_norm_ref(x, norm.weight, 1e-5, unit_offset=True), want)
    assert torch.equal(rmsnorm.rms_norm(x, norm.weight, 1e-5, unit_offset=True), want)  # CPU routing


def test_launcher_names_bad_inputs():
    from qlora_core.kernels import rmsnorm as kernels
    with pytest.raises(ValueError, match=r"rmsnorm.py: weight shape \(8,\) != \(16,\)"):
        kernels.rms_norm_forward(torch.randn(2, 16), torch.ones(8), 1e-6)


def test_compiled_reference_is_traced():
    """Under torch.compile the reference is traced as plain PyTorch (no custom op), equal to eager bit for bit."""
    x = torch.randn(3, 5, 48).mul_(3).to(torch.bfloat16).requires_grad_()
    w = (1.0 + 0.2 * torch.randn(48)).requires_grad_()  # fp32 norm weight: fp32 output
    C.compiled_matches_eager("rms_norm reference", lambda a, b: rmsnorm.rms_norm(a, b, 1e-6), (x, w),
                             torch.randn(3, 5, 48), set())


# -- the kernels under the interpreter ---------------------------------------------------------------------------
def run_group(group: str) -> int:
    """Small shapes: the interpreter runs each program in Python (rows 431 and d 4096 are on the GPU)."""
    assert backend.interpreting() and group == "rmsnorm"
    torch.manual_seed(0)
    n = 0
    for dtype in C.DTYPES:
        for shape in ((1, 64), (7, 96)):
            for weight_grad in (False, True):
                n += C.case_rmsnorm(shape, dtype, "cpu", weight_grad)
    n += C.case_rmsnorm((3, 41, 64), torch.bfloat16, "cpu", True)  # 123 rows, several per program
    n += C.case_rmsnorm((5, 576), torch.float16, "cpu", False)
    n += C.case_rmsnorm((7, 96), torch.bfloat16, "cpu", True, weight_dtype=torch.float32)  # fp32 output
    for dtype in C.DTYPES:  # Gemma's (1 + w) norm, output in x's dtype
        n += C.case_rmsnorm((7, 96), dtype, "cpu", True, unit_offset=True)
    n += C.case_rmsnorm((3, 41, 64), torch.bfloat16, "cpu", False, weight_dtype=torch.float32, unit_offset=True)
    for dtype, wdtype in DTYPE_PAIRS:  # the custom ops the Triton path takes under torch.compile
        n += C.op_rmsnorm((2, 5, 64), dtype, "cpu", True, weight_dtype=wdtype)
    n += C.op_rmsnorm((7, 96), torch.float16, "cpu", False)
    n += C.op_rmsnorm((2, 5, 64), torch.bfloat16, "cpu", True, weight_dtype=torch.float32, unit_offset=True)
    print(f"{group}: {n} checks passed")
    return n


def test_kernels_under_interpreter():
    run_interpreter_group(__file__, "rmsnorm")


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(0 if run_group(sys.argv[1]) > 0 else 1)
