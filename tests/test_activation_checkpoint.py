"""Activation checkpointing policies (qlora_core/activation_checkpoint.py): every policy, and a mixed plan, gives
the loss and LoRA grads of the un-checkpointed model (with LoRA dropout on, so the recompute must replay the same
masks); selective checkpointing really skips the attention recompute; the budget planner's choices follow its byte
estimates."""
import pytest
import torch

from qlora_core import activation_checkpoint as C
from qlora_core.llama import Llama
from qlora_core.model_config import LlamaConfig
from qlora_core.lora import apply_lora
from qlora_core.qlinear import quantize_model
from qlora_core.train_loop import batch_loss

from tests.helpers import assert_close_verbose, nonzero_lora_b

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    m = quantize_model(Llama(cfg))
    apply_lora(m, r=4, alpha=8, dropout=0.2)
    nonzero_lora_b(m, 0.1)
    return m.train()


def _loss_and_grads(model, policy, ids):
    model.model.checkpoint_policy = policy
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(123)  # the same dropout masks for every policy
    model.zero_grad(set_to_none=True)
    loss, n = batch_loss(model, ids, ids)
    (loss / n).backward()  # .backward, not autograd.grad: "offload" backpropagates inside its own backward
    grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("policy", ["full", "save_attn", "offload", ["offload", "none", "save_attn"]])
def test_policy_matches_no_checkpointing(model, policy):
    ids = torch.randint(0, 101, (2, 16))
    l0, g0 = _loss_and_grads(model, "none", ids)
    l1, g1 = _loss_and_grads(model, policy, ids)
    assert torch.equal(l0, l1)
    for i, (a, b) in enumerate(zip(g1, g0)):
        assert_close_verbose(a, b, atol=1e-6, rtol=1e-5, name=f"{policy} grad {i}")


def test_dropout_differs_between_seeds(model):
    """Guard for the test above: dropout is really on, so equal grads mean the recompute replayed the masks."""
    ids = torch.randint(0, 101, (2, 16))
    _, g0 = _loss_and_grads(model, "none", ids)
    model.model.checkpoint_policy = "none"
    torch.manual_seed(7)
    loss, n = batch_loss(model, ids, ids)
    g1 = torch.autograd.grad(loss / n, [p for p in model.parameters() if p.requires_grad])
    assert any(not torch.allclose(a, b) for a, b in zip(g0, g1))


def test_save_attn_keeps_the_attention_op_it_sees(model, monkeypatch):
    """The selective-checkpoint policy recognises the SDPA kernel op this device dispatches to (a name mismatch would
    silently turn save_attn into full recompute): it answers MUST_SAVE for it once per block, and only for it."""
    import functools

    seen = []

    def spy(ctx, op, *args, **kwargs):
        decision = C._keep_attention(ctx, op, *args, **kwargs)
        seen.append((str(op), decision))
        return decision

    monkeypatch.setattr(C, "_SAVE_ATTENTION", functools.partial(C.create_selective_checkpoint_contexts, spy))
    model.model.checkpoint_policy = "save_attn"
    ids = torch.randint(0, 101, (1, 8))
    loss, n = batch_loss(model, ids, ids)
    (loss / n).backward()
    model.zero_grad(set_to_none=True)
    model.model.checkpoint_policy = "none"
    saved = [op for op, d in seen if d == C.CheckpointPolicy.MUST_SAVE]
    assert saved and all("scaled_dot_product" in op for op in saved)
    assert len(saved) == len(model.model.layers), saved


def test_bad_policy_is_named(model):
    model.model.checkpoint_policy = "sometimes"
    with pytest.raises(ValueError, match="sometimes"):
        batch_loss(model, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    model.model.checkpoint_policy = ["full"] * 2  # wrong length
    with pytest.raises(ValueError, match="list of 3"):
        batch_loss(model, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    model.model.checkpoint_policy = "none"


def test_planner_follows_its_estimates():
    s = C.BlockShape(tokens=8192, seq=2048, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336)
    gib = 2**30
    per = {p: C.block_bytes(s, p) for p in C.POLICIES}
    assert per["offload"] == 0 < per["full"] < per["save_attn"] < per["none"]
    # nothing extra fits: everything offloaded
    assert C.plan_for_budget(s, 32, 6 * gib, 6 * gib) == ["offload"] * 32
    # room for exactly 10 "full" blocks and no more
    plan = C.plan_for_budget(s, 32, 6 * gib + 10 * per["full"] + 1, 6 * gib)
    used = sum(C.block_bytes(s, p) for p in plan)
    assert used <= 10 * per["full"] + 1
    # unlimited: no recompute anywhere
    assert C.plan_for_budget(s, 32, 1e15, 6 * gib) == ["none"] * 32
    # every plan the planner returns fits its budget
    for extra in (0.5, 3, 7, 20, 40):
        plan = C.plan_for_budget(s, 32, 6 * gib + extra * gib, 6 * gib)
        assert 6 * gib + sum(C.block_bytes(s, p) for p in plan) <= 6 * gib + extra * gib
    assert C.describe(["full", "offload", "full"]) == "2 full, 1 offload"


def test_memory_budget_plans_at_the_first_step(model, capsys):
    from qlora_core.activation_checkpoint import apply_policy

    ids = torch.randint(0, 101, (2, 16))
    l0, g0 = _loss_and_grads(model, "none", ids)
    assert "budget" in apply_policy(model, "full", budget_gib=0.001)  # far below the working set: all offloaded
    l1, g1 = _loss_and_grads(model, model.model.checkpoint_policy, ids)
    assert "3 offload" in capsys.readouterr().out
    assert torch.equal(l0, l1)
    for a, b in zip(g1, g0):
        assert_close_verbose(a, b, atol=1e-6, rtol=1e-5, name="budget grads")
    apply_policy(model, "full", budget_gib=1000.0)
    _loss_and_grads(model, model.model.checkpoint_policy, ids)
    assert "3 none" in capsys.readouterr().out
    with pytest.raises(ValueError, match="sometimes"):
        apply_policy(model, "sometimes")
    model.model.checkpoint_policy = "none"


def test_full_recompute_stops_before_the_last_gemm(model, monkeypatch):
    """Under "full" the recompute in backward ends once down_proj's LoRA input is saved again (early stop): the
    down-projection's base GEMM runs once per block, o_proj's twice (forward and recompute)."""
    from qlora_core.ops import nf4_linear

    calls = []
    real = nf4_linear.BaseUpFunction.forward

    def spy(ctx, x2, h, lead, group, *b):
        calls.append(group.in_features)
        return real(ctx, x2, h, lead, group, *b)

    monkeypatch.setattr(nf4_linear.BaseUpFunction, "forward", staticmethod(spy))
    model.model.checkpoint_policy = "full"
    loss, n = batch_loss(model, torch.randint(0, 101, (1, 8)), torch.randint(0, 101, (1, 8)))
    (loss / n).backward()
    model.zero_grad(set_to_none=True)
    model.model.checkpoint_policy = "none"
    layers, cfg = len(model.model.layers), model.config
    assert calls.count(cfg.intermediate_size) == layers  # down_proj: never recomputed
    assert calls.count(cfg.hidden_size) == 2 * 3 * layers  # q/k/v and gate/up groups (K = d): forward + recompute
