"""Several processes on the CPU (gloo), tiny random Llama: FSDP2 and DDP steps equal the single-process step for the
same global batch, resume moves between process counts, a NaN on one rank or a killed rank stops every rank.

One torchrun job (tests/_dist_worker.py, 2 processes) runs every 2-rank training below; the single-process runs
it is compared with run here, in this process. A step is 8 rows (batch_size 2 x grad_accum 4): one process runs
4 micro-batches of 2 rows, each of 2 ranks runs 2 (so gradients accumulate locally before they are reduced).

Tolerances (fp32): the ranks add the same terms in another order (each rank's partial sums, then the reduction),
so losses agree to ~1e-7 relative and gradients to a few fp32 ulps of their largest element; we allow 1e-5 relative
on losses and rtol 1e-4 / atol 1e-6 on gradients (tests/test_train.py's batch-loss bound). Adapters after Adam
steps: Adam divides by sqrt(v), so a near-zero gradient's rounding can move its element by up to lr * 1e-3; atol
1e-5 at lr 3e-3 (rtol 1e-4).
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qlora_core.train_loop as T
import qlora_core.train_checkpoint as C
from qlora_core.train_config import TrainConfig
from qlora_core.lora import LoraConfig
from tests._tiny import make_model_folder, swap_task, write_jsonl
from tests._dist_worker import MaskLog

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-5
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
ADAPTER_TOL = dict(rtol=1e-4, atol=1e-5)
MICRO_1 = 4  # grad-enabled batch_loss calls per step: one process
MICRO_2 = 2  # each of two ranks


def _cfg(root: Path, out: str, **kw) -> TrainConfig:
    base = dict(model=str(root / "model"), data=str(root / "data.jsonl"), output=str(root / out), max_steps=4,
                batch_size=2, grad_accum=4, seq_len=64, lr=3e-3, lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
                optim_bits=32, eval_every=0, save_every=2, log_every=100, eval_data=str(root / "eval.jsonl"),
                eval_batch_size=4, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


class _Stop(Exception):
    pass


def _single(cfg: TrainConfig, grads: bool = False, stop_call: int | None = None, masks: bool = False):
    """train(cfg) in this process; grads: save step 1's LoRA gradients; stop_call: raise at that loss call;
    masks: write the dropout masks drawn (MaskLog rows) to <output>/rank0.json as a worker does."""
    real_loss, real_fb = T.batch_loss, T.forward_backward
    calls = {"n": 0}

    def loss(*a, **k):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == stop_call:
                raise _Stop
        return real_loss(*a, **k)

    def fb(run, batch):
        out = real_fb(run, batch)
        if grads and run.step == 0:
            torch.save({n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad},
                       Path(run.cfg.output) / "grads-step1.pt")
        return out

    T.batch_loss, T.forward_backward = loss, fb
    log = MaskLog()
    try:
        with log:
            return T.train(cfg)
    except _Stop:
        return None
    finally:
        T.batch_loss, T.forward_backward = real_loss, real_fb
        if masks:
            (Path(cfg.output) / "rank0.json").write_text(json.dumps({"masks": log.rows}))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(out / "adapter_model.safetensors"))


def _close(a: list, b: list, rtol=LOSS_RTOL) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references, then one 2-process job of every distributed run, then 2 -> 1 resumes."""
    root = tmp_path_factory.mktemp("dist")
    make_model_folder(root / "model")
    write_jsonl(root / "data.jsonl", swap_task(240))
    write_jsonl(root / "eval.jsonl", swap_task(25, seed=7))  # 13 + 12 samples: rank 1's 4th eval batch is empty
    eight = dict(optim_bits=8, lora=LoraConfig(r=64, lora_alpha=64, lora_dropout=0.0), max_steps=3, save_every=1)
    # references: 4 steps (fp32 states), 3 steps of 8-bit states (LoRA matrices of >= 4096 elements)
    _single(_cfg(root, "single", eval_every=4), grads=True)
    _single(_cfg(root, "single8", **eight), grads=True)
    # one process, interrupted in step 3 (checkpoint at 2) / 8-bit in step 2 (checkpoint at 1): resumed on 2 below
    _single(_cfg(root, "one-to-two"), stop_call=2 * MICRO_1 + 1)
    _single(_cfg(root, "one-to-two8", **eight), stop_call=MICRO_1 + 1)
    # LoRA dropout: straight runs on 1 and 2 processes, each interrupted in step 3 and resumed on 1 and 2
    drop = dict(lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25), eval_data=None, eval_fraction=0.0)
    _single(_cfg(root, "drop1", **drop), masks=True)
    for name in ("drop1-1", "drop1-2"):
        _single(_cfg(root, name, **drop), stop_call=2 * MICRO_1 + 1)
    _single(_cfg(root, "drop1-1", resume=True, **drop), masks=True)
    jobs = [
        {"config": _cfg(root, "fsdp", eval_every=4).to_dict(), "grads": True, "quant_state": True},
        {"config": _cfg(root, "ddp", eval_every=4, parallel="ddp").to_dict(), "grads": True},
        {"config": _cfg(root, "fsdp8", **eight).to_dict(), "grads": True},
        {"config": _cfg(root, "one-to-two", resume=True).to_dict()},
        {"config": _cfg(root, "one-to-two8", resume=True, **eight).to_dict()},
        {"config": _cfg(root, "two-to-one").to_dict(), "stop_call": 2 * MICRO_2 + 1},
        {"config": _cfg(root, "nan", max_steps=6, max_bad_steps=2, save_every=0).to_dict(),
         "nan_calls": [1, [MICRO_2 + 1, 2 * MICRO_2 + 2]]},  # rank 1 only: steps 2 and 3
    ]
    jobs += [{"config": _cfg(root, "drop2", **drop).to_dict(), "masks": True}]
    jobs += [{"config": _cfg(root, name, **drop).to_dict(), "stop_call": 2 * MICRO_2 + 1} for name in
             ("drop2-2", "drop2-1")]
    jobs += [{"config": _cfg(root, name, resume=True, **drop).to_dict(), "masks": True} for name in
             ("drop2-2", "drop1-2")]
    jobs.append({"kind": "fsdp_check", "config": _cfg(root, "check").to_dict()})
    _launch(root, jobs, nproc=2)
    _single(_cfg(root, "two-to-one", resume=True))
    _single(_cfg(root, "drop2-1", resume=True, **drop), masks=True)
    return root


def _launch(root: Path, jobs: list, nproc: int, nccl: bool = False) -> None:
    """tests/_dist_worker.py with `jobs` in `nproc` processes (gloo, or NCCL with one GPU each)."""
    (root / "jobs.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(REPO / "tests" / "_dist_worker.py"), str(root / "jobs.json")] + (["nccl"] if nccl else [])
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _check_fsdp(out: Path, rtol: float, atol: float) -> None:
    """fsdp_check.pt: the sharded model's loss and LoRA gradients equal the unsharded model's."""
    res = torch.load(out / "fsdp_check.pt")
    (loss_ref, g_ref), (loss, g) = res["ref"], res["fsdp"]
    assert abs(loss - loss_ref) <= rtol * abs(loss_ref)
    assert g.keys() == g_ref.keys() and all(v.abs().max() > 0 for v in g_ref.values())
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=rtol, atol=atol)


def _rank(root: Path, name: str, r: int) -> dict:
    return json.loads((root / name / f"rank{r}.json").read_text())


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_ranks_equal_one_process(runs, mode):
    """Same global batch: the 4 step losses, step 1's LoRA gradients, the eval loss (25 samples over 2 ranks in
    batches of 4: one rank pads its last round with an ignored batch) and the final adapter equal the
    single-process run's; every rank reports the same losses."""
    one, two = _metrics(runs / "single"), _metrics(runs / mode)
    assert [m["step"] for m in two] == [1, 2, 3, 4] and [m["tokens"] for m in two] == [m["tokens"] for m in one]
    assert _close([m["loss"] for m in two], [m["loss"] for m in one])
    assert _close([two[-1]["eval_loss"]], [one[-1]["eval_loss"]])
    r0, r1 = _rank(runs, mode, 0), _rank(runs, mode, 1)
    assert r0["losses"] == r1["losses"] and r0["stopped"] is None and r1["stopped"] is None
    g1, g2 = torch.load(runs / "single" / "grads-step1.pt"), torch.load(runs / mode / "grads-step1.pt")
    assert g1.keys() == g2.keys() and any(g.abs().max() > 0 for g in g1.values())
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], **GRAD_TOL)
    a1, a2 = _adapter(runs / "single"), _adapter(runs / mode)
    assert a1.keys() == a2.keys()
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], **ADAPTER_TOL)


def test_fsdp_sharded_model_equals_unsharded(runs):
    """One micro-batch through distributed.shard_fsdp's model (2 ranks, same rows on both, gradient
    checkpointing): the loss and every LoRA gradient equal the unsharded model's."""
    _check_fsdp(runs / "check", LOSS_RTOL, GRAD_TOL["atol"])


def test_fsdp_shards_the_4bit_weights_and_keeps_their_bytes(runs):
    """Each rank holds half of the packed NF4 bytes (FSDP pads a shard by < 1 element, 2 bytes, per rank and
    weight); the gathered state dict of the 4-bit weights is the single-process one, byte for byte (bitsandbytes
    keys)."""
    from qlora_core.loading import load_llama
    from qlora_core.lora import apply_lora
    r0, r1 = _rank(runs, "fsdp", 0), _rank(runs, "fsdp", 1)
    assert r0["packed_total"] == r1["packed_total"] > 0
    assert r0["packed_local"] + r1["packed_local"] == r0["packed_total"]
    assert abs(r0["packed_local"] - r1["packed_local"]) <= 28  # 14 weights, at most one bf16 element apart each
    model = load_llama(runs / "model", quantize="nf4", dtype=torch.float32)
    apply_lora(model, r=4, alpha=8)
    ref = {k: v for k, v in model.state_dict().items() if ".base_layer.weight" in k}
    got = torch.load(runs / "fsdp" / "quant_state.pt")
    assert ref.keys() == got.keys() and len(ref) == 14 * 6  # 2 layers x 7 linears x (weight + 5 state keys)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k


def test_fsdp_with_8bit_states_equals_one_process(runs):
    """PagedAdamW's 8-bit states on each rank's shards: step 1's gradients and the losses of the steps after it
    equal the single-process run's (step 2's loss follows an update from unquantized moments; step 3's from
    8-bit states quantized on blocks that the 2 shards share with the whole matrix)."""
    one, two = _metrics(runs / "single8"), _metrics(runs / "fsdp8")
    assert _close([m["loss"] for m in two], [m["loss"] for m in one])
    g1, g2 = torch.load(runs / "single8" / "grads-step1.pt"), torch.load(runs / "fsdp8" / "grads-step1.pt")
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], **GRAD_TOL)


@pytest.mark.parametrize("name,ref", [("one-to-two", "single"), ("two-to-one", "single"),
                                      ("one-to-two8", "single8")])
def test_resume_on_another_process_count(runs, name, ref):
    """Checkpointed by one process count, resumed on the other: every step's loss equals the uninterrupted
    single-process run's (8-bit states are cut again for the 2 ranks' rows)."""
    got, want = _metrics(runs / name), _metrics(runs / ref)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    assert _close([m["loss"] for m in got], [m["loss"] for m in want])


def _masks(runs: Path, name: str, rank: int) -> dict:
    """{(step, micro-batch): [sha1 of each dropout_masks call, in order]} of one rank of a run."""
    out = {}
    for step, micro, digest in _rank(runs, name, rank)["masks"]:
        out.setdefault((step, micro), []).append(digest)
    return out


def test_dropout_masks_differ_per_rank_and_micro_batch_and_resume_exactly(runs):
    """LoRA dropout 0.25, 4 steps of 2 micro-batches per rank (4 on one process): every (step, micro-batch) draws
    masks on both ranks and no mask is drawn twice across ranks or micro-batches (backward regenerates its
    forward's masks, so a digest may repeat within one micro-batch only). A run checkpointed at step 2 and resumed
    (2 -> 2, 1 -> 2, 2 -> 1, 1 -> 1 processes) draws in steps 3 and 4 exactly the masks of the uninterrupted run
    on the resuming process count."""
    for name, ranks, micro in (("drop2", 2, MICRO_2), ("drop1", 1, MICRO_1)):
        per = [_masks(runs, name, r) for r in range(ranks)]
        assert all(sorted(p) == [(s, i) for s in range(4) for i in range(micro)] for p in per), name
        owner = {}
        for r, p in enumerate(per):
            for key, digests in p.items():
                for d in digests:
                    assert owner.setdefault(d, (r, key)) == (r, key), f"{name}: mask of {(r, key)} also in {owner[d]}"
    for name, ref, ranks in (("drop2-2", "drop2", 2), ("drop1-2", "drop2", 2), ("drop2-1", "drop1", 1),
                             ("drop1-1", "drop1", 1)):
        for r in range(ranks):
            got, want = _masks(runs, name, r), _masks(runs, ref, r)
            assert got == {k: v for k, v in want.items() if k[0] >= 2}, (name, r)
        if name[4] == name[6]:  # same count: the losses too (steps 1-2 drew other masks on the other count)
            assert _close([m["loss"] for m in _metrics(runs / name)], [m["loss"] for m in _metrics(runs / ref)])


def test_nan_on_one_rank_stops_every_rank(runs):
    """A NaN loss on rank 1 only (steps 2 and 3) skips those steps on both ranks and, at max_bad_steps=2, stops
    both with the same message; no adapter is written for the stopped run."""
    r0, r1 = _rank(runs, "nan", 0), _rank(runs, "nan", 1)
    assert r0["steps"] == r1["steps"] == 3
    assert r0["stopped"] == r1["stopped"] and "2 consecutive" in r0["stopped"]
    m = _metrics(runs / "nan")
    assert [x.get("skipped", False) for x in m] == [False, True, True] and m[0]["loss"] is not None
    assert not (runs / "nan" / "adapter_model.safetensors").exists()


def _children(pid: int) -> list[int]:
    """Every descendant process of `pid` (Linux /proc)."""
    kids, out = {}, []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    todo = [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _children(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"\0".join(env):
            return pid
    return None


def test_killed_rank_fails_the_run_cleanly_and_resume_continues(tmp_path):
    """`qlora train --nproc 2`, rank 1 SIGKILLed mid-run: every rank stops, the command exits 1 with our one
    `error:` line naming rank 1's signal and --resume, the checkpoint it points at is whole, and --resume on one
    process finishes the run. Only our own output and files are read, not torchrun's summary (its wording is
    torch's, and on a loaded machine its agent has been seen to crash before printing it)."""
    root = tmp_path
    make_model_folder(root / "model")
    write_jsonl(root / "data.jsonl", swap_task(120))
    out = root / "run"
    args = ["train", "--model", str(root / "model"), "--data", str(root / "data.jsonl"), "--output", str(out),
            "--max-steps", "12", "--batch-size", "2", "--seq-len", "64", "--lr", "3e-3", "--lora-r", "4",
            "--lora-alpha", "8", "--save-every", "1", "--eval-every", "0", "--eval-fraction", "0",
            "--log-every", "1000"]
    p = subprocess.Popen([sys.executable, "-m", "qlora_core", *args, "--nproc", "2"], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, victim, deadline = out / "metrics.jsonl", None, time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            victim = _rank_pid(p.pid, 1)
            break
        time.sleep(0.05)
    if victim is None:  # stop the workers too: they hold the pipes that communicate() reads to the end
        for pid in _children(p.pid) + [p.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert victim is not None, "rank 1 not found:\n" + p.communicate(timeout=60)[1][-3000:]
    os.kill(victim, signal.SIGKILL)
    started = time.time()
    stdout, stderr = p.communicate(timeout=120)
    assert time.time() - started < 60, "the other rank was not stopped in time"
    lines = [x for x in stderr.splitlines() if x.strip()]
    ours = [x for x in lines if x.startswith("error:")]
    assert p.returncode == 1 and ours == lines[-1:], stderr[-3000:]
    assert ours[0].startswith("error: 2-process run failed: ") and ours[0].endswith(
        ". Checkpoints are whole: rerun with --resume to continue."), ours[0]
    assert "rank 1 was killed by signal 9 (SIGKILL)" in ours[0], ours[0]
    done = len(metrics.read_text().splitlines())
    assert 3 <= done < 12
    found = C.load_checkpoint(out)
    assert found is not None
    ck, st = found
    assert st["world_size"] == 2 and 1 <= st["step"] <= done
    assert {f.name for f in ck.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt",
                                              "trainer_state.pt"}
    r = subprocess.run([sys.executable, "-m", "qlora_core", *args, "--resume"], env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "written by 2 process(es), now 1" in r.stdout
    assert [m["step"] for m in _metrics(out)] == list(range(1, 13))


_RECORD_WORKER = """
import os, signal, sys
import qlora_core.distributed as D, qlora_core.durable as durable
if sys.argv[1] == "killed":  # stopped between writing the error file and renaming it (SIGTERM from the agent)
    durable.fsync_file = lambda path: os.kill(os.getpid(), signal.SIGKILL)
def fail():
    raise RuntimeError("boom")
D.record(fail)()
"""


@pytest.mark.parametrize("how", ["raised", "killed"])
def test_worker_error_file_is_whole_or_absent(tmp_path, how):
    """A `--nproc` worker that raises leaves torchrun's agent an error file it parses (the exception's message);
    one stopped while writing it leaves none, never half a JSON document (which crashed the agent)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
    path = tmp_path / "error.json"
    env = {**_env(), "TORCHELASTIC_ERROR_FILE": str(path)}
    p = subprocess.run([sys.executable, "-c", _RECORD_WORKER, how], env=env, capture_output=True, text=True,
                       timeout=120)
    if how == "raised":
        assert p.returncode == 1 and "RuntimeError: boom" in p.stderr, p.stderr[-3000:]
        failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(path))
        assert failure.message["message"] == "RuntimeError: boom", failure.message
    else:
        assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
        assert not path.exists()  # (only the temporary file beside it): the agent then reports the signal
        ProcessFailure(local_rank=0, pid=1, exitcode=-signal.SIGTERM, error_file=str(path))


# -- on GPUs (the lead's device runs) ------------------------------------------------------------------------------
@pytest.mark.gpu
def test_fsdp_on_one_gpu_nccl_equals_unsharded(tmp_path):
    """FSDP2 over a 1-GPU NCCL group (flat 4-bit weights all-gathered, Triton NF4 kernels reading views of the
    gathered buffer, bf16 autocast, checkpointing): loss and LoRA gradients of the unsharded model (same kernels
    and inputs: equal up to bf16 rounding of a different gradient summation order, rtol 1e-2)."""
    make_model_folder(tmp_path / "model")
    write_jsonl(tmp_path / "data.jsonl", swap_task(40))
    write_jsonl(tmp_path / "eval.jsonl", swap_task(25, seed=7))
    cfg = _cfg(tmp_path, "check", device="cuda")
    _launch(tmp_path, [{"kind": "fsdp_check", "config": cfg.to_dict()}], nproc=1, nccl=True)
    _check_fsdp(tmp_path / "check", rtol=1e-2, atol=1e-4)


@pytest.mark.multigpu
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_gpus_equal_one_gpu(tmp_path, mode):
    """2 GPUs (NCCL) against 1 for the same global batch, fp32 weights so only the kernels' TF32 dots and the
    summation order differ (rtol 1e-3 on losses); the sharded-vs-unsharded check on 2 GPUs too (fsdp)."""
    make_model_folder(tmp_path / "model")
    write_jsonl(tmp_path / "data.jsonl", swap_task(240))
    write_jsonl(tmp_path / "eval.jsonl", swap_task(25, seed=7))
    kw = dict(device="cuda", dtype="float32", parallel=mode, eval_every=4)
    _single(_cfg(tmp_path, "single", **kw))
    jobs = [{"config": _cfg(tmp_path, mode, **kw).to_dict()}]
    if mode == "fsdp":
        jobs.append({"kind": "fsdp_check", "config": _cfg(tmp_path, "check", device="cuda").to_dict()})
    _launch(tmp_path, jobs, nproc=2, nccl=True)
    one, two = _metrics(tmp_path / "single"), _metrics(tmp_path / mode)
    assert _close([m["loss"] for m in two], [m["loss"] for m in one], rtol=1e-3)
    assert _close([two[-1]["eval_loss"]], [one[-1]["eval_loss"]], rtol=1e-3)
    if mode == "fsdp":
        _check_fsdp(tmp_path / "check", rtol=1e-2, atol=1e-4)
