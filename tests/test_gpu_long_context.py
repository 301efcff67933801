"""GPU check of the long-context mode at T = 32k on a narrow bf16 NF4 Llama whose MLP is wide (I = 8 d, so its
intermediates dominate as on an 8B): under "offload" the MLP in 4096-token chunks gives the unchunked loss and
LoRA grads within bf16's own error (bf16 unchunked against fp32 unchunked of the same NF4 model), plain and in packed
rows, and (plain) its peak memory drops by at least half of the MLP's (T, 3I) bf16 intermediates (384 MiB). Tens of
seconds on an H100, most of it the first Triton compiles."""
import copy

import pytest
import torch

from qlora_core import activation_checkpoint as C
from qlora_core.llama import Llama
from qlora_core.model_config import LlamaConfig
from qlora_core.lora import apply_lora
from qlora_core.qlinear import quantize_model
from qlora_core.train_loop import batch_loss

from tests.helpers import nonzero_lora_b

pytestmark = pytest.mark.gpu

T, CHUNK = 32768, 4096


def _model(dtype):
    """2 blocks, d 256, I 2048 (8 d: the MLP dominates as on an 8B), NF4, LoRA r 8 on every projection."""
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=2048, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    m = quantize_model(Llama(cfg, device="cuda", dtype=dtype))
    apply_lora(m, r=8, alpha=16, dropout=0.0)
    torch.manual_seed(1)
    nonzero_lora_b(m, 0.02)
    return m.train()


def _step(m, ids, chunk, docs=None):
    """(mean loss, LoRA grads, peak allocated bytes above the start) of one offloaded step."""
    C.apply_policy(m, "offload", chunk_tokens=chunk)
    m.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    pos, doc = docs if docs is not None else (None, None)
    loss, n = batch_loss(m, ids, ids, pos, doc)
    (loss / n).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    return (loss / n).item(), [p.grad.float().clone() for p in m.parameters() if p.requires_grad], peak


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_chunked_mlp_32k_matches_and_saves_memory(packed):
    ids = torch.randint(0, 512, (1, T), device="cuda")
    docs = None
    if packed:  # three documents: attention stays inside each, the MLP chunks cross their borders
        pos = torch.cat([torch.arange(10000), torch.arange(12345), torch.arange(T - 22345)]).cuda()[None]
        docs = (pos, (pos == 0).long().cumsum(1))
    m = _model(torch.bfloat16)
    m32 = copy.deepcopy(m).float()  # the same NF4 codes and LoRA; fp32 activations (QuantLinear keeps its dtype)
    l32, g32, _ = _step(m32, ids, 0, docs)
    del m32
    _step(m, ids, CHUNK, docs)  # warm-up: kernels compiled, the pinned pool filled, before peaks are compared
    l0, g0, peak0 = _step(m, ids, 0, docs)
    l1, g1, peak1 = _step(m, ids, CHUNK, docs)
    assert abs(l1 - l0) <= 2 * abs(l0 - l32) + 1e-2
    for i, (a, b, r) in enumerate(zip(g1, g0, g32)):
        tol = 2 * (b - r).abs().max().item() + 1e-2 * r.abs().max().item()
        assert (a - b).abs().max().item() <= tol, f"grad {i}"
    if not packed:  # packed rows peak while building the (T, T) document mask (GiBs), in both runs alike
        mlp = T * 3 * 2048 * 2  # gate/up and SwiGLU out, bf16
        assert peak0 - peak1 >= mlp / 2, (peak0, peak1, mlp)
