"""Training checkpoints: what train() writes to resume a run, how it is made crash-safe, and how it is verified.

A checkpoint is checkpoints/step-N/ in the output folder: the adapter (adapter.save_adapter), optimizer.pt (the
optimizer's state, optim_shards.gather_state: resumable on any process count) and trainer_state.pt (step,
scheduler, RNG states, data position, bad-step streak, the TrainConfig as a dict, process count).

- It is written into a fresh directory that is renamed into place, then a small pointer file `checkpoint.json` is
  replaced atomically: a run killed at any moment finds either the old or the new checkpoint, whole, and
  `resume=True` continues bit-exactly (same data order, dropout masks, optimizer state).
- checkpoint.json records the sha256 of every file of the checkpoint and of metrics.jsonl up to its step; resume
  verifies them, the adapter's own checksum and that no adapter or optimizer tensor is NaN/Inf before it
  continues (CheckpointError otherwise), and cuts metrics.jsonl back to the checkpoint's step.

`checkpoint`, `restore` and `start_fresh` act on the loop's Run (train_loop.py): its model, optimizer, scheduler,
data stream, counters and output folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch

from . import distributed
from .adapter import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from .durable import atomic_write, atomic_write_text, fsync_dir, fsync_file, fsync_tree
from .errors import FileLoadError, NonFiniteError
from .optim_shards import gather_state, load_state

POINTER = "checkpoint.json"
METRICS = "metrics.jsonl"


class CheckpointError(FileLoadError, ValueError):
    """A training checkpoint (checkpoint.json and the files it names) that is missing, damaged or inconsistent."""


class NonFiniteCheckpointError(NonFiniteError, ValueError):
    """A checkpoint's optimizer state holds NaN or Inf (the message names the tensor)."""


# -- a run's checkpoints ------------------------------------------------------------------------------------------
def checkpoint(run) -> None:
    """Every rank gathers its adapter and optimizer shards (collectives), then rank 0 writes checkpoints/step-N
    whole. No collective runs while rank 0 writes, so a failing rank never leaves a checkpoint half-written."""
    w = run.world
    lora = distributed.gather_lora(run.model) if w.parallel == "fsdp" and w.size > 1 else None
    opt_state = gather_state(run.opt, w.rank, w.size)
    if w.main:
        state = {"step": run.step, "scheduler": run.sched.state_dict(), "rng": _rng_state(run.device),
                 "data_position": run.stream.position, "bad_streak": run.bad, "config": run.cfg.to_dict(),
                 "world_size": w.size}
        save_checkpoint(run.out, run.step, run.model, opt_state, state, lora)


def restore(run, ck: Path, st: dict) -> None:
    """Continue from checkpoint `ck` with trainer_state `st` (load_checkpoint's pair; the adapter is already in the
    model): optimizer state (re-cut when the process count changed), scheduler, data position, RNG (one process;
    dropout does not depend on it),
    and metrics.jsonl cut to its step."""
    w = run.world
    opt_state = _torch_load(ck / "optimizer.pt")
    check_state_finite(opt_state, str(ck / "optimizer.pt"))
    try:
        load_state(run.opt, opt_state, w.rank, w.size)
    except (KeyError, TypeError, IndexError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ck / 'optimizer.pt'} does not fit this run's optimizer "
                              f"({type(e).__name__}: {e})") from None
    run.sched.load_state_dict(st["scheduler"])
    if w.size == 1:
        _set_rng_state(st["rng"], run.device)  # dropout is reseeded per micro-batch (train_loop.dropout_seed)
    run.step, run.bad, run.stream.position = st["step"], st["bad_streak"], st["data_position"]
    if w.main:
        _restore_metrics(run.out / METRICS, run.step, st.get("metrics_record"))


def start_fresh(run) -> None:
    """A new run in run.out: rank 0 removes an earlier run's metrics, pointer and checkpoints, and with
    cfg.overwrite its adapter too (a new run stopping early would otherwise leave it beside its own metrics, as if
    it were the new result; without a checkpoint, --resume keeps an adapter it did not write)."""
    if run.cfg.resume:
        run.say(f"no checkpoint in {run.out}; starting fresh")
    if run.world.main:
        names = (METRICS, POINTER) + ((WEIGHTS_NAME, CONFIG_NAME) if run.cfg.overwrite else ())
        for name in names:
            (run.out / name).unlink(missing_ok=True)
        _remove_checkpoints(run.out / "checkpoints")


def _rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


# -- the checkpoint folder ----------------------------------------------------------------------------------------
def save_checkpoint(out: Path, step: int, model, opt_state: dict, trainer_state: dict,
                    lora: dict | None = None) -> Path:
    """Write checkpoints/step-N as a whole (temp dir + rename), then point checkpoint.json at it; drop older ones.

    opt_state: the optimizer's state in checkpoint form (optim_shards.gather_state); trainer_state: step, scheduler,
    rng, data_position, bad_streak, config, world_size; lora: gathered adapter tensors (module path -> (A, B)) when
    the model's own are sharded, else None.
    """
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=root))
    save_adapter(model, tmp, trainer_state["config"]["model"], tensors=lora)
    torch.save(opt_state, tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    fsync_tree(tmp)  # every file on disk before the directory gets its final name
    sums = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step saved by an earlier, killed process: the pointer may not name it yet
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    pointer = {"step": step, "path": f"checkpoints/{final.name}", "sha256": sums}
    if (out / METRICS).is_file():  # metrics.jsonl up to this step: resume verifies it and cuts the file there
        fsync_file(out / METRICS)  # on disk before the pointer records it, or a power loss strands the checkpoint
        pointer["metrics"] = {"bytes": (out / METRICS).stat().st_size, "sha256": file_sha256(out / METRICS)}
    atomic_write_text(out / POINTER, json.dumps(pointer) + "\n")
    _remove_checkpoints(root, keep=final.name)
    return final


def _remove_checkpoints(root: Path, keep: str | None = None) -> None:
    """Remove the checkpoint folders we write in `root` (step-N and the .tmp-step-* of a killed save), except
    `keep`; anything else there is not ours and stays. `root` itself goes if that leaves it empty."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        ours = p.is_dir() and not p.is_symlink() and re.fullmatch(r"step-\d+|\.tmp-step-.*", p.name)
        if ours and p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
    if keep is None and not any(root.iterdir()):
        root.rmdir()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(out: Path) -> tuple[Path, dict] | None:
    """(checkpoint directory, trainer_state dict) named by out/checkpoint.json, or None without a pointer file.

    Every file the pointer lists a sha256 for must be there with that hash (pointers written before checksums
    list none). trainer_state holds step, scheduler, rng, data_position, bad_streak, config
    (TrainConfig.to_dict()) and world_size; it is read with torch.load(weights_only=True) (tensors and plain
    containers only, no arbitrary unpickling). The pointer's record of metrics.jsonl (bytes and sha256 of the file
    at the checkpoint) is added to it as "metrics_record". CheckpointError for a pointer, file or state that is
    missing, damaged or inconsistent.
    """
    p = out / POINTER
    if not p.exists():
        return None
    try:
        ptr = json.loads(p.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(ptr, dict) or not isinstance(ptr.get("path"), str) or not isinstance(ptr.get("step"), int):
        raise CheckpointError(f"{p} must be an object with a string 'path' and an integer 'step'")
    sums = ptr.get("sha256", {})
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise CheckpointError(f"{p}: 'sha256' must map file names to hex digests")
    root = (out / "checkpoints").resolve()
    ck = (out / ptr["path"]).resolve()
    if ck.parent != root:
        raise CheckpointError(f"{p} points at {ptr['path']!r}, which is not a folder in {out / 'checkpoints'}")
    if not ck.is_dir():
        raise CheckpointError(f"{p} points at {ck}, which does not exist (deleted?); remove {p} to start over")
    for name, want in sorted(sums.items()):
        f = ck / name
        if f.parent != ck or not f.is_file():
            raise CheckpointError(f"checkpoint {ck} lacks {name!r}, which {p} lists")
        if file_sha256(f) != want:
            raise CheckpointError(f"{f} does not match the sha256 recorded in {p}: the file was damaged or "
                                  f"changed after it was written")
    st = _torch_load(ck / "trainer_state.pt")
    need = {"step": int, "scheduler": dict, "rng": dict, "data_position": int, "bad_streak": int, "config": dict}
    bad = [k for k, t in need.items() if not isinstance(st.get(k) if isinstance(st, dict) else None, t)]
    if bad:
        raise CheckpointError(f"{ck / 'trainer_state.pt'}: field(s) {bad} missing or of the wrong type")
    if st["step"] != ptr["step"]:
        raise CheckpointError(f"{p} says step {ptr['step']} but {ck / 'trainer_state.pt'} holds step {st['step']}")
    rec = ptr.get("metrics")
    if rec is not None:
        if (not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int) or rec["bytes"] < 0
                or not isinstance(rec.get("sha256"), str)):
            raise CheckpointError(f"{p}: 'metrics' must hold an integer 'bytes' and a 'sha256'")
        st["metrics_record"] = rec
    return ck, st


def _torch_load(path: Path):
    """torch.load(weights_only=True) with every failure of a damaged file as a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling damage surfaces as many types
        raise CheckpointError(f"{path} is not a readable checkpoint file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None


def check_state_finite(state, where: str, path: str = "") -> None:
    """NonFiniteCheckpointError naming the first floating tensor in a nested dict / list that holds NaN or Inf."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and state.numel() and not bool(torch.isfinite(state).all()):
            raise NonFiniteCheckpointError(f"{where}: tensor {path or '<root>'} holds NaN/Inf values")
    elif isinstance(state, dict):
        for k, v in state.items():
            check_state_finite(v, where, f"{path}.{k}" if path else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            check_state_finite(v, where, f"{path}[{i}]")


# -- metrics.jsonl ------------------------------------------------------------------------------------------------
def check_metrics(path: Path, last_step: int, record: dict | None) -> None:
    """CheckpointError unless metrics.jsonl starts with the bytes the checkpoint at last_step recorded (record:
    load_checkpoint's "metrics_record"; None, from checkpoints that predate it, checks nothing)."""
    if record is None:
        return
    n = record["bytes"]
    size = path.stat().st_size if path.is_file() else 0
    if size < n:
        raise CheckpointError(f"{path} holds {size} bytes but the checkpoint at step {last_step} recorded {n}: "
                              f"metrics were lost since; remove checkpoint.json to start over")
    with open(path, "rb") as f:
        if hashlib.sha256(f.read(n)).hexdigest() != record["sha256"]:
            raise CheckpointError(f"{path}: the lines up to step {last_step} differ from what the checkpoint "
                                  f"recorded (the file was damaged or edited)")


def _restore_metrics(path: Path, last_step: int, record: dict | None) -> None:
    """Cut metrics.jsonl back to the checkpoint: to the recorded length after check_metrics, or, for checkpoints
    without a record, to the lines of steps <= last_step."""
    if record is None:
        _truncate_metrics(path, last_step)
        return
    check_metrics(path, last_step, record)
    if path.stat().st_size > record["bytes"]:
        with open(path, "rb") as f:
            keep = f.read(record["bytes"])
        atomic_write(path, lambda p: Path(p).write_bytes(keep))


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep metrics.jsonl lines up to last_step (lines written after the checkpoint by a killed run go)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if rec.get("step", 0) <= last_step:
            keep.append(line)
    atomic_write_text(path, "".join(x + "\n" for x in keep))
