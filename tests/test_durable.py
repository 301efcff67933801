"""qlora_core/durable.py: atomic, fsync'd writes (what adapters, checkpoints and merged models are saved with).

Properties: the data is fsync'd before the rename and the directory after it (order recorded by wrapping
os.fsync / os.replace); a failing writer leaves the old file and no temporary file behind; files get mode
0644; fsync_tree reaches every file and directory. A training checkpoint directory is fsync'd before its rename.
"""
import os
import stat

import pytest

from qlora_core import durable


def _record(monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.realpath(a), os.path.realpath(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_data_synced_before_rename_and_directory_after(tmp_path, monkeypatch):
    events = _record(monkeypatch)
    target = tmp_path / "adapter.bin"
    durable.atomic_write(target, lambda p: open(p, "wb").write(b"new"))
    assert target.read_bytes() == b"new"
    kinds = [e[0] for e in events]
    i = kinds.index("replace")
    tmp = events[i][1]
    assert ("fsync", tmp) in events[:i], f"temporary file not fsync'd before the rename: {events}"
    assert ("fsync", str(tmp_path)) in events[i + 1:], f"directory not fsync'd after the rename: {events}"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert os.listdir(tmp_path) == ["adapter.bin"]


def test_failing_writer_keeps_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")

    def boom(p):
        open(p, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        durable.atomic_write(target, boom)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]


def test_fsync_tree_reaches_every_file_and_directory(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for p in ("x.pt", "a/y.pt", "a/b/z.pt"):
        (tmp_path / p).write_bytes(b"1")
    events = _record(monkeypatch)
    durable.fsync_tree(tmp_path)
    synced = {e[1] for e in events}
    want = {str(tmp_path / p) for p in ("x.pt", "a/y.pt", "a/b/z.pt", "a", "a/b")} | {str(tmp_path)}
    assert want <= synced, want - synced
    order = [e[1] for e in events]
    assert order.index(str(tmp_path / "a/b/z.pt")) < order.index(str(tmp_path / "a/b")) < order.index(str(tmp_path))


def test_training_checkpoint_directory_synced_before_rename(tmp_path, monkeypatch):
    """save_checkpoint: every file of the step directory is fsync'd before the directory is renamed into place,
    and the pointer file is written durably after it."""
    import torch

    from qlora_core import train_checkpoint
    from qlora_core.train_config import TrainConfig
    calls = []
    monkeypatch.setattr(train_checkpoint, "fsync_tree", lambda p: calls.append(("tree", str(p))))
    monkeypatch.setattr(train_checkpoint, "fsync_dir", lambda p: calls.append(("dir", str(p))))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", str(a), str(b))), real_replace(a, b)))
    monkeypatch.setattr(train_checkpoint, "atomic_write_text", lambda path, text: calls.append(("pointer", str(path))))
    monkeypatch.setattr(train_checkpoint, "save_adapter", lambda model, d, base, tensors=None: None)

    cfg = TrainConfig(model="m", data="d", output=str(tmp_path))
    state = {"step": 3, "scheduler": {"w": torch.zeros(1)}, "config": cfg.to_dict()}
    final = train_checkpoint.save_checkpoint(tmp_path, 3, None, {"w": torch.zeros(1)}, state)
    kinds = [c[0] for c in calls]
    tree_i = kinds.index("tree")
    rename_i = next(i for i, c in enumerate(calls) if c[0] == "replace" and c[2] == str(final))
    assert calls[tree_i][1] == calls[rename_i][1], "synced tree is not the one renamed"
    assert tree_i < rename_i < kinds.index("dir") < kinds.index("pointer")


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("exchange", [True, False])  # Linux renameat2, and the rename-aside fallback
def test_replace_dir_is_all_or_nothing(tmp_path, monkeypatch, exchange):
    swaps, real = [], durable._exchange

    def recorded(a, b):
        swaps.append(real(a, b) if exchange else False)
        return swaps[-1]

    monkeypatch.setattr(durable, "_exchange", recorded)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "config.json").write_text("old")

    def half_then_fail(tmp):
        (tmp / "model.safetensors").write_bytes(b"new weights")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        durable.replace_dir(out, half_then_fail)
    assert _tree(out) == {"model.safetensors": b"old weights", "config.json": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left

    def full(tmp):
        (tmp / "model.safetensors").write_bytes(b"new weights")

    durable.replace_dir(out, full)
    assert _tree(out) == {"model.safetensors": b"new weights"}  # the new folder whole, nothing of the old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert swaps == [exchange]  # the path under test was the one taken (renameat2 works on this Linux box)
    durable.replace_dir(tmp_path / "fresh", full)
    assert _tree(tmp_path / "fresh") == {"model.safetensors": b"new weights"}


def test_write_checkpoint_refuses_non_finite_tensors_and_writes_nothing(tmp_path):
    import torch

    from qlora_core.export import NonFiniteExportError, write_checkpoint
    sd = {"a.weight": torch.ones(2, 2), "b.weight": torch.tensor([1.0, float("inf")])}
    with pytest.raises(NonFiniteExportError, match="b.weight"):
        write_checkpoint(sd, tmp_path / "out", {"model_type": "llama"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_through_a_symlink_replaces_the_folder_it_names(tmp_path, monkeypatch, exchange):
    """An output given as a symlink to a folder (on another disk, say): the folder it names gets the new content
    and the link stays; swapping the link itself failed in rmtree after the write, leaving a stray link."""
    if not exchange:
        monkeypatch.setattr(durable, "_exchange", lambda a, b: False)
    real = tmp_path / "disk" / "ckpt"
    real.mkdir(parents=True)
    (real / "model.safetensors").write_bytes(b"old weights")
    link = tmp_path / "ckpt"
    link.symlink_to(real)
    durable.replace_dir(link, lambda tmp: (tmp / "model.safetensors").write_bytes(b"new weights"))
    assert link.is_symlink() and _tree(real) == {"model.safetensors": b"new weights"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "disk"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["ckpt"]
