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


# -- --max-context / --context-table (benchmarks/_max_context.py) -------------------------------------------------
def ladder_on(limit: int | None, ladder, seconds=lambda T: 1.0, budget_s: float = float("inf")):
    """run_ladder against a fake device where a step fits iff T <= limit (None: always) and takes seconds(T);
    the worker has budget_s seconds. Returns the probes in order."""
    mc = bench_module().mc
    clock = {"used": 0.0}

    def probe(T):
        clock["used"] += seconds(T)
        ok = limit is None or T <= limit
        return {"T": T, "outcome": "ok" if ok else "oom", "wall_s": seconds(T)}
    return mc.run_ladder(probe, ladder, lambda: budget_s - clock["used"])


@pytest.mark.parametrize("limit", [16384, 50000, 98304, 100000, 131071, 200000])
def test_ladder_doubles_then_bisects_to_the_limit(limit):
    mc = bench_module().mc
    ladder = mc.Ladder(start=16384, granularity=8192, ceiling=262144)
    probes = ladder_on(limit, ladder)
    Ts = [p["T"] for p in probes]
    lo, hi = mc.bounds(probes)
    assert lo <= limit < hi and hi - lo <= 8192, (Ts, lo, hi)  # the answer brackets the limit to the granularity
    assert all(T % 2048 == 0 for T in Ts) and len(set(Ts)) == len(Ts)  # aligned, never probed twice
    first_fail = next(i for i, p in enumerate(probes) if p["outcome"] != "ok")
    assert Ts[:first_fail + 1] == [16384 * 2**i for i in range(first_fail + 1)]  # doubling up to a failure
    span = Ts[first_fail] - (Ts[first_fail - 1] if first_fail else 0)
    assert len(Ts) - first_fail - 1 <= math.log2(span / 8192)  # then bisection: halves the span each probe


def test_ladder_known_sequence_and_summary():
    mc = bench_module().mc
    probes = ladder_on(100000, mc.Ladder(16384, 8192, 262144))
    assert [p["T"] for p in probes] == [16384, 32768, 65536, 131072, 98304, 114688, 106496]
    s = mc.summary(probes)
    assert s["max_T"] == 98304 and s["best"]["T"] == 98304 and s["stop"] == "oom at 106496"


def test_ladder_start_too_long_goes_down_and_ceiling_stops():
    mc = bench_module().mc
    ladder = mc.Ladder(16384, 4096, 65536)
    assert [p["T"] for p in ladder_on(5000, ladder)] == [16384, 8192, 4096]  # bisection from 0 below the start
    assert [p["T"] for p in ladder_on(None, ladder)] == [16384, 32768, 65536]  # fits everywhere: stops at ceiling
    assert mc.summary(ladder_on(None, ladder))["stop"] is None
    assert mc.summary(ladder_on(1000, ladder))["max_T"] == 0
    with pytest.raises(ValueError, match="multiples of 2048"):
        mc.Ladder(16384, 1000, 65536)


def test_estimate_is_quadratic_above_and_flat_below():
    mc = bench_module().mc
    h = [{"T": 16384, "outcome": "ok", "wall_s": 4.0}, {"T": 32768, "outcome": "ok", "wall_s": 10.0},
         {"T": 65536, "outcome": "oom", "wall_s": 3.0}]
    assert mc.estimate_s(h, 65536) == pytest.approx(40.0)   # from the longest success: 10 s * (2)^2
    assert mc.estimate_s(h, 24576) == pytest.approx(10.0)   # below it: never more than the longer step
    assert mc.estimate_s(h[2:], 8192) is None                # no success yet: nothing to scale


def test_ladder_does_not_start_a_probe_it_cannot_finish():
    """A step costs (T / 16384)^2 * 10 s and the worker has 100 s: 16k (10 s) and 32k (40 s) run, 64k
    (estimated 160 s) is not started, and the bisection between 32k and 64k only starts what fits the rest."""
    mc = bench_module().mc
    probes = ladder_on(None, mc.Ladder(16384, 8192, 262144), seconds=lambda T: 10 * (T / 16384) ** 2,
                       budget_s=100)
    used = sum(p["wall_s"] for p in probes)
    assert used <= 100, probes
    slow = [p for p in probes if p["outcome"] == "slow"]
    assert slow and slow[0]["T"] == 65536 and slow[0]["estimate_s"] == pytest.approx(160)
    assert all(p["estimate_s"] > p["left_s"] for p in slow)
    assert mc.summary(probes)["stop"].startswith("slow at")


def test_gpu_cap_stand_in_and_oom_classification():
    mc = bench_module().mc
    cap = mc.GpuCap(0.5, "cpu")
    assert cap.over({"T": 512}) is None and "0.750 GiB > 0.5 GiB" in cap.over({"T": 768})
    gpu = mc.GpuCap(22, "cuda")  # checked against both reserved and device used (memory outside torch's cache)
    assert gpu.over({"reserved_gib": 21.0, "device_used_gib": 21.9}) is None
    assert "22.40 GiB" in gpu.over({"reserved_gib": 18.0, "device_used_gib": 22.4})
    assert mc.is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert mc.is_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"))
    assert not mc.is_oom(ValueError("bad shape"))


def test_probe_oom_is_a_failure_and_cleans_up():
    """A step that runs out of memory is an "oom" probe (not a crash) and its partial LoRA grads are dropped; a
    peer's step (peer_step) exposes its params the same way, so the cleanup reaches every stack."""
    bt = bench_module()
    mc = bt.mc
    params = [torch.nn.Parameter(torch.ones(3))]

    def step(ids, labels, train=True):
        (params[0] * 2).sum().backward()  # a grad lands, then the allocation fails half-way
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with bt.Sampler(False) as mem:
        row = mc.probe(step, 64, 512, "cpu", mc.GpuCap(1.0, "cpu"), mem, bt.pinned_stats, first_at_T=True)
    assert row["outcome"] == "oom" and "OutOfMemoryError" in row["error"] and "tok_s" not in row
    assert params[0].grad is None
    peer = bt.peer_step(torch.nn.Linear(4, 4), "cpu")
    assert [p.shape for p in mc.closure_var(peer, "params")] == [(4, 4), (4,)]


def test_max_context_smoke(tmp_path):
    """--smoke --max-context on the CPU: ours searches T under the stand-in cap (1 MiB per token: 0.19 GiB fits
    T <= 194), every probe is a row of the JSON and of the live log, the tables print, no train check fails."""
    log = tmp_path / "mc.log"
    p = run_bench("--smoke", "--stacks", "ours", "--max-context", "0.19", "--mc-start", "64", "--mc-step", "64",
                  "--context-table", "64", "32", "--json", str(tmp_path / "mc.json"), "--log", str(log), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads((tmp_path / "mc.json").read_text())
    assert result["bench"] == "train_long_context" and result["budgets_gib"] == [0.19]
    for stack in ("ours",):
        probes = [r for r in result["rows"] if r["kind"] == "probe" and r["stack"] == stack]
        assert [(r["T"], r["outcome"]) for r in probes] == [(64, "ok"), (64, "ok"), (128, "ok"), (256, "over"),
                                                            (192, "ok")], probes
        assert probes[0]["warmup"] and probes[0]["first_at_T"] and not probes[1]["first_at_T"]
        assert all(math.isfinite(r["loss_before"]) and math.isfinite(r["loss_after"]) for r in probes)
        rows_t = [r for r in result["rows"] if r["kind"] == "table" and r["stack"] == stack]
        assert [r["seq"] for r in rows_t] == [32, 64] and all(r["tok_s"] > 0 and "failed" not in r for r in rows_t)
    ours = [r for r in result["rows"] if r["stack"] == "ours" and r["kind"] == "probe"]
    assert ours[-1]["point"] == "budget 0.17GiB" and ours[-1]["plan"]  # ours planned per T under 90% of it
    head, body = table(p.stdout, "model", "budget GiB", "stack")
    got = {ln[2]: dict(zip(head, ln)) for ln in body}
    assert got["ours"]["max T"] == "192" and got["ours"]["stopped by"] == "over at 256"
    assert got["ours"]["ours/Unsloth T"] == "-"
    assert [ln[:2] for ln in table(p.stdout, "model", "T")[1]] == [["tiny", "32"], ["tiny", "64"]]
    live = [ln for ln in log.read_text().splitlines() if ln.startswith("LIVE ROW ")]
    assert len(live) == 5 + 2  # every probe and table row, written as it happened
    assert "FAILED" not in p.stdout


def test_max_context_table_ratio_and_a_killed_worker():
    """The summary table: ours' max T over Unsloth's at the same budget; a worker cut mid-probe says so instead
    of claiming the ceiling; tok/s and host memory come from the longest completed probe."""
    bt = bench_module()

    def row(stack, T, outcome, **kw):
        return dict({"kind": "probe", "model": "llama-3.1-8b", "budget_gib": 22.0, "stack": stack, "T": T,
                     "outcome": outcome, "wall_s": 1.0}, **kw)
    rows = [row("ours", 16384, "ok", tok_s=900.0, loss_before=12.5, loss_after=12.0, pinned_gib=3.0),
            row("ours", 32768, "ok", tok_s=800.0, loss_before=12.6, loss_after=None, pinned_gib=6.0,
                rss_peak_gib=9.5),
            row("ours", None, "killed", error="timeout after 250 s"),
            row("unsloth", 16384, "ok", tok_s=700.0, loss_before=12.5, loss_after=12.2),
            row("unsloth", 32768, "oom", error="OutOfMemoryError")]
    head, body = bt.mc.max_context_rows(rows, bt.LABEL)
    got = {ln[2]: dict(zip(head, ln)) for ln in body}
    assert got["ours"]["max T"] == "32,768" and got["ours"]["tok/s at T"] == "800"
    assert got["ours"]["pinned GiB"] == "6.00" and got["ours"]["RSS GiB"] == "9.50"
    assert got["ours"]["loss before>after"] == "12.60>-"
    assert got["ours"]["stopped by"].startswith("worker: timeout") and got["Unsloth"]["stopped by"] == "oom at 32768"
    assert got["ours"]["ours/Unsloth T"] == "2.00x" and got["Unsloth"]["ours/Unsloth T"] == "-"
    _, probes = bt.mc.probe_rows(rows, bt.LABEL)
    assert [ln[2] for ln in probes] == ["16,384", "32,768", "-", "16,384", "32,768"]


# ---- review: cleanup after a broken CUDA context, a search ended by an error, the table's estimates ----------
def test_release_survives_a_failing_cuda_cleanup(monkeypatch):
    """After a failed probe the cleanup synchronizes; on a broken CUDA context that raises. The probe's row must
    still come back (and be emitted) with the cleanup's error, not kill the worker before the row is printed."""
    mc = bench_module().mc
    params = [torch.nn.Parameter(torch.ones(2))]
    params[0].grad = torch.ones(2)

    def step(ids, labels, train=True):
        return params

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    monkeypatch.setattr(torch.cuda, "empty_cache", broken)
    why = mc.release(step, "cuda")
    assert "illegal memory access" in why and params[0].grad is None
    assert mc.release(step, "cpu") is None


def test_search_ended_by_an_error_does_not_claim_the_ceiling():
    """A probe that fails with something other than memory ends the search; the summary table must say so, not
    report "ceiling" (the search never reached it)."""
    bt = bench_module()
    rows = [{"kind": "probe", "model": "llama-3.1-8b", "budget_gib": 22.0, "stack": "ours", "T": T,
             "outcome": outcome, "wall_s": 1.0, "loss_before": 12.0, **kw}
            for T, outcome, kw in [(16384, "ok", {}), (32768, "error", {"error": "ValueError: bad shape"})]]
    head, body = bt.mc.max_context_rows(rows, bt.LABEL)
    got = dict(zip(head, body[0]))
    assert got["max T"] == "16,384" and got["stopped by"].startswith("error at 32768"), got


def test_table_worker_estimates_only_from_completed_steps(monkeypatch):
    """--context-table scales the next T's estimate from the last T's wall time: a T that failed at once (an
    error, not a step) must not stand in for a step's time, or a T that cannot finish is started."""
    from types import SimpleNamespace
    mc = bench_module().mc
    clock = {"t": 0.0}
    monkeypatch.setattr(mc, "time", SimpleNamespace(perf_counter=lambda: clock["t"], time=lambda: clock["t"]))
    started = []

    def measure(step, batch, T, vocab, iters, device, warmup=1, check=False):
        started.append(T)
        if T == 256:
            clock["t"] += 0.1
            raise ValueError("no kernel for this shape")
        clock["t"] += 10.0 * (T / 128) ** 2
        return {"batch": 1, "seq": T, "tok_s": 1.0, "step_s": 1.0, "warmup_s": [1.0]}

    a = SimpleNamespace(context_table=[128, 256, 512], stop_at=100.0, device="cpu")
    rows = mc.table_worker(lambda *x, **k: None, 512, a, lambda row: None, measure)
    assert started == [128, 256], started  # 512: 10 s x (512 / 128)^2 = 160 s > 89.9 s left
    assert rows[2]["error"].startswith("not started")


def test_long_context_seq_is_what_the_worker_probes():
    """Unsloth's max_seq_length: the longest T this worker probes. Above the model's max_position_embeddings
    Unsloth swaps the config's RoPE scaling for linear scaling, so the table worker must not ask for the
    --max-context ceiling it never probes."""
    from types import SimpleNamespace
    bt = bench_module()
    assert bt.long_context_seq(SimpleNamespace(mc_budget=None, mc_ceiling=262144,
                                               context_table=[16384, 131072])) == 131072
    assert bt.long_context_seq(SimpleNamespace(mc_budget=22.0, mc_ceiling=262144, context_table=[])) == 262144


def test_dense_hf_model_restores_the_default_dtype(monkeypatch):
    """A failed build (e.g. out of memory) must not leave torch's default dtype at bf16 for the rest of the
    process."""
    import transformers
    bt = bench_module()

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", boom)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            bt.dense_hf_model("tiny", "cpu")
        assert torch.get_default_dtype() == torch.float32
    finally:
        torch.set_default_dtype(torch.float32)


def test_ladder_counts_a_new_T_s_compile_after_a_warm_step():
    """The warm-up at the start T compiles (40 s), its re-measure is warm (1 s); every new T compiles again.
    Scaling the warm 1 s alone (x4 = 4 s at 2x T) would start a 44 s probe with 28 s left, past the worker's
    time: the estimate must add the warm-up's compile."""
    mc = bench_module().mc
    clock = {"used": 0.0}
    seen = set()

    def probe(T):
        wall = (T / 16384) ** 2 + (0.0 if T in seen else 40.0)
        clock["used"] += wall
        row = {"T": T, "outcome": "ok", "wall_s": wall, "first_at_T": T not in seen}
        seen.add(T)
        return row
    budget = 70.0
    warm = probe(16384)
    probes = mc.run_ladder(probe, mc.Ladder(16384, 8192, 262144), lambda: budget - clock["used"], warmup=warm)
    assert clock["used"] <= budget, probes
    assert [(p["T"], p["outcome"]) for p in probes] == [(16384, "ok"), (32768, "slow"), (24576, "slow")]
    assert probes[1]["estimate_s"] == pytest.approx(4 + 40)


def test_max_T_at_the_start_reports_the_warm_step_not_the_warm_up():
    """When the longest completed T is the start, two rows hold it: the warm-up (compile, autotune in its time)
    and its warm re-measure. The table's tok/s at max T must be the warm step's."""
    bt = bench_module()
    rows = [{"kind": "probe", "model": "llama-3.1-8b", "budget_gib": 22.0, "stack": "unsloth", "T": T,
             "outcome": outcome, "wall_s": 1.0, **kw}
            for T, outcome, kw in [(16384, "ok", {"tok_s": 400.0, "warmup": True, "loss_before": 12.0}),
                                   (16384, "ok", {"tok_s": 5000.0, "loss_before": 11.0}),
                                   (32768, "oom", {"error": "OutOfMemoryError"})]]
    head, body = bt.mc.max_context_rows(rows, bt.LABEL)
    got = dict(zip(head, body[0]))
    assert got["max T"] == "16,384" and got["tok/s at T"] == "5,000", got


def test_capped_worker_gets_the_allocator_setting_in_its_environment():
    """A --max-context worker's PYTORCH_ALLOC_CONF comes in its environment (before torch is imported), unless
    the caller set either name; a value the caller chose is kept."""
    bt = bench_module()
    assert bt.long_context_env({"A": "1"}, {})["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_ALLOC_CONF" not in bt.long_context_env({}, {"PYTORCH_CUDA_ALLOC_CONF": "x"})
    kept = {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}
    assert bt.long_context_env(dict(kept), kept) == kept


def test_a_budget_alone_is_ours_one_point():
    """`--budget 70` without --policy (docs/benchmarks.md's --context-table device command) is ours' one point
    ("full", 70): not refused as two points (policy "full" and the budget), which would end the call at once."""
    bt = bench_module()
    assert bt.our_points(None, [70.0], False) == [("full", 70.0)]
    assert bt.our_points(None, [], False) == [("full", None)]
    with pytest.raises(SystemExit, match="need --frontier"):
        bt.our_points(["full"], [70.0], False)
    a = bt.parse_args(["--smoke", "--stacks", "ours", "--context-table", "64", "--budget", "1"])
    a.points, a.user_point = bt.our_points(a.policy, a.budget, a.frontier), True
    assert bt.long_context_jobs(a, "ours") == [(None, ("full", 1.0))]
