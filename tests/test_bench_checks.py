"""benchmarks/_checks.py: the learnable stream, the train check and the greedy-token comparisons (pure, CPU, fast)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def checks():
    spec = importlib.util.spec_from_file_location("_checks", ROOT / "benchmarks" / "_checks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ck = checks()


def test_stream_repeats_each_row_and_is_seeded():
    a = ck.learnable_stream(3, 2, 65, 1000, seed=7)
    assert [tuple(t.shape) for t in a] == [(2, 65)] * 3 and a[0].dtype == torch.int64
    for t in a:  # odd length: 33 tokens, then the first 32 again
        assert torch.equal(t[:, 33:], t[:, :32]) and 0 <= int(t.min()) and int(t.max()) < 1000
    assert all(torch.equal(x, y) for x, y in zip(a, ck.learnable_stream(3, 2, 65, 1000, seed=7)))
    assert not torch.equal(a[0], ck.learnable_stream(1, 2, 65, 1000, seed=8)[0])
    assert not torch.equal(a[0], a[1])  # a stream, not one batch repeated


def test_stream_is_zipf_over_a_seeded_ranking():
    (t,) = ck.learnable_stream(1, 4, 4096, 512, seed=0)
    counts = torch.bincount(t[:, :2048].flatten(), minlength=512).double()
    top = counts.sort(descending=True)
    p = ck.zipf_probs(512)
    # the most frequent id's share is p_1 = 1 / H(512, 1.1) = 0.17; 8192 draws put it within +-0.02 (5 sigma)
    assert abs(top.values[0] / counts.sum() - p[0]) < 0.02
    assert int(top.indices[0]) != 0  # ranked by a permutation, not by id
    # learnable: the unigram entropy lies well below the uniform loss ln(V)
    entropy = float(-(p * p.log()).sum())
    assert entropy < math.log(512) - 1.5


def test_init_param_is_a_function_of_the_name():
    a, b, c = (torch.empty(4, 8, dtype=torch.bfloat16) for _ in range(3))
    ck.init_param("model.layers.0.mlp.up_proj.weight", a)
    ck.init_param("model.layers.0.mlp.up_proj.weight", b)
    ck.init_param("model.layers.1.mlp.up_proj.weight", c)
    assert torch.equal(a, b) and not torch.equal(a, c)
    norm = torch.zeros(8)
    ck.init_param("model.norm.weight", norm)
    assert torch.equal(norm, torch.ones(8))


def test_clip_grads_matches_clip_grad_norm():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(2))]
    for p in ps[:3]:
        p.grad = torch.randn_like(p) * 3
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs):
        q.grad = None if p.grad is None else p.grad.clone()
    norms = ck.clip_grads(ps, 1.0)
    total = torch.nn.utils.clip_grad_norm_(qs[:3], 1.0)
    assert torch.allclose(torch.linalg.vector_norm(norms), total)
    assert float(norms[3]) == 0.0  # no grad: norm 0, flagged by train_failure
    for p, q in zip(ps[:3], qs[:3]):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0)


def test_train_failure_rule():
    ok = ck.grad_summary(torch.tensor([0.5, 1.0, 2.0]))
    assert ok == {"grad_norm": pytest.approx(math.sqrt(5.25)), "grad_zero": 0, "grad_nonfinite": 0, "n_lora": 3}
    assert ck.train_failure(12.0, 11.8, ok) is None  # fell by 1.7%
    assert "did not fall by 1%" in ck.train_failure(12.0, 11.9, ok)  # 0.8%: within noise of a lost update
    assert "did not fall" in ck.train_failure(12.0, 12.5, ok)
    assert "not finite" in ck.train_failure(12.0, float("nan"), ok)
    assert ck.train_failure(12.0, 11.0, ck.grad_summary(torch.tensor([0.5, 0.0]))) == "1 of 2 LoRA grads zero"
    bad = ck.grad_summary(torch.tensor([0.5, float("inf"), float("nan")]))
    assert ck.train_failure(12.0, 11.0, bad) == "2 of 3 LoRA grads not finite"


def test_first_divergence_and_agreement():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    b = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [0, 6, 7, 8]])
    assert ck.first_divergence(a, b).tolist() == [4, 1, 0]
    got = ck.token_agreement(a, b)
    assert got == {"rows_equal": pytest.approx(1 / 3), "first_diff": 0, "median_first_diff": 1.0, "n_tokens": 4}
    assert ck.token_agreement(a, a.clone())["first_diff"] is None


def test_reference_verdict_tells_near_ties_from_real_differences():
    V = 5
    ours = torch.tensor([[1, 2], [1, 2], [3, 3]])
    ref = torch.tensor([[1, 2], [1, 4], [0, 3]])
    logits = torch.zeros(3, 2, V)
    logits[1, 1, 4], logits[1, 1, 2] = 2.00, 1.95  # row 1 parts at position 1 by 0.05 nats: a near tie
    logits[2, 0, 0], logits[2, 0, 3] = 3.0, 1.0  # row 2 parts at position 0 by 2 nats: a real difference
    gaps = ck.divergence_gaps(logits, ours, ref)
    assert gaps.tolist() == pytest.approx([0.0, 0.05, 2.0], abs=1e-6)
    got = ck.reference_verdict(logits, ours, ref)
    assert got["rows_equal"] == pytest.approx(1 / 3) and got["rows_ok"] == pytest.approx(2 / 3)
    assert got["max_gap"] == pytest.approx(2.0) and got["failed"].startswith("67% of rows")
    assert ck.reference_verdict(logits[:2], ours[:2], ref[:2])["failed"] is None
