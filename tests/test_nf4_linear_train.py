"""The grouped path of nf4_linear (qlora_core/ops/nf4_linear.py; groups built by lora.linear_group) against the
module-by-module path (LoRALinear, which matches PEFT's lora.Linear bit for bit): outputs and the grads of x, A and
B, for q/k/v-like groups of quantized, dense, merged and un-adapted members, with bias, with dropout (masks rebuilt
from the Function's seed), under bf16."""
import pytest
import torch
from torch import nn

from qlora_core.lora import LoRALinear, linear_group
from qlora_core.ops import nf4_linear
from qlora_core.ops.nf4_linear import group_linear
from qlora_core.ops.quant4 import quantize
from qlora_core.qlinear import QuantLinear

from tests.helpers import assert_close_verbose

pytestmark = pytest.mark.usefixtures("one_thread")
K = 64


def _lora(base, r, seed, dropout=0.0, rslora=False):
    torch.manual_seed(seed)
    m = LoRALinear(base, r=r, alpha=2 * r + 1, dropout=dropout, use_rslora=rslora)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.2)  # a fresh B is zero: make the adapter do something
    return m


def _quant(n, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, K, generator=g) * 0.05
    return QuantLinear(quantize(w, "nf4", 64, True), torch.randn(n, generator=g) if bias else None)


def _dense(n, seed, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(K, n, bias=bias)


def _members(kind):
    if kind == "qkv":
        return [_lora(_quant(48, 1), 8, 11), _lora(_quant(16, 2), 8, 12), _lora(_quant(16, 3), 4, 13, rslora=True)]
    if kind == "mixed":
        merged = _lora(_quant(24, 4), 8, 14)
        merged.merge()
        return [_lora(_dense(32, 5), 8, 15), merged, _quant(16, 6, bias=True), _lora(_quant(8, 7), 2, 16)]
    if kind == "single":
        return [_lora(_quant(40, 8), 16, 17)]
    raise ValueError(kind)


def _grads(modules, x, out):
    params = [p for m in modules if not getattr(m, "merged", False) for p in m.parameters() if p.requires_grad]
    gy = torch.randn_like(out)
    return torch.autograd.grad(out, [x, *params], gy)


@pytest.mark.parametrize("kind", ["qkv", "mixed", "single"])
def test_group_equals_modules_fp32(kind):
    mods = _members(kind)
    x = torch.randn(3, 7, K, requires_grad=True)
    group = linear_group(mods)
    assert group is not None
    y = group_linear(x, group)
    ref = torch.cat([m(x) for m in mods], dim=-1)
    assert_close_verbose(y, ref, atol=1e-5, rtol=1e-5, name=f"{kind} forward")
    torch.manual_seed(5)
    g_ours = _grads(mods, x, y)
    torch.manual_seed(5)
    g_ref = _grads(mods, x, ref)
    for i, (a, b) in enumerate(zip(g_ours, g_ref)):
        assert a is not None and a.dtype == b.dtype
        assert_close_verbose(a, b, atol=1e-5, rtol=1e-4, name=f"{kind} grad {i}")


def test_lora_copies_are_rebuilt_after_an_update():
    mods = _members("qkv")
    group = linear_group(mods)
    x = torch.randn(4, K)
    group_linear(x, group)
    with torch.no_grad():
        mods[1].lora_B.add_(1.0)  # what an optimizer step does: in place, bumping _version
    y = group_linear(x, group)
    assert_close_verbose(y, torch.cat([m(x) for m in mods], dim=-1), atol=1e-5, rtol=1e-5, name="after update")


def test_dropout_masks_match_a_reference_with_the_same_masks(monkeypatch):
    mods = [_lora(_quant(16, 1), 4, 1, dropout=0.3), _lora(_quant(8, 2), 4, 2, dropout=0.5)]
    for m in mods:
        m.train()
    seen = []
    real = nf4_linear.dropout_masks
    monkeypatch.setattr(nf4_linear, "dropout_masks", lambda *a: seen.append(a) or real(*a))
    x = torch.randn(9, K, requires_grad=True)
    group = linear_group(mods)
    y = group_linear(x, group)
    seed, ps, shape, dev = seen[0]
    assert ps == [0.3, 0.5]
    masks = real(seed, ps, shape, dev)
    assert 0.2 < 1 - masks[0].float().mean() < 0.4 and 0.4 < 1 - masks[1].float().mean() < 0.6
    ref = torch.cat([m.base_layer(x) + (x * mk / (1 - p)) @ m.lora_A.T @ m.lora_B.T * m.scaling
                     for m, mk, p in zip(mods, masks, ps)], dim=-1)
    assert_close_verbose(y, ref, atol=1e-5, rtol=1e-5, name="dropout forward")
    torch.manual_seed(3)
    g_ours = _grads(mods, x, y)
    assert len(seen) == 2 and seen[1][0] == seed  # backward rebuilt the same masks
    torch.manual_seed(3)
    g_ref = _grads(mods, x, ref)
    for i, (a, b) in enumerate(zip(g_ours, g_ref)):
        assert_close_verbose(a, b, atol=1e-5, rtol=1e-4, name=f"dropout grad {i}")


def test_eval_mode_has_no_dropout():
    mods = [_lora(_quant(16, 1), 4, 1, dropout=0.5)]
    mods[0].eval()
    x = torch.randn(5, K)
    group = linear_group(mods)
    assert_close_verbose(group_linear(x, group), mods[0](x), atol=1e-5, rtol=1e-5, name="eval")


def test_bf16_against_float64():
    """Under bf16 autocast the group computes in bf16; its error against the float64 math is within 2x that of the
    module path under the same autocast (PyTorch's own bf16 error), plus the bf16 atol."""
    mods = _members("qkv")
    x = torch.randn(64, K)
    group = linear_group(mods)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = group_linear(x, group)
        y_mod = torch.cat([m(x) for m in mods], dim=-1)
    assert y.dtype == torch.bfloat16
    ref = torch.cat([x.double() @ m.base_layer.weight.dequantize().double().T
                     + (x.double() @ m.lora_A.double().T @ m.lora_B.double().T) * m.scaling for m in mods], dim=-1)
    err = (y.double() - ref).abs().max().item()
    torch_err = (y_mod.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + 1e-2, (err, torch_err)


def test_ungroupable_modules_are_refused():
    assert linear_group([nn.Conv1d(3, 3, 1)]) is None
    assert linear_group([_quant(8, 1), nn.Linear(K + 1, 8)]) is None


def test_llama_loss_and_lora_grads_match_the_module_path():
    """A tiny NF4 + LoRA Llama with gradient checkpointing: the grouped projections give the module path's loss and
    LoRA grads (fp32, CPU)."""
    from qlora_core.train_loop import batch_loss
    from tests._tiny import nf4_lora_llama

    model = nf4_lora_llama(layers=2)
    model.gradient_checkpointing = True
    ids = torch.randint(0, 97, (2, 12))
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for fused in (True, False):
        for m in model.modules():
            if hasattr(m, "q_proj") or hasattr(m, "gate_proj"):
                m.fuse_projections = fused
        loss, n = batch_loss(model, ids, ids)
        if fused:  # the grouped path really ran: every block cached a group for q/k/v, o, gate/up and down
            for layer in model.model.layers:
                groups = {**layer.self_attn.__dict__["_linear_groups"], **layer.mlp.__dict__["_linear_groups"]}
                assert all(g is not None for g in groups.values())
        results.append((loss.detach(), torch.autograd.grad(loss / n, params)))
    (l1, g1), (l2, g2) = results
    assert_close_verbose(l1, l2, atol=1e-5, rtol=1e-6, name="loss")
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert_close_verbose(a, b, atol=1e-6, rtol=1e-4, name=f"grad {i}")
