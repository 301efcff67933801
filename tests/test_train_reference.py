"""train() against a plain PyTorch loop written here, through train()'s public interface only (TrainConfig,
TrainResult, metrics.jsonl, the saved adapter), so the test survives a rewrite of the loop's insides.

The reference loop runs every document of the step *alone* (batch 1, its own positions 0..len-1, no packing,
no padding), sums the cross entropy over its label tokens, divides by the step's label count, clips the global
grad norm with torch's formula, steps torch.optim.AdamW(foreach=False) and sets the next step's learning rate
from the warmup + cosine formula written below. train() meanwhile packs the same documents into 4 rows of
different lengths and document boundaries, 2 rows per micro-batch, 2 micro-batches per step, with label counts
such that every pairing of the rows into micro-batches gives two unequal counts. So one comparison checks:
  * the loss is the mean over the whole accumulated step (a per-micro-batch mean weights tokens differently);
  * packed rows with batch > 1 attend within their own document (per-document masks and positions per row);
  * the scheduler steps after the optimizer (step k uses lr(k-1)); warmup and cosine; clipping (active at
    every step: the pre-clip norm exceeds max_grad_norm); decoupled weight decay reaches the optimizer.
Each step takes all 4 rows (one epoch per step), so the row order train() draws does not matter to the math.
The test runs on chat records (response-only labels: a document's first token is never a label) and on
{"text"} records, where every token of a document is a label, its first one included, packed and unpacked (4
documents, one per row): a loop that counted that unpredictable first label (one too many per row) or let a
packed row's previous document predict it would diverge from the reference, which scores each document alone.

The optimizer is PagedAdamW with optim_bits=32 on our side: it is bit-identical to torch.optim.AdamW(foreach=False)
on fp32 CPU tensors (tests/test_optim.py), so the comparison measures the loop, not 8-bit state noise (LoRA
tensors of this model are all < 4096 elements and would take the 32-bit update under optim_bits=8 anyway).
Tolerance (STYLE.md): the reference runs twice, in fp32 and in float64 (dense weights equal to the dequantized
NF4 ones); train() must be within 2x the fp32 reference's distance from the float64 one, + DTYPE_ATOL[fp32].
The initial adapter comes from train() itself with lr=0 (same seed, so the same LoRA init; AdamW with lr 0 and
any decay leaves every parameter as it was).
"""
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

import qlora_core as qc
from qlora_core import data as D
from qlora_core.lora import LoraConfig
from qlora_core.train_config import TrainConfig
from qlora_core.train_loop import train
from tests._tiny import make_model_folder, write_jsonl
from tests.helpers import DTYPE_ATOL, assert_close_verbose

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

RESPONSE_WORDS = (1, 2, 6, 8, 3, 12, 5, 9)  # letters per response: packs (seq_len 56) into 4 rows, see _premises
TEXT_WORDS = (20, 25, 30, 18, 22, 27, 15, 33)  # letters per {"text"} record: 4 rows of 2 documents
SEQ_LEN, BATCH, ACCUM = 56, 2, 2
STEPS, WARMUP, LR, MIN_RATIO = 5, 2, 1e-2, 0.1
WEIGHT_DECAY, CLIP = 0.5, 0.05
LORA = LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0)


def _records(kind: str) -> list[dict]:
    rng = random.Random(0)
    out = []
    for k in {"chat": RESPONSE_WORDS, "text": TEXT_WORDS, "text-unpacked": TEXT_WORDS[:BATCH * ACCUM]}[kind]:
        w = [rng.choice("abcdef") for _ in range(k)]
        out.append({"instruction": "reverse " + " ".join(w), "response": " ".join(reversed(w))} if kind == "chat"
                   else {"text": " ".join(w)})
    return out


@pytest.fixture(scope="module", params=["chat", "text", "text-unpacked"])
def setup(request, tmp_path_factory):
    """(root, model folder, data file, packed)."""
    root = tmp_path_factory.mktemp(f"train_ref_{request.param}")
    return (root, make_model_folder(root / "model"), write_jsonl(root / "data.jsonl", _records(request.param)),
            request.param != "text-unpacked")


def _cfg(setup, out: str, **kw) -> TrainConfig:
    root, model, data, packed = setup
    base = dict(model=str(model), data=str(data), output=str(root / out), max_steps=STEPS, batch_size=BATCH,
                grad_accum=ACCUM, seq_len=SEQ_LEN, lr=LR, min_lr_ratio=MIN_RATIO, warmup_steps=WARMUP,
                weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP, quant="nf4", optim_bits=32, dtype="float32",
                device="cpu", eval_fraction=0.0, eval_every=0, save_every=0, log_every=1000, seed=3,
                pack=packed, pack_isolate=True, gradient_checkpointing=True, lora=LORA)
    base.update(kw)
    return TrainConfig(**base)


def lr_at(step: int) -> float:
    """Learning rate of 0-based step `step`: linear warmup to LR over WARMUP steps, then cosine to MIN_RATIO*LR."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = (step - WARMUP) / (STEPS - WARMUP)
    return LR * (MIN_RATIO + (1 - MIN_RATIO) * (1 + math.cos(math.pi * t)) / 2)


def _documents(setup) -> list[D.Sample]:
    tok = D.TextTokenizer.from_folder(setup[1])
    docs, _ = D.encode_all(tok, D.read_jsonl(setup[2]), SEQ_LEN)
    return docs


def _labels_after_shift(s: D.Sample) -> int:
    return sum(1 for y in s.labels[1:] if y != D.IGNORE_INDEX)


def _premises(docs: list[D.Sample], packed: bool) -> None:
    """The rows are what this test needs: 4 rows (one step = all of them), packed: each with >= 2 documents at
    boundaries no other row shares; unequal label counts for every split into two micro-batches."""
    rows = D.pack(docs, SEQ_LEN) if packed else docs
    assert len(rows) == BATCH * ACCUM, [len(r) for r in rows]
    if packed:
        starts = [tuple(i for i, p in enumerate(r.position_ids) if p == 0) for r in rows]
        assert all(len(s) >= 2 for s in starts) and len(set(starts)) == len(rows), starts
    n = [_labels_after_shift(r) for r in rows]
    for a, b in ((0, 1), (0, 2), (0, 3)):
        c, d = (i for i in range(4) if i not in (a, b))
        assert n[a] + n[b] != n[c] + n[d], f"micro-batch label counts can be equal: {n}"
    assert sum(n) == sum(_labels_after_shift(d) for d in docs)


def _dense(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model with each quantized linear replaced by a dense one holding dequantize(q) (exact in fp32), cast
    to dtype: the float64 twin of the NF4 model."""
    from qlora_core.qlinear import QuantLinear
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, QuantLinear):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                lin.weight = torch.nn.Parameter(qc.dequantize(child.weight).float(), requires_grad=False)
                if child.bias is not None:
                    lin.bias = torch.nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                setattr(m, child_name, lin)
    return model.to(dtype)


def reference_loop(setup, init_dir, docs, dtype):
    """The plain loop: (per-step records {loss, lr, grad_norm}, {adapter key: tensor}) in `dtype`."""
    from qlora_core.adapter import KEY_PREFIX, load_adapter
    from qlora_core.lora import apply_lora, lora_modules
    model = qc.load_llama(setup[1], quantize="nf4", dtype=torch.float32)
    apply_lora(model, r=LORA.r, alpha=LORA.lora_alpha, dropout=0.0)
    load_adapter(model, init_dir, check_base=False)
    if dtype != torch.float32:
        model = _dense(model, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=False)
    n_labels = sum(_labels_after_shift(d) for d in docs)
    records = []
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for d in docs:
            ids, labels = torch.tensor([d.input_ids]), torch.tensor(d.labels)
            logits = model(ids)[0, :-1]
            ce = F.cross_entropy(logits, labels[1:], reduction="sum")
            (ce / n_labels).backward()
            total += ce.item()
        norm = math.sqrt(sum(p.grad.double().square().sum().item() for p in params))
        coef = min(1.0, CLIP / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s rule
        for p in params:
            p.grad.mul_(coef)
        opt.step()
        records.append({"loss": total / n_labels, "lr": lr_at(step), "grad_norm": norm})
    weights = {}
    for name, m in lora_modules(model).items():
        weights[f"{KEY_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()
        weights[f"{KEY_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()
    return records, weights


def _bound(ref32: torch.Tensor, ref64: torch.Tensor) -> float:
    return 2.0 * (ref32.double() - ref64.double()).abs().max().item() + DTYPE_ATOL[torch.float32]


def test_train_matches_plain_pytorch_loop(setup):
    from safetensors.torch import load_file
    root = setup[0]
    docs = _documents(setup)
    _premises(docs, setup[3])

    init = train(_cfg(setup, "init", lr=0.0, max_steps=1))
    assert init.steps == 1 and init.stopped is None
    result = train(_cfg(setup, "run"))
    assert result.steps == STEPS and result.stopped is None and result.evals == []
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert result.losses == [m["loss"] for m in metrics]

    rec32, w32 = reference_loop(setup, root / "init", docs, torch.float32)
    rec64, w64 = reference_loop(setup, root / "init", docs, torch.float64)
    assert all(r["grad_norm"] > 2 * CLIP for r in rec64), "clipping must be active at every step"

    for key in ("loss", "grad_norm"):
        ours = torch.tensor([m[key] for m in metrics], dtype=torch.float64)
        r32 = torch.tensor([r[key] for r in rec32], dtype=torch.float64)
        r64 = torch.tensor([r[key] for r in rec64], dtype=torch.float64)
        assert_close_verbose(ours, r64, atol=_bound(r32, r64), rtol=0, name=f"metrics {key} per step")
    for m, r in zip(metrics, rec64):  # the lr the step used: same formula, stepped after the optimizer
        assert m["lr"] == pytest.approx(r["lr"], rel=1e-12, abs=0), (m["step"], m["lr"], r["lr"])

    trained = load_file(str(root / "run" / "adapter_model.safetensors"))
    start = load_file(str(root / "init" / "adapter_model.safetensors"))
    assert trained.keys() == w64.keys() == start.keys()
    moved = max((trained[k].double() - start[k].double()).abs().max().item() for k in trained)
    worst = 0.0
    for k in trained:
        bound = _bound(w32[k], w64[k])
        worst = max(worst, bound)
        assert_close_verbose(trained[k], w64[k], atol=bound, rtol=0, name=k)
    assert moved > 100 * worst, f"adapters moved {moved:.2e}, tolerance {worst:.2e}: the comparison is too loose"
