"""Fuzzing every file format we read (issue #13): truncations, byte flips and field mutations may only ever give one
of our named errors (a QloraError), never a raw exception, a hang or a wrong load.

What "never a wrong load" can mean depends on the format: the files we write carry checksums (adapter tensors:
safetensors metadata; checkpoint files: checkpoint.json), so any damage to their tensors must be an error. A
model's safetensors carries none (docs/errors.md), so damage there must be an error or give finite weights; a
mutated quant-state blob that still parses must describe a tensor that dequantizes to its own shape.
"""
import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qlora_core.train_loop as T
import qlora_core.train_checkpoint as C
from qlora_core.train_config import TrainConfig
from qlora_core import data as D
from qlora_core.adapter import load_adapter, read_adapter
from qlora_core.errors import DataError, QloraError
from qlora_core.loading import load_llama
from qlora_core.lora import LoraConfig
from qlora_core.ops.quant4 import QuantizedTensor, QuantStateError, quantize
from tests._tiny import make_model_folder, swap_task, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

FUZZ = settings(max_examples=30, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=6)


@st.composite
def damage(draw, size: int, header: int = 0):
    """("cut", n): keep the first n bytes; ("flip", i, x): xor byte i with x. Half the positions fall in the first
    `header` bytes when given (headers are where a flip changes structure rather than one value)."""
    hi = header if header and draw(st.booleans()) else size - 1
    if draw(st.booleans()):
        return ("cut", draw(st.integers(0, size - 1)))
    return ("flip", draw(st.integers(0, hi)), draw(st.integers(1, 255)))


def _apply(path: Path, d) -> None:
    b = bytearray(path.read_bytes())
    if d[0] == "cut":
        b = b[:d[1]]
    else:
        b[d[1]] ^= d[2]
    path.write_bytes(bytes(b))


def _header_len(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@st.composite
def json_mutation(draw, keys: list[str]):
    """("set", key, value) / ("del", key) on a JSON object's field, ("bytes", damage) on its text."""
    kind = draw(st.sampled_from(["set", "set", "del", "bytes"]))
    if kind == "bytes":
        return ("bytes",)
    key = draw(st.sampled_from(keys))
    return ("del", key) if kind == "del" else ("set", key, draw(JSON))


def _mutate_json(path: Path, m, data) -> None:
    if m[0] == "bytes":
        _apply(path, data.draw(damage(path.stat().st_size)))
        return
    d = json.loads(path.read_text())
    if m[0] == "del":
        d.pop(m[1], None)
    else:
        d[m[1]] = m[2]
    path.write_text(json.dumps(d))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model folder, its dense fp32 model, and a 1-step run (adapter + checkpoint) in it."""
    root = tmp_path_factory.mktemp("fuzz")
    model = make_model_folder(root / "model", hidden=32, layers=1)
    data = write_jsonl(root / "data.jsonl", swap_task(8))
    run = root / "run"
    T.train(TrainConfig(model=str(model), data=str(data), output=str(run), max_steps=1, batch_size=2,
                          seq_len=64, eval_fraction=0.0, log_every=100, lora=LoraConfig(r=2, lora_alpha=4)))
    base = load_llama(model, quantize=None, dtype=torch.float32)
    return root, model, run, base


def _scratch(src: Path, names=None) -> Path:
    d = Path(tempfile.mkdtemp(prefix="fuzz-"))
    for f in src.iterdir():
        if names is None or f.name in names:
            (shutil.copytree if f.is_dir() else shutil.copy)(f, d / f.name)
    return d


@FUZZ
@given(data=st.data())
def test_model_safetensors_damage(world, data):
    """No checksum in a model file: damage is a LoadError or a load whose weights are all finite."""
    d = _scratch(world[1], {"config.json", "model.safetensors"})
    f = d / "model.safetensors"
    _apply(f, data.draw(damage(f.stat().st_size, _header_len(f))))
    try:
        m = load_llama(d, quantize=None, dtype=torch.float32)
    except QloraError:
        return
    finally:
        shutil.rmtree(d)
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())


def _quant_sd():
    torch.manual_seed(0)
    return quantize(torch.randn(8, 64), "nf4", blocksize=64, double_quant=True).state_dict("l.")


BLOB = "l.weight.quant_state.bitsandbytes__nf4"


@FUZZ
@given(m=json_mutation(["quant_type", "blocksize", "dtype", "shape", "nested_offset", "nested_blocksize",
                        "nested_dtype"]), data=st.data())
def test_quant_state_blob_mutations(m, data):
    sd = _quant_sd()
    raw = bytes(sd[BLOB].tolist())
    if m[0] == "bytes":
        b = bytearray(raw)
        d = data.draw(damage(len(b)))
        if d[0] == "cut":
            b = b[:d[1]]
        else:
            b[d[1]] ^= d[2]
        raw = bytes(b)
    else:
        meta = json.loads(raw)
        if m[0] == "del":
            meta.pop(m[1], None)
        else:
            meta[m[1]] = m[2]
        raw = json.dumps(meta).encode()
    sd[BLOB] = torch.tensor(list(raw), dtype=torch.uint8)
    try:
        q = QuantizedTensor.from_state_dict(sd, "l.")
    except QuantStateError:
        return
    assert q.dequantize().shape == q.shape  # a blob that parses describes a tensor that dequantizes


@FUZZ
@given(m=json_mutation(["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias",
                        "use_dora", "base_model_name_or_path", "rank_pattern"]), data=st.data())
def test_adapter_config_mutations(world, m, data):
    d = _scratch(world[2], {"adapter_config.json", "adapter_model.safetensors"})
    _mutate_json(d / "adapter_config.json", m, data)
    model = copy.deepcopy(world[3])
    try:
        load_adapter(model, d, check_base=False)
    except QloraError:
        return
    finally:
        shutil.rmtree(d)


@FUZZ
@given(data=st.data())
def test_adapter_weights_damage_is_always_detected(world, data):
    """Our adapter carries a checksum: damage is an error, unless it only touched metadata we do not read."""
    d = _scratch(world[2], {"adapter_config.json", "adapter_model.safetensors"})
    f = d / "adapter_model.safetensors"
    _, good = read_adapter(world[2])
    _apply(f, data.draw(damage(f.stat().st_size, _header_len(f))))
    try:
        _, got = read_adapter(d)
    except QloraError:
        return
    finally:
        shutil.rmtree(d)
    assert got.keys() == good.keys() and all(torch.equal(got[k], good[k]) for k in good)


@FUZZ
@given(m=json_mutation(["step", "path", "sha256", "metrics"]), data=st.data())
def test_checkpoint_pointer_mutations(world, m, data):
    run = world[2]
    want_step = json.loads((run / "checkpoint.json").read_text())["step"]
    d = _scratch(run, {"checkpoint.json", "checkpoints"})
    _mutate_json(d / "checkpoint.json", m, data)
    try:
        found = C.load_checkpoint(d)
    except QloraError:
        return
    finally:
        shutil.rmtree(d)
    assert found is not None and found[1]["step"] == want_step


@FUZZ
@given(which=st.sampled_from(["optimizer.pt", "trainer_state.pt", "adapter_model.safetensors",
                              "adapter_config.json"]), data=st.data())
def test_checkpoint_file_damage_is_always_detected(world, which, data):
    d = _scratch(world[2], {"checkpoint.json", "checkpoints"})
    ck = d / json.loads((d / "checkpoint.json").read_text())["path"]
    f = ck / which
    _apply(f, data.draw(damage(f.stat().st_size)))
    try:
        with pytest.raises(C.CheckpointError):
            C.load_checkpoint(d)
    finally:
        shutil.rmtree(d)


@FUZZ
@given(data=st.data())
def test_metrics_damage_is_always_detected(world, data):
    """The run's last checkpoint recorded metrics.jsonl whole: any cut or flipped byte fails the resume check."""
    run = world[2]
    _, st_ = C.load_checkpoint(run)
    d = _scratch(run, {"metrics.jsonl"})
    f = d / "metrics.jsonl"
    assert st_["metrics_record"]["bytes"] == f.stat().st_size > 0
    C.check_metrics(f, st_["step"], st_["metrics_record"])  # intact: passes
    _apply(f, data.draw(damage(f.stat().st_size)))
    try:
        with pytest.raises(C.CheckpointError, match="metrics.jsonl"):
            C.check_metrics(f, st_["step"], st_["metrics_record"])
    finally:
        shutil.rmtree(d)


@FUZZ
@given(lines=st.lists(st.one_of(st.binary(max_size=40),
                                st.builds(lambda k, v: json.dumps({**swap_task(1)[0], k: v}).encode(),
                                          st.sampled_from(["instruction", "response", "input", "messages", "prompt",
                                                           "completion", "text", "tools"]), JSON),
                                st.builds(lambda v: json.dumps(v).encode(), JSON)), min_size=1, max_size=4))
def test_data_jsonl_lines(world, lines):
    """Random bytes, JSON values and records with one field set to a random value: a DataError (DataFormatError,
    ChatTemplateError) from reading or tokenizing, or records that encode."""
    tok = _tokenizer(world[1])
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as f:
        f.write(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    try:
        recs = D.read_jsonl(f.name)
        for r in recs:
            D.encode_record(tok, r)
    except DataError:
        pass
    finally:
        Path(f.name).unlink()


_TOK = {}


def _tokenizer(folder):
    if folder not in _TOK:
        _TOK[folder] = D.TextTokenizer.from_folder(folder)
    return _TOK[folder]
