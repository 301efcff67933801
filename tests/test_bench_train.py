"""benchmarks/bench_train.py's plumbing on the CPU (its measurements need the device: docs/benchmarks.md).

`--smoke --frontier` runs ours and the HF stack on a tiny random Llama, each in its own subprocess, reports the
peers that cannot run here (Unsloth never runs on a CPU), and ends with the tables, the frontier plot and one
JSON line. The worker runner is checked on its own: a failing worker's stderr reaches the report, and a worker
that outlives its timeout is killed with everything it started.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_train.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table(stdout: str, *first: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, body rows' cells) of the markdown table whose header cells start with `first`."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|") and cells(ln)[:len(first)] == list(first))
    body = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        body.append(cells(ln))
    return cells(lines[start]), body


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_train")
    p = run_bench("--smoke", "--frontier", "--policy", "full", "--png", str(out / "frontier.png"),
                  "--json", str(out / "result.json"),
                  "--log", str(out / "workers.log"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout, out


def test_smoke_rows_and_json(smoke):
    stdout, out = smoke
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result == json.loads((out / "result.json").read_text())
    assert result["bench"] == "train_step" and result["seq"] == 64 and result["points"] == ["full"]
    rows = {(r["stack"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(s, b) for s in ("ours", "hf", "unsloth", "liger") for b in (1, 2)}
    for stack in ("ours", "hf"):
        for b in (1, 2):
            r = rows[stack, b]
            assert "error" not in r, r
            assert r["model"] == "tiny" and r["seq"] == 64 and r["steps"] == 8 == len(r["times_s"])
            assert r["tok_s"] == pytest.approx(b * 64 / r["step_s"], rel=1e-4)  # the JSON keeps 5 digits
            # random N(0, 0.02) weights predict a near-uniform distribution: loss ~ ln(vocab 512) = 6.24 ...
            assert abs(r["loss_start"] - math.log(512)) < 0.15, r
            # ... and the learnable stream lowers it: the train check passed, every LoRA grad was nonzero
            assert r["failed"] is None and r["loss_after"] < 0.99 * r["loss_first"], r
            assert r["grad_norm"] > 0 and r["grad_zero"] == r["grad_nonfinite"] == 0 and r["n_lora"] == 28
            assert r["rss_peak_gib"] > 0.05
    assert rows["ours", 1]["point"] == "full" and rows["ours", 1]["notes"]["policy"] == "full"
    # Unsloth needs an NVIDIA GPU: on the CPU it is never measured, and says why
    assert all("error" in rows["unsloth", b] for b in (1, 2))
    assert all(("error" in rows["liger", b]) != ("tok_s" in rows["liger", b]) for b in (1, 2))
    assert "# unsloth tiny" in stdout
    log = (out / "workers.log").read_text()
    assert log.count("==== --worker ours tiny") == 1 and log.count("==== --worker hf tiny") == 1


def test_smoke_tables(smoke):
    stdout, _ = smoke
    result = json.loads(stdout.strip().splitlines()[-1])
    rows = {(r["stack"], r["batch"]): r for r in result["rows"]}
    head, body = table(stdout, "model", "B x T", "ours tok/s")
    assert [line[:2] for line in body] == [["tiny", "1x64"], ["tiny", "2x64"]]
    for line, b in zip(body, (1, 2)):
        got = dict(zip(head, line))
        # the table prints whole tokens/s and 2-digit ratios of the full values, the JSON 5 significant digits
        assert float(got["ours tok/s"].replace(",", "")) == pytest.approx(rows["ours", b]["tok_s"], abs=0.51)
        assert float(got["HF tok/s"].replace(",", "")) == pytest.approx(rows["hf", b]["tok_s"], abs=0.51)
        assert got["ours/HF tok/s"].endswith("x")
        assert float(got["ours/HF tok/s"][:-1]) == pytest.approx(rows["ours", b]["tok_s"] / rows["hf", b]["tok_s"],
                                                                 abs=0.0051)
        assert got["Unsloth tok/s"] == got["ours/Unsloth tok/s"] == got["ours GPU GiB"] == "-"
    dhead, detail = table(stdout, "stack")
    assert len(detail) == 8
    trains = [dict(zip(dhead, ln))["trains"] for ln in detail]
    assert trains == ["ok"] * 4 + ["-"] * 4  # ours, HF measured; Unsloth, Liger not here
    assert "FAILED" not in stdout
    fhead, frontier = table(stdout, "model", "B x T", "stack")
    assert [(ln[2], ln[3]) for ln in frontier if ln[1] == "1x64"] == [("ours", "full"), ("HF", ""), ("Unsloth", ""),
                                                                      ("HF+Liger", "")]


def test_smoke_frontier_png(smoke):
    _, out = smoke
    png = (out / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_unknown_policy_is_refused_before_any_worker():
    p = run_bench("--smoke", "--policy", "no-such-policy", timeout=300)
    assert p.returncode != 0
    assert "no-such-policy" in p.stderr and "OUR_POLICIES" in p.stderr
    assert "ROW" not in p.stdout and "# ours" not in p.stdout


def test_parse_models_and_timeouts():
    bt = bench_module()
    assert bt.parse_models(["llama-3.1-8b", "llama-3.2-1b:4"], [1, 4]) == [("llama-3.1-8b", [1, 4]),
                                                                          ("llama-3.2-1b", [4])]
    assert bt.parse_timeouts(["200", "unsloth=400"]) == {"ours": 200, "hf": 200, "unsloth": 400, "liger": 200}
    with pytest.raises(SystemExit, match="'llama-9b'"):
        bt.parse_models(["llama-9b"], [1])
    with pytest.raises(SystemExit, match="'peft'"):
        bt.parse_timeouts(["peft=3"])


def test_run_worker_reports_failure(tmp_path):
    bt = bench_module()
    code = ("import sys; print('ROW {\"batch\": 1}'); print('noise'); "
            "sys.stderr.write('Traceback\\nValueError: bad shape\\n'); sys.exit(2)")
    rows, why, stderr, _ = bt.run_worker([sys.executable, "-c", code], dict(os.environ), 60, str(tmp_path / "log"))
    assert rows == [{"batch": 1}]
    assert why == "ValueError: bad shape" and stderr.startswith("Traceback")
    assert "rc=2" in (tmp_path / "log").read_text()


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (gone, or a zombie waiting for a parent that no longer reaps it)."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def test_run_worker_kills_the_whole_group_on_timeout():
    bt = bench_module()
    code = ("import json, subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print('ROW ' + json.dumps({'batch': 4, 'child': c.pid}), flush=True); time.sleep(120)")
    rows, why, _, wall = bt.run_worker([sys.executable, "-c", code], dict(os.environ), 12, None)
    assert why == "timeout after 12 s" and 12 <= wall < 60
    assert [r["batch"] for r in rows] == [4]
    deadline = time.time() + 10
    while not process_gone(rows[0]["child"]) and time.time() < deadline:
        time.sleep(0.1)
    assert process_gone(rows[0]["child"]), "the worker's child outlived the timeout"


@pytest.mark.parametrize("stack", ["ours", "hf"])
def test_planted_bug_fails_the_train_check(stack, monkeypatch):
    """A stack whose optimizer step is lost (planted: the step does nothing) trains no more: its row says why."""
    bt = bench_module()
    bt.use_checkout()
    from qlora_core.optim import PagedAdamW

    monkeypatch.setattr(PagedAdamW if stack == "ours" else torch.optim.AdamW, "step", lambda self, *a, **k: None)
    step, _ = bt.build_ours("tiny", device="cpu") if stack == "ours" else bt.build_hf("tiny", "cpu")
    row = bt.measure(step, 1, 32, bt.SHAPES["tiny"]["vocab_size"], 3, "cpu", warmup=1)
    assert row["loss_after"] == pytest.approx(row["loss_first"], abs=1e-4)  # same batch, same weights
    # B stays 0, so every lora_A grad is 0 (2 blocks x 7 projections)
    assert row["failed"] == "14 of 28 LoRA grads zero" and bt.verdict(row) == "FAILED"


# -- model families: Qwen3 and Gemma 3 rows (issue #26) -----------------------------------------------------------
FAMILY_TINY = ["tiny", "tiny-qwen3", "tiny-gemma3"]
HF_CONFIG_CLASS = {"llama": "LlamaConfig", "qwen3": "Qwen3Config", "gemma3_text": "Gemma3TextConfig"}


@pytest.mark.parametrize("name", list(bench_module().SHAPES))
def test_both_stacks_see_one_config(name):
    """Ours reads SHAPES[name] with the loader; the peers get transformers' config of it. Read back by the same
    loader, transformers' config gives ours' config: no field was dropped or defaulted on either side. Ours leaves
    the special token ids out (bench_generate never stops at an eos), the peers get special_ids."""
    bt = bench_module()
    from qlora_core.model_config import LlamaConfig

    hf = bt.hf_config(name)
    assert type(hf).__name__ == HF_CONFIG_CLASS[bt.SHAPES[name]["model_type"]]
    ids = bt.special_ids(bt.SHAPES[name]["vocab_size"])
    ours = dataclasses.replace(bt.ours_config(name), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                               pad_token_id=ids["pad"])
    assert LlamaConfig.from_hf_config(hf.to_dict()) == ours


def test_family_shapes_are_the_published_ones():
    """The switches the loader derives from the two new entries: Qwen3-8B's q/k norms and untied head; Gemma-3-12B's
    window, 5:1 layer pattern (transformers' default), RoPE bases and linear x8 scaling on full layers."""
    bt = bench_module()
    from transformers import Gemma3TextConfig

    qwen = bt.ours_config("qwen3-8b")
    assert (qwen.qk_norm, qwen.tie_word_embeddings, qwen.attention_bias, qwen.sliding_window) == (True, False, False,
                                                                                                   None)
    assert (qwen.head_dim, qwen.rope_theta, qwen.rms_norm_eps, qwen.rope_scaling) == (128, 1e6, 1e-6, None)
    gemma = bt.ours_config("gemma-3-12b")
    assert gemma.layer_types == Gemma3TextConfig(num_hidden_layers=48).layer_types
    assert gemma.layer_types.count("full_attention") == 8 and gemma.sliding_window == 1024
    assert (gemma.rope_theta, gemma.rope_local_theta, gemma.rope_scaling) == (1e6, 1e4, {"rope_type": "linear",
                                                                                          "factor": 8.0})
    assert gemma.tie_word_embeddings and gemma.sandwich_norms and gemma.norm_unit_offset and gemma.embed_scale
    assert (gemma.head_dim, gemma.query_pre_attn_scalar, gemma.hidden_act) == (256, 256, "gelu_pytorch_tanh")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", FAMILY_TINY)
def test_ours_matches_transformers_on_the_same_weights(name):
    """Dense fp32 on the CPU, the same init_param weights under the same names: ours and transformers' model of
    hf_config(name) give the same logits and loss (Gemma 3's four norms, q/k norms, window, RoPE bases included)."""
    bt = bench_module()
    from qlora_core.train_loop import batch_loss

    ours = bt.ours_model(name, "cpu", torch.float32, quantize=False)
    hf = bt.dense_hf_model(name, "cpu", torch.float32)
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in hf.named_parameters()}
    ids = bt.learnable_stream(1, 2, 64, bt.SHAPES[name]["vocab_size"], seed=1)[0]
    with torch.no_grad():
        out = hf(input_ids=ids, labels=ids)
        logits = ours.lm_head(ours.model(ids))
        total, n = batch_loss(ours, ids, ids)
    scale = out.logits.abs().max()
    assert (logits - out.logits).abs().max() <= 1e-4 * scale, (logits - out.logits).abs().max() / scale
    assert float(total / n) == pytest.approx(float(out.loss), rel=1e-4)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("stack", ["ours", "hf"])
@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-gemma3"])
def test_family_smoke_row_trains(name, stack):
    """The --smoke row of a tiny family model (ours: NF4 + LoRA + PagedAdamW; HF: dense bf16 + PEFT on the CPU)
    passes the train check: the loss falls, every LoRA grad is finite and nonzero."""
    bt = bench_module()
    step, _ = bt.build_ours(name, device="cpu") if stack == "ours" else bt.build_hf(name, "cpu")
    row = bt.measure(step, 1, 64, bt.SHAPES[name]["vocab_size"], 8, "cpu", warmup=2)
    assert row["failed"] is None and row["n_lora"] == 28, row
    assert row["loss_after"] < 0.99 * row["loss_first"]


def test_smoke_models_and_llama_only_peers():
    """--smoke runs `tiny` unless --models names others; Unsloth and Liger rows of other families say why not."""
    bt = bench_module()
    assert bt.parse_args(["--smoke"]).models == ["tiny"]
    assert bt.parse_args(["--smoke", "--models", "tiny-qwen3", "tiny-gemma3"]).models == ["tiny-qwen3", "tiny-gemma3"]
    assert bt.parse_args([]).models == ["llama-3.2-1b", "llama-3.1-8b"]
    for stack in ("unsloth", "liger"):
        assert bt.skip_reason(stack, "gemma-3-12b", math.inf, 0).startswith("not run")
        assert not (bt.skip_reason(stack, "llama-3.1-8b", math.inf, 0) or "").startswith("not run")
    why = bt.skip_reason("hf", "qwen3-8b", math.inf, 0)  # a peer model: HF runs it wherever it is installed
    assert why is None or why.startswith("not installed"), why
