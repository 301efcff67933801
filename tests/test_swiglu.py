"""The swiglu op on the CPU: qlora_core/ops/swiglu.py (spec, routing, custom op) and kernels/swiglu.py.

  * the reference `swiglu_ref` (the spec) against llama.py's MLP activation, and the CPU routing (no triton);
  * under torch.compile the reference is traced as it is: compiled == eager bit for bit, no custom op;
  * the Triton kernels under TRITON_INTERPRET=1 (a fresh subprocess, `python tests/test_swiglu.py swiglu`), forward
    and backward against float64 (tests/_block_cases.py), and the custom ops the Triton path takes under
    torch.compile (`qlora_core::swiglu` / `swiglu_backward`): `torch.library.opcheck` per dtype, fused and
    two-tensor inputs, and compiled == eager bit for bit.
    tests/test_gpu_swiglu.py runs the 8B shapes.
"""
import sys

import pytest
import torch

from qlora_core import backend
from qlora_core.ops import swiglu
from tests import _block_cases as C
from tests.helpers import run_interpreter_group

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.mark.parametrize("dtype", C.DTYPES)
def test_swiglu_ref_is_llama_mlp_activation(dtype):
    gu = torch.randn(5, 2 * 40).mul_(4).to(dtype)
    want = torch.nn.functional.silu(gu[:, :40]) * gu[:, 40:]
    assert torch.equal(swiglu.swiglu_ref(gu[:, :40], gu[:, 40:]), want)
    assert torch.equal(swiglu.swiglu(gu), want)  # CPU routing, fused input
    assert torch.equal(swiglu.swiglu(gu[:, :40], gu[:, 40:]), want)


@pytest.mark.parametrize("dtype", C.DTYPES)
def test_gelu_tanh_ref_is_transformers_gelu_pytorch_tanh(dtype):
    """activation="gelu_tanh" is Gemma 3's MLP activation (transformers' ACT2FN["gelu_pytorch_tanh"]) times up."""
    activations = pytest.importorskip("transformers.activations", reason="test extra: transformers")
    gu = torch.randn(5, 2 * 40).mul_(4).to(dtype)
    want = activations.ACT2FN["gelu_pytorch_tanh"](gu[:, :40]) * gu[:, 40:]
    assert not torch.equal(swiglu.swiglu_ref(gu[:, :40], gu[:, 40:]), want)  # not silu's
    assert torch.equal(swiglu.swiglu_ref(gu[:, :40], gu[:, 40:], "gelu_tanh"), want)
    assert torch.equal(swiglu.swiglu(gu, activation="gelu_tanh"), want)  # CPU routing, fused input
    with pytest.raises(ValueError, match="activation must be one of"):
        swiglu.swiglu(gu, activation="relu")


def test_launcher_names_bad_inputs():
    from qlora_core.kernels import swiglu as kernels
    with pytest.raises(ValueError, match="swiglu.py: gate"):
        kernels.swiglu_forward(torch.randn(2, 8), torch.randn(2, 6))


def test_compiled_reference_is_traced():
    """Under torch.compile the reference is traced as plain PyTorch (no custom op), equal to eager bit for bit."""
    gu = torch.randn(3, 4, 48).mul_(3).to(torch.bfloat16).requires_grad_()
    C.compiled_matches_eager("swiglu reference", lambda a: swiglu.swiglu(a), [gu],
                             torch.randn(3, 4, 24).to(torch.bfloat16), set())


# -- the kernels under the interpreter ---------------------------------------------------------------------------
def run_group(group: str) -> int:
    """Small shapes: the interpreter runs each program in Python (I 14336 and 431 rows are on the GPU)."""
    assert backend.interpreting() and group == "swiglu"
    torch.manual_seed(0)
    n = 0
    for dtype in C.DTYPES:
        for fused, inplace in ((True, False), (True, True), (False, False), (False, True)):
            n += C.case_swiglu(7, 96, dtype, "cpu", fused, inplace)
        n += C.case_swiglu(1, 64, dtype, "cpu", True, False)
        n += C.case_swiglu(2, 1100, dtype, "cpu", False, False)  # two column tiles, the second masked
        for fused, inplace in ((True, True), (False, False)):  # GeGLU (Gemma 3)
            n += C.case_swiglu(7, 96, dtype, "cpu", fused, inplace, activation="gelu_tanh")
    for dtype in C.DTYPES:  # the custom ops the Triton path takes under torch.compile
        n += C.op_swiglu(5, 40, dtype, "cpu", fused=True)
        n += C.op_swiglu(5, 40, dtype, "cpu", fused=False)
    n += C.op_swiglu(5, 40, torch.bfloat16, "cpu", fused=True, activation="gelu_tanh")
    print(f"{group}: {n} checks passed")
    return n


def test_kernels_under_interpreter():
    run_interpreter_group(__file__, "swiglu")


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(0 if run_group(sys.argv[1]) > 0 else 1)
