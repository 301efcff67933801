"""The linear_ce op (fused lm_head + cross entropy) on the CPU: qlora_core/ops/linear_ce.py (spec, routing, custom
op) and kernels/linear_ce.py.

  * the reference `fused_linear_cross_entropy_ref` (the spec) forward and backward against float64, chunked and
    not, and against the full-logits loss of a tiny Llama (what transformers computes);
  * under torch.compile the reference is traced as it is: compiled == eager bit for bit, no custom op;
  * the Triton kernel under TRITON_INTERPRET=1 (a fresh subprocess, `python tests/test_linear_ce.py linear_ce`),
    forward and backward against float64 (tests/_block_cases.py), and the custom op the Triton path takes under
    torch.compile (`qlora_core::fused_linear_cross_entropy`): `torch.library.opcheck` per dtype, with and without
    a trainable weight and dh, one chunk and several, and compiled == eager bit for bit (grad_output 1.5, so the
    scaling in its gradient formula is checked too).
    tests/test_gpu_linear_ce.py runs the 8B shapes, the memory bound, autocast and the one-backward contract.
"""
import sys

import pytest
import torch

from qlora_core import backend
from qlora_core.ops import linear_ce
from tests import _block_cases as C
from tests.helpers import assert_close_verbose, run_interpreter_group

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.mark.parametrize("chunk", [2 ** 27, 3 * 1000])  # one chunk; chunks of 3 rows, recomputed in backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ce_reference_path(chunk, dtype):
    C.case_ce(13, 64, 1000, dtype, "cpu", chunk, weight_grad=True, impl="reference")
    C.case_ce(5, 64, 1000, dtype, "cpu", chunk, weight_grad=False, ignored=1.0, impl="reference")


def ce_matches_batch_loss(impl: str) -> int:
    """fused_linear_cross_entropy on a tiny Llama's hidden states (several chunks) equals the full-logits loss
    (F.cross_entropy over model(ids), what transformers computes) in loss and in the lm_head / embedding gradients,
    to fp32 rounding."""
    from qlora_core.llama import Llama
    from qlora_core.model_config import LlamaConfig
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
        got = linear_ce.fused_linear_cross_entropy(h, model.lm_head.weight, y[sel], chunk_logits=chunk)
    got_g = torch.autograd.grad(got, params)
    assert n == int(sel.sum()) and n > 9
    assert_close_verbose(got, want, atol=1e-5, rtol=1e-6, name=f"{impl} loss vs batch_loss")
    for name, a, b in zip(("lm_head", "embed"), got_g, want_g):
        assert_close_verbose(a, b, atol=1e-6, rtol=1e-5, name=f"{impl} d{name} vs batch_loss")
    return 3


def test_fused_ce_reference_equals_batch_loss():
    ce_matches_batch_loss("reference")


def test_launcher_names_bad_inputs():
    from qlora_core.kernels import linear_ce as kernels
    with pytest.raises(ValueError, match="linear_ce.py: shapes"):
        kernels.fused_linear_ce_forward(torch.randn(3, 8), torch.randn(10, 4), torch.zeros(3, dtype=torch.long),
                                        -100, 8, True, False)
    with pytest.raises(TypeError, match="linear_ce.py: h dtype"):
        kernels.fused_linear_ce_forward(torch.randn(3, 8), torch.randn(10, 8).double(),
                                        torch.zeros(3, dtype=torch.long), -100, 8, True, False)
    with pytest.raises(RuntimeError, match=r"linear_ce.py: a target is outside \[0, 10\)"):
        kernels.fused_linear_ce_forward(torch.randn(3, 8), torch.randn(10, 8), torch.tensor([0, 10, -100]),
                                        -100, 8, True, False)
    with pytest.raises(ValueError, match="chunk_logits must be >= 1"):
        linear_ce.fused_linear_cross_entropy(torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long),
                                             chunk_logits=0)


@pytest.mark.parametrize("chunk", [2 ** 27, 4 * 100])
def test_compiled_reference_is_traced(chunk):
    """Under torch.compile the reference (chunks checkpointed) is traced as plain PyTorch (no custom op), equal to
    eager bit for bit; grad_output 1.5."""
    h, w, y = C.ce_inputs(13, 32, 100, torch.bfloat16, "cpu", ignored=0.25, weight_grad=True)
    C.compiled_matches_eager(f"ce reference chunk={chunk}",
                             lambda a, b: linear_ce.fused_linear_cross_entropy(a, b, y, -100, chunk), (h, w),
                             torch.tensor(1.5), set())


# -- the kernel under the interpreter ----------------------------------------------------------------------------
def run_group(group: str) -> int:
    """Small shapes: the interpreter runs each program in Python (vocab 128256 is on the GPU)."""
    assert backend.interpreting() and group == "linear_ce"
    torch.manual_seed(0)
    n = 0
    for dtype in C.DTYPES:
        n += C.case_ce(7, 64, 1000, dtype, "cpu", 3 * 1000, weight_grad=True)
        n += C.case_ce(5, 64, 1000, dtype, "cpu", 2 * 1000, weight_grad=True, ignored=1.0)
        n += C.case_ce(1, 64, 5000, dtype, "cpu", 1, weight_grad=False, ignored=0.0)  # several BLOCK_V steps
    n += C.case_ce(123, 96, 1000, torch.float32, "cpu", 2 ** 27, weight_grad=False)
    n += ce_matches_batch_loss("triton")
    for dtype in C.DTYPES:  # the custom op the Triton path takes under torch.compile
        n += C.op_ce(9, 32, 100, dtype, "cpu", 4 * 100, weight_grad=True)
    n += C.op_ce(9, 32, 100, torch.bfloat16, "cpu", 2 ** 27, weight_grad=False)
    print(f"{group}: {n} checks passed")
    return n


def test_kernel_under_interpreter():
    run_interpreter_group(__file__, "linear_ce")


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(0 if run_group(sys.argv[1]) > 0 else 1)
