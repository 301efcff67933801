"""The rope op on the CPU: qlora_core/ops/rope.py (spec, routing, custom op) and kernels/rope.py.

  * the reference `rope_ref` (the spec) against llama.py's formula, and the reference path's in-place contract;
  * under torch.compile the reference path is traced as it is: compiled == eager bit for bit, no custom op;
  * the Triton kernel under TRITON_INTERPRET=1 (a fresh subprocess, `python tests/test_rope.py rope`), forward and
    backward against float64 (tests/_block_cases.py), and the custom op the Triton path takes under torch.compile
    (`qlora_core::rope`, functional: see ops/rope.py): `torch.library.opcheck` per dtype, fp32 or same-dtype,
    shared (T, D) or per-row (B, T, D) tables, and compiled `apply_rope_qkv_` / `apply_rope_` == eager bit for bit.
    tests/test_gpu_rope.py runs the 8B shapes;
  * `apply_rope_partial` (partial rotary, Phi-4-mini) against transformers' Phi-3 apply_rotary_pos_emb.
"""
import sys

import pytest
import torch

from qlora_core import backend
from qlora_core.ops import rope
from tests import _block_cases as C
from tests.helpers import run_interpreter_group

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.mark.parametrize("dtype", C.DTYPES)
def test_rope_ref_is_llama_formula(dtype):
    """rope_ref evaluates llama.py's formula in fp32 and rounds once: bitwise equal in fp32, within the float64
    bound in half precision (llama.py rounds three times there)."""
    from qlora_core.llama import Llama
    from qlora_core.model_config import LlamaConfig
    cfg = LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    cos, sin = Llama(cfg).model.rope(torch.arange(9), dtype)
    x = torch.randn(2, 9, 4 * 16).to(dtype)
    got = rope.rope_ref(x, cos, sin)
    want = C._rope_llama(x, cos, sin, 16)
    want64 = C._rope_llama(x.double(), cos.double(), sin.double(), 16)
    if dtype == torch.float32:
        assert torch.equal(got, want)
    C.check(f"rope_ref {dtype}", got, want64, want, dtype)


@pytest.mark.parametrize("mode", ["qkv", "pair", "views"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_reference_path_rotates_in_place(mode, dtype):
    C.case_rope(2, 5, 4, 2, 16, dtype, "cpu", per_row=True, mode=mode, impl="reference")
    C.case_rope(1, 3, 2, 1, 64, dtype, "cpu", per_row=False, mode=mode, impl="reference")


def test_launcher_names_bad_inputs():
    from qlora_core.kernels import rope as kernels
    with pytest.raises(ValueError, match="rope.py: cos/sin must be"):
        kernels.rope_rotate_(torch.randn(1, 3, 32), None, torch.randn(4, 16), torch.randn(4, 16))
    with pytest.raises(ValueError, match="rope.py: q strides"):
        kernels.rope_rotate_(torch.randn(1, 32, 3).transpose(1, 2), None, torch.randn(3, 16), torch.randn(3, 16))


def test_compiled_reference_is_traced():
    """Under torch.compile the reference path (RoPEFunction with rope_ref) is traced as it is (no custom op),
    equal to eager bit for bit."""
    cos, sin = C.rope_tables(torch.arange(5), 16, torch.float32)
    base = torch.randn(2, 5, 8 * 16).to(torch.bfloat16).requires_grad_()
    C.compiled_matches_eager("rope reference", lambda b: rope.apply_rope_qkv_(b * 1, 6, cos, sin), [base],
                             torch.randn(base.shape).to(torch.bfloat16), set())


# -- the kernel under the interpreter ----------------------------------------------------------------------------
def run_group(group: str) -> int:
    """Small shapes: the interpreter runs each program in Python (T 2048 and 32/8 heads are on the GPU)."""
    assert backend.interpreting() and group == "rope"
    torch.manual_seed(0)
    n = 0
    for dtype in C.DTYPES:
        n += C.case_rope(1, 5, 4, 2, 64, dtype, "cpu", per_row=False, mode="qkv")
        n += C.case_rope(2, 3, 3, 1, 64, dtype, "cpu", per_row=True, mode="pair")
        n += C.case_rope(2, 2, 2, 2, 128, dtype, "cpu", per_row=True, mode="views", table_dtype=torch.float32)
    for dtype in C.DTYPES:  # the custom op the Triton path takes under torch.compile
        n += C.op_rope(2, 3, 4, 2, 16, dtype, "cpu", per_row=True, table_dtype=torch.float32)
    n += C.op_rope(1, 3, 2, 1, 32, torch.float16, "cpu", per_row=False)
    print(f"{group}: {n} checks passed")
    return n


def test_kernel_under_interpreter():
    run_interpreter_group(__file__, "rope")


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(0 if run_group(sys.argv[1]) > 0 else 1)


@pytest.mark.parametrize("cos_shape", ["shared", "per-row"])
def test_apply_rope_partial_is_transformers_phi3(cos_shape):
    """Partial rotary (12 of 16 dims) on a fused qkv buffer (4 q, 2 k, 2 v heads) equals transformers' Phi-3
    apply_rotary_pos_emb on q and k with v untouched, bit for bit in fp32, and so do the input gradients."""
    phi3 = pytest.importorskip("transformers.models.phi3.modeling_phi3", reason="transformers is the reference")
    g = torch.Generator().manual_seed(0)
    B, T, D, R = 2, 7, 16, 12
    qkv = torch.randn(B, T, 8 * D, generator=g, requires_grad=True)
    ang = torch.randn((T, R // 2) if cos_shape == "shared" else (B, 1, T, R // 2), generator=g)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    got = rope.apply_rope_partial(qkv, 6, D, cos, sin)
    heads = qkv.unflatten(-1, (8, D)).transpose(1, 2)  # (B, heads, T, D), transformers' layout
    c, s = (cos[None], sin[None]) if cos.dim() == 2 else (cos.squeeze(1), sin.squeeze(1))  # its (B|1, T, R)
    q, k = phi3.apply_rotary_pos_emb(heads[:, :4], heads[:, 4:6], c, s)
    want = torch.cat((q, k, heads[:, 6:]), 1).transpose(1, 2).flatten(-2)
    assert torch.equal(got, want) and not torch.equal(got, qkv)
    dy = torch.randn(got.shape, generator=g)
    assert torch.equal(*(torch.autograd.grad(y, qkv, dy)[0] for y in (got, want)))
