"""The block kernels (RMSNorm, RoPE, SwiGLU, fused lm_head + cross entropy) on the CPU.

Two kinds of test:
  * the references (`*_ref`, the spec) against the code they replace (llama.py's RMSNorm / RoPE / MLP, train.py's
    chunked loss) and the CPU routing of each op (no triton);
  * the Triton kernels under TRITON_INTERPRET=1, forward and backward against float64 (tests/_block_cases.py has
    the cases and the tolerance rule). TRITON_INTERPRET must be set before triton is first imported, so each
    group runs in a fresh subprocess: `python tests/test_kernels_block.py GROUP`. Shapes are small (the
    interpreter runs every program in Python); tests/test_gpu_block_kernels.py runs the 8B shapes.
"""
import sys

import pytest
import torch

from qlora_core import backend
from qlora_core.kernels import fused_linear_ce as fce
from qlora_core.kernels import rmsnorm, rope, swiglu
from tests import _block_cases as C
from tests.helpers import assert_close_verbose, run_interpreter_group

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

GROUPS = ("rmsnorm_rope", "swiglu", "ce")


# -- references and CPU routing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
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


@pytest.mark.parametrize("dtype", C.DTYPES)
def test_swiglu_ref_is_llama_mlp_activation(dtype):
    gu = torch.randn(5, 2 * 40).mul_(4).to(dtype)
    want = torch.nn.functional.silu(gu[:, :40]) * gu[:, 40:]
    assert torch.equal(swiglu.swiglu_ref(gu[:, :40], gu[:, 40:]), want)
    assert torch.equal(swiglu.swiglu(gu), want)  # CPU routing, fused input
    assert torch.equal(swiglu.swiglu(gu[:, :40], gu[:, 40:]), want)


@pytest.mark.parametrize("dtype", C.DTYPES)
def test_rope_ref_is_llama_formula(dtype):
    """rope_ref evaluates llama.py's formula in fp32 and rounds once: bitwise equal in fp32, within the float64
    bound in half precision (llama.py rounds three times there)."""
    from qlora_core.llama import Llama, LlamaConfig
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


@pytest.mark.parametrize("chunk", [2 ** 27, 3 * 1000])  # one chunk; chunks of 3 rows, recomputed in backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ce_reference_path(chunk, dtype):
    C.case_ce(13, 64, 1000, dtype, "cpu", chunk, weight_grad=True, impl="reference")
    C.case_ce(5, 64, 1000, dtype, "cpu", chunk, weight_grad=False, ignored=1.0, impl="reference")


def ce_matches_batch_loss(impl: str) -> int:
    """fused_linear_cross_entropy on a tiny Llama's hidden states (several chunks) equals the full-logits loss
    (F.cross_entropy over model(ids), what transformers computes) in loss and in the lm_head / embedding gradients,
    to fp32 rounding."""
    from qlora_core.llama import Llama, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = Llama(cfg)
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, -3:] = -100
    params = [model.lm_head.weight, model.model.embed_tokens.weight]
    chunk = 3 * 1000  # 3 rows a chunk: several chunks and a tail
    want = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 1000), labels[:, 1:].reshape(-1),
                                             reduction="sum")
    n = int((labels[:, 1:] != -100).sum())
    want_g = torch.autograd.grad(want, params)
    y = labels[:, 1:]
    sel = y != -100
    h = model.model(ids)[:, :-1][sel]
    with backend.forced(impl):
        got = fce.fused_linear_cross_entropy(h, model.lm_head.weight, y[sel], chunk_logits=chunk)
    got_g = torch.autograd.grad(got, params)
    assert n == int(sel.sum()) and n > 9
    assert_close_verbose(got, want, atol=1e-5, rtol=1e-6, name=f"{impl} loss vs batch_loss")
    for name, a, b in zip(("lm_head", "embed"), got_g, want_g):
        assert_close_verbose(a, b, atol=1e-6, rtol=1e-5, name=f"{impl} d{name} vs batch_loss")
    return 3


def test_fused_ce_reference_equals_batch_loss():
    ce_matches_batch_loss("reference")


def test_launchers_name_bad_inputs():
    with pytest.raises(ValueError, match=r"rmsnorm.py: weight shape \(8,\) != \(16,\)"):
        rmsnorm.rms_norm_forward(torch.randn(2, 16), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="rope.py: cos/sin must be"):
        rope.rope_rotate_(torch.randn(1, 3, 32), None, torch.randn(4, 16), torch.randn(4, 16))
    with pytest.raises(ValueError, match="rope.py: q strides"):
        rope.rope_rotate_(torch.randn(1, 32, 3).transpose(1, 2), None, torch.randn(3, 16), torch.randn(3, 16))
    with pytest.raises(ValueError, match="swiglu.py: gate"):
        swiglu.swiglu_forward(torch.randn(2, 8), torch.randn(2, 6))
    with pytest.raises(ValueError, match="fused_linear_ce.py: shapes"):
        fce.fused_linear_ce_forward(torch.randn(3, 8), torch.randn(10, 4), torch.zeros(3, dtype=torch.long),
                                    -100, 2 ** 27, True, False)
    with pytest.raises(TypeError, match="fused_linear_ce.py: h dtype"):
        fce.fused_linear_ce_forward(torch.randn(3, 8), torch.randn(10, 8).double(), torch.zeros(3, dtype=torch.long),
                                    -100, 2 ** 27, True, False)
    with pytest.raises(RuntimeError, match=r"fused_linear_ce.py: a target is outside \[0, 10\)"):
        fce.fused_linear_ce_forward(torch.randn(3, 8), torch.randn(10, 8), torch.tensor([0, 10, -100]),
                                    -100, 2 ** 27, True, False)


# -- the kernels under the interpreter ---------------------------------------------------------------------------
def run_group(group: str) -> int:
    """Small shapes: the interpreter runs each program in Python (rows 431 and d 4096 are on the GPU)."""
    assert backend.interpreting()
    torch.manual_seed(0)
    n = 0
    if group == "rmsnorm_rope":
        for dtype in C.DTYPES:
            for shape in ((1, 64), (7, 96)):
                for weight_grad in (False, True):
                    n += C.case_rmsnorm(shape, dtype, "cpu", weight_grad)
        n += C.case_rmsnorm((3, 41, 64), torch.bfloat16, "cpu", True)  # 123 rows, several per program
        n += C.case_rmsnorm((5, 576), torch.float16, "cpu", False)
        n += C.case_rmsnorm((7, 96), torch.bfloat16, "cpu", True, weight_dtype=torch.float32)  # fp32 output
        for dtype in C.DTYPES:
            n += C.case_rope(1, 5, 4, 2, 64, dtype, "cpu", per_row=False, mode="qkv")
            n += C.case_rope(2, 3, 3, 1, 64, dtype, "cpu", per_row=True, mode="pair")
            n += C.case_rope(2, 2, 2, 2, 128, dtype, "cpu", per_row=True, mode="views", table_dtype=torch.float32)
    elif group == "swiglu":
        for dtype in C.DTYPES:
            for fused, inplace in ((True, False), (True, True), (False, False), (False, True)):
                n += C.case_swiglu(7, 96, dtype, "cpu", fused, inplace)
            n += C.case_swiglu(1, 64, dtype, "cpu", True, False)
            n += C.case_swiglu(2, 1100, dtype, "cpu", False, False)  # two column tiles, the second masked
    elif group == "ce":
        for dtype in C.DTYPES:
            n += C.case_ce(7, 64, 1000, dtype, "cpu", 3 * 1000, weight_grad=True)
            n += C.case_ce(5, 64, 1000, dtype, "cpu", 2 * 1000, weight_grad=True, ignored=1.0)
            n += C.case_ce(1, 64, 5000, dtype, "cpu", 1, weight_grad=False, ignored=0.0)  # several BLOCK_V steps
        n += C.case_ce(123, 96, 1000, torch.float32, "cpu", 2 ** 27, weight_grad=False)
        n += ce_matches_batch_loss("triton")
    print(f"{group}: {n} checks passed")
    return n


@pytest.mark.parametrize("group", GROUPS)
def test_block_kernels_under_interpreter(group):
    run_interpreter_group(__file__, group)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(0 if run_group(sys.argv[1]) > 0 else 1)
