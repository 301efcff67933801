"""GPU checks of the fused training step: the grouped LoRA linear in bf16 with the Triton dequantizer against the
module path and float64, and every checkpointing policy (offload through pinned memory and side streams included)
against no checkpointing on a small bf16 NF4 Llama."""
import functools

import pytest
import torch

from qlora_core import activation_checkpoint as C
from qlora_core.llama import Llama
from qlora_core.model_config import LlamaConfig
from qlora_core.lora import apply_lora, linear_group
from qlora_core.ops.nf4_linear import group_linear
from qlora_core.qlinear import quantize_model
from qlora_core.train_loop import batch_loss

from tests.helpers import nonzero_lora_b

pytestmark = pytest.mark.gpu


def _model(layers=4, dropout=0.0):
    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2)
    torch.manual_seed(0)
    m = quantize_model(Llama(cfg, device="cuda", dtype=torch.bfloat16))
    apply_lora(m, r=16, alpha=32, dropout=dropout)
    nonzero_lora_b(m, 0.02)
    return m.train()


def test_group_linear_bf16_against_float64():
    m = _model(layers=1)
    attn = m.model.layers[0].self_attn
    mods = (attn.q_proj, attn.k_proj, attn.v_proj)
    group = linear_group(mods)
    x = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = group_linear(x, group)
        y_mod = torch.cat([mm(x) for mm in mods], dim=-1)
    ref = torch.cat([x.double() @ mm.base_layer.weight.dequantize().double().T
                     + (x.double() @ mm.lora_A.double().T @ mm.lora_B.double().T) * mm.scaling for mm in mods], -1)
    err = (y.double() - ref).abs().max().item()
    torch_err = (y_mod.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + 1e-2, (err, torch_err)
    gy = torch.randn_like(y)
    params = [x] + [p for mm in mods for p in (mm.lora_A, mm.lora_B)]
    g_ours = torch.autograd.grad(y, params, gy)
    g_mod = torch.autograd.grad(y_mod, params, gy)
    for i, (a, b) in enumerate(zip(g_ours, g_mod)):
        rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert rel < 2e-2, (i, rel)  # two bf16 computations of the same grads


def _loss_grads(m, policy, ids):
    m.model.checkpoint_policy = policy
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        s, n = batch_loss(m, ids, ids)
    (s / n).backward()
    params = [p for p in m.parameters() if p.requires_grad]
    g = [p.grad.clone() for p in params]
    m.zero_grad(set_to_none=True)
    return s.detach(), g


@pytest.mark.parametrize("policy", ["full", "save_attn", "offload", ["offload", "full", "save_attn", "none"]])
def test_policies_equal_no_checkpointing(policy):
    m = _model(dropout=0.1)
    ids = torch.randint(0, 4096, (2, 512), device="cuda")
    l0, g0 = _loss_grads(m, "none", ids)
    l1, g1 = _loss_grads(m, policy, ids)
    assert torch.allclose(l0, l1, rtol=1e-6, atol=0), (l0, l1)
    for i, (a, b) in enumerate(zip(g1, g0)):
        rel = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert rel < 1e-3, (policy, i, rel)


def test_offload_keeps_block_inputs_off_the_gpu():
    m = _model(layers=8)
    ids = torch.randint(0, 4096, (8, 1024), device="cuda")
    peaks = {}
    for policy in ("full", "offload"):
        _loss_grads(m, policy, ids)  # warm-up (pinned pool, kernels)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _loss_grads(m, policy, ids)
        peaks[policy] = torch.cuda.max_memory_allocated()
    # at the peak (backward of the last blocks) "full" holds all 8 block inputs (B, T, d) bf16; "offload" at most
    # the fetched one and the prefetched next
    one = 8 * 1024 * 512 * 2
    assert peaks["full"] - peaks["offload"] >= 0.75 * 6 * one, (peaks, one)


def test_save_attn_keeps_the_cuda_attention_op(monkeypatch):
    # the policy is asked in forward and again in recompute (to fetch what forward saved): count forward only
    saved, asked = [], set()

    def spy(ctx, op, *args, **kwargs):
        d = C._keep_attention(ctx, op, *args, **kwargs)
        asked.add(str(op))
        if d == C.CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            saved.append(str(op))
        return d

    monkeypatch.setattr(C, "_SAVE_ATTENTION", functools.partial(C.create_selective_checkpoint_contexts, spy))
    m = _model()
    _loss_grads(m, "save_attn", torch.randint(0, 4096, (2, 256), device="cuda"))
    attention_ops = sorted(s for s in asked if "attention" in s)
    assert len(saved) == 4 and all("scaled_dot_product" in s for s in saved), (saved, attention_ops)
