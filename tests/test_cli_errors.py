"""The real `qlora` command (a subprocess) on each way a user can get it wrong (issue #13): the exit code of the
error's category, exactly one `error: ...` line on stderr and no traceback, and every file that existed before
byte-identical afterwards (nothing deleted, nothing half-written, no stray temporary file).

Each case runs in its own folder holding copies of what it needs; all cases start at once (one subprocess each,
mostly importing torch), so the module costs about as long as its slowest case rather than their sum.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora_core.train_loop as T
import qlora_core.train_checkpoint as C
from qlora_core.train_config import TrainConfig, TrainConfigError, preflight
from qlora_core import cli
from qlora_core.errors import EXIT_CODES, DataError, FileLoadError, NonFiniteError, UsageError
from qlora_core.lora import LoraConfig
from tests._tiny import make_model_folder, swap_task, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

REPO = Path(__file__).resolve().parent.parent
USAGE, DATA, FILE, NONFINITE = (EXIT_CODES[c] for c in (UsageError, DataError, FileLoadError, NonFiniteError))


def _flip(path: Path, offset_from_end: int) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) - offset_from_end] ^= 0x5A
    path.write_bytes(bytes(b))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _nan_adapter(src: Path, dst: Path) -> str:
    """A copy of adapter folder src whose first lora_B holds a NaN, written without our checksum (as a diverged run
    elsewhere would write it); returns the tensor's name."""
    dst.mkdir(parents=True)
    shutil.copy(src / "adapter_config.json", dst)
    sd = load_file(str(src / "adapter_model.safetensors"))
    name = sorted(k for k in sd if "lora_B" in k)[0]
    sd[name][0, 0] = float("nan")
    save_file(sd, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model folder, its data, and a 2-step training run with checkpoints (in-process: the fixture's own
    work is no part of what the cases test)."""
    root = tmp_path_factory.mktemp("cli-errors")
    model = make_model_folder(root / "model")
    data = write_jsonl(root / "data.jsonl", swap_task(16))
    run = root / "run"
    T.train(TrainConfig(model=str(model), data=str(data), output=str(run), max_steps=2, batch_size=2, seq_len=64,
                          eval_fraction=0.0, save_every=1, log_every=100, lora=LoraConfig(r=2, lora_alpha=4)))
    return root, model, data, run


def _cases(world, base: Path) -> dict:
    """name -> (argv after `qlora`, extra env, exit code, text the error line must hold); each case's inputs are
    copied into base/<name> first."""
    root, model, data, run = world
    cases = {}

    def case(name, argv, code, needle, env=None, files=()):
        d = base / name
        d.mkdir(parents=True)
        for src, dst in files:
            (shutil.copytree if src.is_dir() else shutil.copy)(src, d / dst)
        cases[name] = (d, [a.format(d=d) for a in argv], env or {}, code, needle)
        return d

    train = ["train", "--model", "{d}/model", "--data", "{d}/data.jsonl", "--seq-len", "64", "--max-steps", "2",
             "--lora-r", "2", "--lora-alpha", "4"]  # the settings of the run in `world`, for the resume cases
    m, dj = (model, "model"), (data, "data.jsonl")
    d = case("train-into-earlier-run", train + ["--output", "{d}/out"], USAGE, "not empty", files=[m, dj])
    (d / "out" / "checkpoints" / "step-00000001").mkdir(parents=True)
    (d / "out" / "checkpoints" / "step-00000001" / "optimizer.pt").write_bytes(b"earlier run")
    (d / "out" / "checkpoint.json").write_text('{"step": 1, "path": "checkpoints/step-00000001"}\n')
    (d / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    case("train-lr-nan", train + ["--output", "{d}/out", "--lr", "nan"], USAGE, "lr must be", files=[m, dj])
    # finite, but AdamW's first step (10 x lr) overflows float32: refused up front, not a traceback mid-step
    case("train-lr-overflow", train + ["--output", "{d}/out", "--lr", "1e38"], USAGE, "must fit in float32",
         files=[m, dj])
    case("train-target", train + ["--output", "{d}/out", "--target-modules", "q_prj"], USAGE, "q_prj",
         files=[m, dj])
    d = case("train-not-utf8", train + ["--output", "{d}/out"], DATA, "data.jsonl:2: not UTF-8", files=[m])
    (d / "data.jsonl").write_bytes(json.dumps(swap_task(1)[0]).encode() + b'\n{"text": "caf\xe9"}\n')
    d = case("train-missing-field", train + ["--output", "{d}/out"], DATA, "'response' is missing", files=[m])
    write_jsonl(d / "data.jsonl", swap_task(3) + [{"instruction": "reverse a b"}])
    d = case("train-one-record", train + ["--output", "{d}/out"], DATA, "--eval-fraction 0", files=[m])
    write_jsonl(d / "data.jsonl", swap_task(1))
    case("train-no-data-file", train + ["--output", "{d}/out"], DATA, "not found", files=[m])
    case("train-no-such-model", ["train", "--model", "models/tiny", "--data", "{d}/data.jsonl", "--output",
                                 "{d}/out"], FILE, "no such folder, and not a hub id we could fetch",
         env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(base / "hf-home")}, files=[dj])
    d = case("train-resume-damaged", train + ["--output", "{d}/run", "--resume"], FILE, "sha256",
             files=[m, dj, (run, "run")])
    ck = d / "run" / json.loads((d / "run" / "checkpoint.json").read_text())["path"]
    _flip(ck / "optimizer.pt", 100)
    d = case("train-resume-nan-optimizer", train + ["--output", "{d}/run", "--resume"], NONFINITE, "NaN",
             files=[m, dj, (run, "run")])
    pointer = json.loads((d / "run" / "checkpoint.json").read_text())
    ck = d / "run" / pointer["path"]
    opt = torch.load(ck / "optimizer.pt", weights_only=True)
    floats = [t for t in _tensors(opt) if t.is_floating_point() and t.numel()]
    floats[0].view(-1)[0] = math.inf
    torch.save(opt, ck / "optimizer.pt")
    pointer["sha256"]["optimizer.pt"] = C.file_sha256(ck / "optimizer.pt")  # consistent file, bad values
    (d / "run" / "checkpoint.json").write_text(json.dumps(pointer) + "\n")
    case("merge-into-model", ["merge", "--model", "{d}/model", "--adapter", "{d}/run", "--output", "{d}/model"],
         USAGE, "choose another output", files=[m, (run, "run")])
    case("merge-inside-model", ["merge", "--model", "{d}/model", "--adapter", "{d}/run", "--output",
                                "{d}/model/merged"], USAGE, "choose another output", files=[m, (run, "run")])
    case("merge-over-other-files", ["merge", "--model", "{d}/model", "--adapter", "{d}/run", "--output", "{d}"],
         USAGE, "choose another output", files=[m, (run, "run")])
    case("quantize-into-model", ["quantize", "--model", "{d}/model", "--output", "{d}/model"], USAGE,
         "choose another output", files=[m])
    d = case("merge-nan-adapter", ["merge", "--model", "{d}/model", "--adapter", "{d}/nan", "--output",
                                   "{d}/merged"], NONFINITE, "NaN", files=[m])
    _nan_adapter(run, d / "nan")  # test_nan_adapter_error_names_the_tensor checks the name
    d = case("generate-nan-adapter", ["generate", "--model", "{d}/model", "--adapter", "{d}/nan", "--prompt", "hi"],
             NONFINITE, "lora_B", files=[m])
    _nan_adapter(run, d / "nan")
    d = case("generate-damaged-adapter", ["generate", "--model", "{d}/model", "--adapter", "{d}/run", "--prompt",
                                          "hi"], FILE, "checksum", files=[m, (run, "run")])
    _flip(d / "run" / "adapter_model.safetensors", 3)
    # --debug (anywhere on the line) or QLORA_DEBUG=1: the same usage error raises with its traceback
    case("debug-flag", train + ["--output", "{d}/out", "--lr", "-1", "--debug"], 1, "", files=[m, dj])
    return cases


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "QLORA_DEBUG"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


@pytest.fixture(scope="module")
def results(world, tmp_path_factory):
    """name -> (case, CompletedProcess-like (returncode, stdout, stderr), snapshot before, snapshot after)."""
    cases = _cases(world, tmp_path_factory.mktemp("cases"))
    before = {n: _snapshot(c[0]) for n, c in cases.items()}
    procs = {n: subprocess.Popen([sys.executable, "-m", "qlora_core", *c[1]], env=_env(c[2]), cwd=c[0],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, c in cases.items()}
    out = {}
    for n, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[n] = (cases[n], (p.returncode, stdout, stderr), before[n], _snapshot(cases[n][0]))
    return out


CASE_NAMES = ["train-into-earlier-run", "train-lr-nan", "train-target", "train-not-utf8", "train-missing-field",
              "train-one-record", "train-no-data-file", "train-no-such-model", "train-resume-damaged",
              "train-resume-nan-optimizer", "merge-into-model", "merge-inside-model", "merge-over-other-files",
              "quantize-into-model", "merge-nan-adapter", "generate-nan-adapter", "generate-damaged-adapter"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_one_error_line_exit_code_and_files_untouched(results, name):
    (folder, argv, env, code, needle), (rc, stdout, stderr), before, after = results[name]
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert rc == code, f"{name}: exit {rc}, want {code}\n{stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: stderr is not one error line:\n{stderr}"
    assert needle in lines[0], f"{name}: {needle!r} not in {lines[0]!r}"
    assert "Traceback" not in stderr + stdout
    assert after.keys() == before.keys(), f"{name}: files added {sorted(after.keys() - before.keys())[:5]}, " \
                                          f"removed {sorted(before.keys() - after.keys())[:5]}"
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"{name}: files changed: {changed[:5]}"


def test_every_case_is_checked():
    assert len(set(CASE_NAMES)) == len(CASE_NAMES) == 17


def test_nan_adapter_error_names_the_tensor(results):
    (folder, *_), (rc, _, stderr), _, _ = results["merge-nan-adapter"]
    name = sorted(k for k in load_file(str(folder / "nan" / "adapter_model.safetensors")) if "lora_B" in k)[0]
    assert rc == NONFINITE and name in stderr


def test_debug_flag_shows_the_traceback(results):
    _, (rc, _, stderr), _, _ = results["debug-flag"]
    assert rc == 1 and "Traceback" in stderr and "TrainConfigError: lr must be" in stderr, stderr[-2000:]


# In-process (cli.main, no subprocess: each costs a torch import) for the cases whose path the ones above share.
@pytest.mark.parametrize("flags, needle", [(["--lora-dropout", "1.5"], "lora_dropout"),
                                           (["--resume", "--overwrite"], "contradict"),
                                           (["--eval-fraction", "1"], "eval_fraction")])
def test_usage_errors_in_process(world, tmp_path, capsys, flags, needle):
    root, model, data, _ = world
    rc = cli.main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == USAGE and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_qlora_debug_env_raises(world, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_DEBUG", "1")
    with pytest.raises(TrainConfigError, match="lr must be"):
        cli.main(["train", "--model", str(world[1]), "--data", str(world[2]), "--output", str(tmp_path / "o"),
                  "--lr", "-1"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    """An exception that is no QloraError / OSError is not turned into an error line (in-process)."""
    p = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: p)
    p._subparsers._group_actions[0].choices["quantize"].set_defaults(fn=lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["quantize", "--model", "m", "--output", "o"])


def test_a_bad_flag_is_one_error_line_too(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", "m", "--lr", "fast"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == USAGE and len(err) == 1, err
    assert err[0].startswith("error: qlora train: argument --lr: invalid float value: 'fast'")


def test_overwrite_replaces_an_earlier_run(world, tmp_path):
    """--overwrite (overwrite=True) is the way to start over in a folder holding a run: its checkpoints and metrics
    give way to the new run's."""
    root, model, data, run = world
    out = tmp_path / "run"
    shutil.copytree(run, out)
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 2
    cfg = dict(model=str(model), data=str(data), output=str(out), max_steps=1, batch_size=2, seq_len=64,
               eval_fraction=0.0, log_every=100, lora=LoraConfig(r=2, lora_alpha=4))
    with pytest.raises(TrainConfigError, match="not empty"):
        T.train(TrainConfig(**cfg))
    T.train(TrainConfig(**cfg, overwrite=True))
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 1
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]


@pytest.mark.parametrize("flags, code, needle", [(["--lr", "nan"], USAGE, "lr must be"),
                                                 (["--data", "missing.jsonl"], DATA, "not found")])
def test_nproc_checks_before_launching_torchrun(world, tmp_path, capsys, monkeypatch, flags, code, needle):
    """train --nproc N fails in the launching process, with its one line and code, before any worker starts:
    otherwise each of the N ranks prints the error and torchrun exits 1 with its own traceback summary."""
    from qlora_core import distributed
    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("torchrun launched for a bad command"))
    root, model, data, _ = world
    rc = cli.main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o"),
                   "--nproc", "2", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code and len(err) == 1 and needle in err[0], err


def test_metrics_are_on_disk_before_the_checkpoint_records_them(world, tmp_path, monkeypatch):
    """checkpoint.json records metrics.jsonl's length and resume refuses a shorter file, so the file must be
    fsync'd before the pointer is written: else a power loss makes a durable checkpoint unresumable."""
    root, model, data, _ = world
    events = []
    real_fsync, real_write = C.fsync_file, C.atomic_write_text
    monkeypatch.setattr(C, "fsync_file", lambda p: (events.append(("fsync", Path(p).name)), real_fsync(p)))
    monkeypatch.setattr(C, "atomic_write_text", lambda p, t: (events.append(("write", Path(p).name)),
                                                              real_write(p, t)))
    T.train(TrainConfig(model=str(model), data=str(data), output=str(tmp_path / "o"), max_steps=1, batch_size=2,
                          seq_len=64, eval_fraction=0.0, log_every=100, lora=LoraConfig(r=2, lora_alpha=4)))
    assert ("fsync", "metrics.jsonl") in events
    assert events.index(("fsync", "metrics.jsonl")) < events.index(("write", "checkpoint.json")), events


def test_only_rank_0_refuses_a_non_empty_output(world, tmp_path, monkeypatch):
    """Under torchrun rank 0 may already have opened metrics.jsonl (FSDP runs no collective before the first
    step) when a slower rank runs its preflight: that rank must not take the folder for an earlier run's."""
    root, model, data, _ = world
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    cfg = TrainConfig(model=str(model), data=str(data), output=str(out), eval_fraction=0.0)
    monkeypatch.setenv("RANK", "1")
    preflight(cfg)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TrainConfigError, match="not empty"):
        preflight(cfg)


@pytest.mark.parametrize("command", [["train", "--data", "{data}", "--output", "{out}"],
                                     ["quantize", "--output", "{out}"], ["generate", "--prompt", "hi"]])
def test_a_device_this_machine_lacks_is_a_usage_error(world, tmp_path, capsys, monkeypatch, command):
    """--device cuda without a GPU (or cuda:N past the last one) is a one-line usage error, not torch's
    AssertionError traceback from deep inside the model load."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    root, model, data, _ = world
    argv = [a.format(data=data, out=tmp_path / "o") for a in command] + ["--model", str(model), "--device", "cuda"]
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == USAGE and len(err) == 1 and "'cuda'" in err[0] and "no CUDA GPU" in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_fresh_start_removes_the_earlier_runs_adapter(world, tmp_path):
    """--overwrite starts over: the earlier run's adapter goes with its metrics, or a new run that stops early
    (non-finite losses) leaves the old adapter beside the new metrics.jsonl."""
    import types
    root, model, data, run = world
    out = tmp_path / "run"
    shutil.copytree(run, out)
    assert (out / "adapter_model.safetensors").is_file()
    fake = types.SimpleNamespace(cfg=types.SimpleNamespace(resume=False, overwrite=True), world=types.SimpleNamespace(main=True),
                                 out=out, say=print)
    C.start_fresh(fake)
    assert sorted(p.name for p in out.iterdir()) == [], sorted(p.name for p in out.iterdir())


def _qlora(argv: list, cwd: Path) -> tuple[int, str, str]:
    """`python -m qlora_core *argv` in cwd: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "qlora_core", *map(str, argv)], env=_env({}), cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def _train_argv(model: Path, data: Path, out: Path, *extra) -> list:
    return ["train", "--model", model, "--data", data, "--output", out, "--seq-len", "64", "--lora-r", "2",
            "--lora-alpha", "4", "--batch-size", "2", "--eval-fraction", "0", *extra]


def test_a_run_stopped_by_non_finite_steps_exits_5(world, tmp_path):
    """lr 1e30: the first update drives the adapter to ~1e30, every later loss is NaN; at --max-bad-steps 2 the run
    stops: exit 5 (NonFiniteError), one `error:` line naming the stop, no adapter written."""
    root, model, data, run = world
    rc, stdout, stderr = _qlora(_train_argv(model, data, tmp_path / "out", "--max-steps", "6", "--lr", "1e30",
                                            "--warmup-steps", "0", "--max-bad-steps", "2", "--optim-bits", "32"),
                                tmp_path)
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert rc == NONFINITE == 5, f"exit {rc}\n{stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: stopped at step 3: 2 consecutive"), stderr
    assert "Traceback" not in stderr + stdout
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_overwrite_removes_the_earlier_run_and_nothing_else(world, tmp_path):
    """`qlora train --overwrite` into a folder holding an earlier run plus files that are not ours (beside the run
    and inside checkpoints/): the run's files afterwards are the new run's (1 step), the foreign files and
    folders byte-identical (start_fresh removed the whole checkpoints/ folder before)."""
    root, model, data, run = world
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "notes.txt").write_text("mine, not qlora's\n")
    (out / "plots").mkdir()
    (out / "plots" / "loss.png").write_bytes(b"\x89PNG not really")
    (out / "checkpoints" / "README").write_text("a user's file among the checkpoints\n")
    (out / "checkpoints" / "best").mkdir()
    (out / "checkpoints" / "best" / "weights.bin").write_bytes(b"a user's folder among the checkpoints")
    foreign = {k: v for k, v in _snapshot(out).items() if k.startswith(("notes", "plots", "checkpoints/README",
                                                                         "checkpoints/best"))}
    assert len(foreign) == 4
    old = _snapshot(out)
    rc, stdout, stderr = _qlora(_train_argv(model, data, out, "--max-steps", "1", "--save-every", "1",
                                            "--overwrite"), tmp_path)
    assert rc == 0, stderr[-3000:]
    after = _snapshot(out)
    assert {k: after.get(k) for k in foreign} == foreign, "a file that is not ours was changed or deleted"
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 1
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["README", "best", "step-00000001"]
    assert after["adapter_model.safetensors"] != old["adapter_model.safetensors"]


def test_every_documented_exit_code_is_run():
    """Each code in docs/errors.md's table is produced by a subprocess test here: 0 (the --overwrite run), 1
    (debug-flag), 2-5 (the cases, and 5 also by the run stopped on non-finite steps)."""
    import re
    doc = (REPO / "docs" / "errors.md").read_text()
    documented = {int(c) for c in re.findall(r"^\| (\d+) \|", doc, flags=re.M)}
    results_codes = {1} | {0, NONFINITE}  # debug-flag; the two training tests above
    cases = _cases_codes()
    assert documented == {0, 1, 2, 3, 4, 5} and documented <= results_codes | cases, sorted(documented - cases)


def _cases_codes() -> set:
    """The exit codes the subprocess cases of _cases expect (read from the source: building them needs the
    module's fixtures)."""
    import inspect
    import re
    src = inspect.getsource(_cases)
    names = {"USAGE": USAGE, "DATA": DATA, "FILE": FILE, "NONFINITE": NONFINITE}
    return {names[m] for m in re.findall(r"\b(USAGE|DATA|FILE|NONFINITE)\b", src)}
