"""The training loop (train_loop.py) on a tiny random Llama: it learns, the loss is exact, accumulation is exact,
resume is bit-exact, non-finite losses are skipped and stop the run."""
import dataclasses
import json
import math

import pytest
import torch

import qlora_core.train_checkpoint as C
import qlora_core.train_loop as T
from qlora_core import data as D
from qlora_core.lora import LoraConfig
from qlora_core.train_config import TrainConfig
from tests._tiny import make_model_folder, swap_task, write_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = make_model_folder(root / "model")
    data = write_jsonl(root / "data.jsonl", swap_task(240))
    return root, model, data


def _cfg(setup, out, **kw):
    root, model, data = setup
    base = dict(model=str(model), data=str(data), output=str(root / out), max_steps=8, batch_size=4, seq_len=64,
                lr=3e-3, lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1), eval_every=4, save_every=2,
                log_every=100, eval_fraction=0.1, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _adapter(out):
    from safetensors.torch import load_file
    return load_file(str(out / "adapter_model.safetensors"))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loop_learns_the_task(setup):
    cfg = _cfg(setup, "learn", max_steps=40, eval_every=20, lora=LoraConfig(r=4, lora_alpha=8), save_every=0, lr=1e-2)
    r = T.train(cfg)
    first, last = sum(r.losses[:5]) / 5, sum(r.losses[-5:]) / 5
    assert r.stopped is None and r.steps == 40
    # a random 2-layer model with r=4 adapters: the loss must fall by a quarter in 40 steps (it falls by ~35%:
    # from ~ln(vocab) towards the entropy of the letter choices)
    assert last < 0.75 * first, (first, last)
    assert r.evals[-1][1] < r.evals[0][1] and math.isclose(r.evals[-1][2], math.exp(r.evals[-1][1]))
    m = _metrics(setup[0] / "learn")
    assert [x["step"] for x in m] == list(range(1, 41)) and all(isinstance(x["loss"], float) for x in m)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (setup[0] / "learn" / f).is_file()


@pytest.mark.parametrize("chunk_elems", [T.LOSS_CHUNK_ELEMS, 3 * 320])  # one chunk; chunks of 3 rows
def test_batch_loss_equals_full_logits_cross_entropy(setup, monkeypatch, chunk_elems):
    from qlora_core.loading import load_llama
    from qlora_core.lora import apply_lora
    monkeypatch.setattr(T, "LOSS_CHUNK_ELEMS", chunk_elems)
    model = load_llama(setup[1], quantize="nf4", dtype=torch.float32)
    apply_lora(model, r=4, alpha=8)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (3, 11), generator=g)
    labels = torch.where(torch.rand(3, 11, generator=g) < 0.5, ids, D.IGNORE_INDEX)
    s, n = T.batch_loss(model, ids, labels)
    s.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    logits = model(ids)  # reference: full logits, shifted, mean-free sum
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                            labels[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    assert n == int((labels[:, 1:] != D.IGNORE_INDEX).sum())
    # fp32 sum of n terms vs the float64 reference: a few ulps per term
    assert abs(s.item() - ref.item()) <= 1e-5 * n * max(1.0, abs(ref.item()) / n)
    for a, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_grad_accumulation_equals_one_big_batch(setup):
    """Two micro-batches of 2 rows, each loss divided by the step's label count == one batch of 4 rows."""
    from qlora_core.loading import load_llama
    from qlora_core.lora import apply_lora
    model = load_llama(setup[1], quantize="nf4", dtype=torch.float32)
    apply_lora(model, r=4, alpha=8)
    tok = D.TextTokenizer.from_folder(setup[1])
    samples, _ = D.encode_all(tok, D.read_jsonl(setup[2])[:4], 64)
    params = [p for p in model.parameters() if p.requires_grad]
    ids, labels = D.collate(samples, tok.pad_token_id)
    s, n = T.batch_loss(model, ids, labels)
    (s / n).backward()
    big = [p.grad.clone() for p in params]
    model.zero_grad()
    for part in (samples[:2], samples[2:]):
        ids, labels = D.collate(part, tok.pad_token_id)
        s, _ = T.batch_loss(model, ids, labels)
        (s / n).backward()
    for a, p in zip(big, params):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("isolate", [True, False])
def test_packed_isolated_loss_and_grads_equal_samples_alone(setup, isolate):
    """A packed row of 4 samples with per-sample attention (the loop's default) has the loss sum, label count and
    LoRA gradients of the 4 samples run one by one, also with gradient checkpointing in train mode; with
    isolation off the packed loss differs (later samples attend to earlier ones)."""
    from qlora_core.loading import load_llama
    from qlora_core.lora import apply_lora
    model = load_llama(setup[1], quantize="nf4", dtype=torch.float32)
    apply_lora(model, r=4, alpha=8)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    model.train()
    model.gradient_checkpointing = True
    tok = D.TextTokenizer.from_folder(setup[1])
    samples, _ = D.encode_all(tok, D.read_jsonl(setup[2])[:4], 64)
    row = D.pack(samples, 4 * 64)
    assert len(row) == 1
    params = [p for p in model.parameters() if p.requires_grad]
    ids, labels = D.collate(row, tok.pad_token_id)
    pos, doc = D.collate_positions(row) if isolate else (None, None)
    s, n = T.batch_loss(model, ids, labels, pos, doc)
    s.backward()
    packed = [p.grad.clone() for p in params]
    model.zero_grad()
    s_alone, n_alone = 0.0, 0
    for smp in samples:
        ids, labels = D.collate([smp], tok.pad_token_id)
        si, ni = T.batch_loss(model, ids, labels)
        si.backward()
        s_alone, n_alone = s_alone + si.item(), n_alone + ni
    assert n == n_alone
    if isolate:
        assert abs(s.item() - s_alone) <= 1e-5 * n
        for a, p in zip(packed, params):
            torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    else:
        assert abs(s.item() - s_alone) > 1e-3, "samples in one row did not see each other"


def test_lr_schedule():
    f = [T.lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert T.lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert T.lr_factor(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)


class _Killed(Exception):
    pass


def test_resume_after_kill_is_exact(setup, monkeypatch):
    """8 steps straight == 'killed' in the middle of step 6 (after the step-4 checkpoint, with step-5 metrics
    already written) and resumed: same losses at every step and bitwise-equal adapter weights. Dropout is on, so
    the RNG state must come back too."""
    straight = T.train(_cfg(setup, "straight"))
    real = T.batch_loss
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # step 6's forward; eval calls do not pass here (they run after the step)
            raise _Killed
        return real(*a, **k)

    monkeypatch.setattr(T, "batch_loss", dying)
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: (0.0, 1.0))
    with pytest.raises(_Killed):
        T.train(_cfg(setup, "killed", save_every=4))
    monkeypatch.undo()
    out = setup[0] / "killed"
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 4
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4, 5]
    resumed = T.train(_cfg(setup, "killed", save_every=4, resume=True))
    assert resumed.steps == 8 and len(resumed.losses) == 4
    a, b = _metrics(setup[0] / "straight"), _metrics(out)
    assert [m["step"] for m in b] == list(range(1, 9))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [m.get("eval_loss") for m in a][4:] == [m.get("eval_loss") for m in b][4:]
    wa, wb = _adapter(setup[0] / "straight"), _adapter(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert straight.losses == [m["loss"] for m in a]


def test_resume_without_checkpoint_starts_fresh(setup, capsys):
    r = T.train(_cfg(setup, "fresh", max_steps=2, resume=True))
    assert r.steps == 2 and "starting fresh" in capsys.readouterr().out


def test_nonfinite_loss_skips_step_then_stops(setup, monkeypatch):
    real = T.batch_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        s, n = real(*a, **k)
        calls["n"] += 1
        if torch.is_grad_enabled() and calls["n"] in (2, 5, 6, 7):
            return s * float("nan"), n
        return s, n

    monkeypatch.setattr(T, "batch_loss", flaky)
    weights = []
    real_save = C.save_checkpoint

    def spy(out, step, model, *a, **k):
        weights.append((step, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
        return real_save(out, step, model, *a, **k)

    monkeypatch.setattr(C, "save_checkpoint", spy)
    r = T.train(_cfg(setup, "nan", max_steps=20, eval_fraction=0.0, save_every=1, max_bad_steps=3))
    # step 2 is skipped and training goes on; steps 5, 6, 7 are three in a row: stop after step 7
    assert r.steps == 7 and r.stopped is not None and "3 consecutive" in r.stopped
    m = _metrics(setup[0] / "nan")
    assert [x.get("skipped", False) for x in m] == [False, True, False, False, True, True, True]
    assert m[1]["loss"] is None and m[0]["loss"] is not None
    # a skipped step leaves the adapter untouched
    w = dict(weights)
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1]) and not all(torch.equal(w[2][k], w[3][k]) for k in w[2])


def test_config_errors():
    with pytest.raises(ValueError, match="quant"):
        TrainConfig(model="m", data="d", quant="int8")
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(model="m", data="d", max_steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(model="m", data="d", batch_size=0)
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(model="m", data="d", parallel="tp")
    with pytest.raises(ValueError, match="r must be a positive int"):
        TrainConfig(model="m", data="d", lora=LoraConfig(r=0))


def test_config_holds_a_lora_config_and_round_trips():
    """TrainConfig.lora is a LoraConfig; to_dict/from_dict round-trip (as a checkpoint stores it); keys no field
    knows are ignored."""
    cfg = TrainConfig(model="m", data="d", lora=LoraConfig(r=8, lora_alpha=16.0, target_modules=["q_proj", "v_proj"]))
    assert cfg.lora == LoraConfig(r=8, lora_alpha=16.0, lora_dropout=0.0, target_modules=("q_proj", "v_proj"))
    assert dataclasses.replace(cfg, max_steps=3).lora == cfg.lora
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    regex = TrainConfig(lora=LoraConfig(target_modules="all-linear", dtype=torch.bfloat16))
    assert TrainConfig.from_dict(regex.to_dict()) == regex
    back = TrainConfig.from_dict({**cfg.to_dict(), "max_steps": 7, "gone_field": 1})
    assert back.max_steps == 7 and back.lora == cfg.lora


@pytest.mark.gpu
def test_loop_on_gpu_learns_and_resumes(setup, monkeypatch):
    """bf16 autocast, Triton NF4 kernels, gradient checkpointing and the paged 8-bit optimizer on CUDA: the loop
    learns, and a run killed mid-way and resumed equals the straight run bit for bit (losses, eval losses after
    the checkpoint, adapter). The exact runs use torch's deterministic algorithms (memory-efficient attention's
    backward otherwise splits the keys and adds with atomics); a second straight run checks that premise first,
    so a failure says whether a kernel or the resume broke it."""
    cfg = _cfg(setup, "gpu", max_steps=40, eval_every=20, lora=LoraConfig(r=4, lora_alpha=8), save_every=0, lr=1e-2,
               device="cuda")
    r = T.train(cfg)
    assert sum(r.losses[-5:]) / 5 < 0.75 * sum(r.losses[:5]) / 5
    real, calls = T.batch_loss, {"n": 0}

    def dying(*a, **k):  # killed in step 6's forward (eval runs without grad and is not counted)
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == 6:
            raise _Killed
        return real(*a, **k)

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn, not raise: the assertions below decide
    try:
        straight = T.train(_cfg(setup, "gpu-a", device="cuda"))
        again = T.train(_cfg(setup, "gpu-a2", device="cuda"))
        monkeypatch.setattr(T, "batch_loss", dying)
        with pytest.raises(_Killed):
            T.train(_cfg(setup, "gpu-b", device="cuda", save_every=4))
        monkeypatch.undo()
        resumed = T.train(_cfg(setup, "gpu-b", device="cuda", save_every=4, resume=True))
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    assert straight.steps == again.steps == resumed.steps == 8 and len(resumed.losses) == 4
    a, a2, b = (_metrics(setup[0] / d) for d in ("gpu-a", "gpu-a2", "gpu-b"))
    wa, wa2, wb = (_adapter(setup[0] / d) for d in ("gpu-a", "gpu-a2", "gpu-b"))

    def differences(m1, m2, w1, w2):
        steps = [x["step"] for x, y in zip(m1, m2)
                 if (x["loss"], x.get("eval_loss")) != (y["loss"], y.get("eval_loss"))]
        tensors = {k: (w1[k].float() - w2[k].float()).abs().max().item() for k in w1 if not torch.equal(w1[k], w2[k])}
        return steps, dict(list(tensors.items())[:3])

    steps, tensors = differences(a, a2, wa, wa2)
    assert not steps and not tensors, (f"two straight GPU runs differ (a nondeterministic kernel; see the warnings): "
                                       f"steps {steps}, adapter max diffs {tensors}")
    assert [m["step"] for m in b] == list(range(1, 9)) and wa.keys() == wb.keys()
    steps, tensors = differences(a, b, wa, wb)
    assert not steps and not tensors, f"resumed GPU run differs from the straight one: steps {steps}, {tensors}"


def test_sigkill_at_a_random_moment_then_resume_is_exact(setup):
    """A real kill: `qlora train` in a subprocess, checkpointing every step (so the kill most likely lands inside a
    checkpoint write), SIGKILLed once it has logged some steps; `--resume` must reach the straight run's adapter."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, model, data = setup
    common = ["--model", str(model), "--data", str(data), "--max-steps", "150", "--batch-size", "2",
              "--seq-len", "64", "--lr", "3e-3", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1",
              "--save-every", "1", "--eval-every", "0", "--eval-fraction", "0", "--log-every", "1000", "--seed", "2"]
    cmd = [sys.executable, "-m", "qlora_core", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    killed = root / "sigkill"
    p = subprocess.Popen(cmd + common + ["--output", str(killed)], env=env, stdout=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 20:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(metrics.read_text().splitlines())
    assert 20 <= done < 150, f"the kill should land mid-run, got {done} steps"
    subprocess.run(cmd + common + ["--output", str(killed), "--resume"], env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=300)
    T.train(_cfg(setup, "sigkill-straight", max_steps=150, batch_size=2, lr=3e-3, save_every=0, eval_every=0,
                 eval_fraction=0.0, log_every=1000, seed=2))
    a, b = _metrics(root / "sigkill-straight"), _metrics(killed)
    assert [m["step"] for m in b] == list(range(1, 151))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    wa, wb = _adapter(root / "sigkill-straight"), _adapter(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
