"""load_llama: both config forms, bnb-4bit checkpoints (written by bitsandbytes itself and by our state dict),
streaming (one dense weight alive at a time), the hub path, and every named error."""
import copy
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_core.model_config import ConfigError, LlamaConfig
from qlora_core.loading import (CorruptCheckpointError, HubUnavailableError, LoadError, MissingShardError,
                                MissingWeightError, NonFiniteWeightError, ShapeMismatchError, UnexpectedWeightError,
                                UnsupportedCheckpointError, load_llama)
from qlora_core.qlinear import QuantLinear
from qlora_core.ops.quant4 import dequantize
from tests.llama_folders import CONFIGS, hf_config_dict, make_folder, random_state_dict, write_folder

SHARDED = "llama3-gqa-headdim-untied-3shards-v5"
SINGLE = "default-mha-tied-single-v4"
REPO = Path(__file__).resolve().parents[1]


def _ids(vocab, B=2, T=11):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(5))


def _quant_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# -- config.json -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_both_config_forms_give_the_same_config(name):
    spec = CONFIGS[name]
    v4 = LlamaConfig.from_hf_config(hf_config_dict({**spec, "form": "v4"}))
    v5 = LlamaConfig.from_hf_config(hf_config_dict({**spec, "form": "v5"}))
    assert v4 == v5
    assert v4.rope_theta == spec["rope_theta"]
    assert v4.num_key_value_heads == spec["arch"].get("num_key_value_heads", spec["arch"]["num_attention_heads"])
    assert (v4.rope_scaling is None) == (spec["rope"] is None)
    assert LlamaConfig.from_hf_config(v4.to_hf_config()) == v4  # what merge/quantize write reads back


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.pop("num_hidden_layers"), "num_hidden_layers"),
    (lambda d: d.pop("vocab_size"), "vocab_size"),
    (lambda d: d.update(hidden_size=0), "hidden_size"),
    (lambda d: d.update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda d: d.update(model_type="gpt2"), "model_type"),
    (lambda d: d.update(hidden_act="gelu"), "hidden_act"),
    (lambda d: d.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (lambda d: d.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
])
def test_bad_config_gets_a_named_error(edit, match):
    d = hf_config_dict(CONFIGS[SINGLE])
    edit(d)
    with pytest.raises(ConfigError, match=match):
        LlamaConfig.from_hf_config(d)


def test_config_errors_from_the_folder(tmp_path):
    folder = make_folder(tmp_path / "m", SINGLE)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["intermediate_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json.*intermediate_size"):
        load_llama(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_llama(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        load_llama(folder)


# -- named file and tensor errors ------------------------------------------------------------------------
@pytest.fixture
def sharded(tmp_path):
    return make_folder(tmp_path / "m", SHARDED)


def test_missing_shard(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(MissingShardError, match="model-00002-of-00003.safetensors"):
        load_llama(sharded)


def test_no_weights_at_all(tmp_path):
    folder = make_folder(tmp_path / "m", SINGLE)
    (folder / "model.safetensors").unlink()
    with pytest.raises(MissingShardError, match="model.safetensors"):
        load_llama(folder)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_truncated_safetensors(sharded, quantize):
    f = sharded / "model-00003-of-00003.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CorruptCheckpointError, match="model-00003-of-00003.safetensors"):
        load_llama(sharded, quantize=quantize)


def test_corrupt_safetensors_header(tmp_path):
    folder = make_folder(tmp_path / "m", SINGLE)
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage inside the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_llama(folder)


def test_index_that_disagrees_with_shards(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    key = "model.norm.weight"
    index["weight_map"][key] = next(v for v in index["weight_map"].values() if v != index["weight_map"][key])
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=key):
        load_llama(sharded)


def _rewrite_single(folder, edit):
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f))


def test_shape_mismatch(tmp_path):
    folder = make_folder(tmp_path / "m", SINGLE)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight"):
        load_llama(folder)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_nan_weight(tmp_path, quantize):
    folder = make_folder(tmp_path / "m", SINGLE)
    key = "model.layers.1.self_attn.v_proj.weight"

    def poison(sd):
        sd[key][3, 5] = float("nan")
        sd[key][0, 0] = float("inf")
    _rewrite_single(folder, poison)
    with pytest.raises(NonFiniteWeightError, match=rf"{key}: 2 of"):
        load_llama(folder, quantize=quantize)


def test_missing_and_unexpected_weights(tmp_path):
    folder = make_folder(tmp_path / "m", SINGLE)
    _rewrite_single(folder, lambda sd: sd.update({"model.layers.7.self_attn.q_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(UnexpectedWeightError, match="model.layers.7"):
        load_llama(folder)
    _rewrite_single(folder, lambda sd: sd.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(MissingWeightError, match="model.layers.1.post_attention_layernorm.weight"):
        load_llama(folder)


def test_other_quantized_formats_are_refused(tmp_path):
    folder = make_folder(tmp_path / "m", SINGLE)
    key = "model.layers.0.mlp.up_proj.weight"
    _rewrite_single(folder, lambda sd: sd.update({key: sd[key].to(torch.int8)}))  # an int8 weight, no bnb state
    with pytest.raises(UnsupportedCheckpointError, match=key):
        load_llama(folder, quantize=None)
    cfg = json.loads((folder / "config.json").read_text())
    for qc, what in [({"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}, "8-bit"),
                     ({"quant_method": "gptq", "bits": 4}, "gptq")]:
        (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
        with pytest.raises(UnsupportedCheckpointError, match=what):
            load_llama(folder)


def test_bad_arguments(tmp_path):
    folder = make_folder(tmp_path / "m", SINGLE)
    with pytest.raises(ValueError, match="quantize"):
        load_llama(folder, quantize="int8")
    with pytest.raises(ValueError, match="dtype"):
        load_llama(folder, dtype=torch.int8)
    with pytest.raises(FileNotFoundError, match="no such folder"):  # a ModelFolderError, a LoadError too
        load_llama(str(tmp_path / "no_such_dir"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(LoadError, match="is a file, not a model folder"):
        load_llama(str(tmp_path / "f"))


# -- streaming -------------------------------------------------------------------------------------------
def test_streaming_keeps_one_dense_weight_alive(sharded, monkeypatch):
    """Each dense linear weight is freed before the next is quantized (peak = quantized model + one tensor)."""
    real = QuantLinear.from_linear
    seen, alive_at_call = [], []

    def spy(linear, *a, **kw):
        alive_at_call.append(sum(r() is not None for r in seen))
        seen.append(weakref.ref(linear.weight))
        return real(linear, *a, **kw)
    monkeypatch.setattr(QuantLinear, "from_linear", spy)
    model = load_llama(sharded, quantize="nf4", dtype=torch.float32)
    assert len(seen) == 7 * model.config.num_hidden_layers
    assert max(alive_at_call) == 0, alive_at_call
    assert all(not p.is_meta for p in model.parameters())


# -- bnb-4bit checkpoints --------------------------------------------------------------------------------
def _bnb_folder(dest, quant_type, double_quant, writer):
    """A bf16 checkpoint whose decoder linears are stored as transformers saves a bnb 4-bit model."""
    spec = CONFIGS[SHARDED]
    config = hf_config_dict(spec)
    cfg = LlamaConfig.from_hf_config(config)
    sd = {k: v.to(torch.bfloat16) for k, v in random_state_dict(cfg, seed=2).items()}
    dense_sd = dict(sd)
    for k in [k for k in sd if k.startswith("model.layers.") and k.endswith("_proj.weight")]:
        w = sd.pop(k)
        sd.update(writer(w, k[: -len("weight")], quant_type, double_quant))
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": None}
    config["torch_dtype"] = "bfloat16"
    write_folder(dest, config, sd, shards=2)  # keys are dealt round-robin: one weight's parts span both shards
    return dest, dense_sd


def _write_with_bitsandbytes(w, prefix, quant_type, double_quant):
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes writes the reference checkpoint")
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    out = {prefix + "weight": packed}
    out.update({f"{prefix}weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return out


def _write_with_ours(w, prefix, quant_type, double_quant):
    return QuantLinear.from_linear(_linear(w), quant_type, 64, double_quant).state_dict(prefix=prefix)


def _linear(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    lin.weight.data.copy_(w)
    return lin


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_bnb_checkpoint_written_by_bitsandbytes(tmp_path, quant_type, double_quant):
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes writes the reference checkpoint")
    folder, dense_sd = _bnb_folder(tmp_path / "bnb", quant_type, double_quant, _write_with_bitsandbytes)
    model = load_llama(folder, quantize=quant_type, dtype=torch.bfloat16)
    qs = _quant_linears(model)
    assert len(qs) == 7 * model.config.num_hidden_layers
    total = same = 0
    for name, m in qs.items():
        w = dense_sd[name + ".weight"]
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
        # our reading of bitsandbytes' bytes dequantizes exactly as bitsandbytes does. bnb 0.50.2's CPU
        # dequantize_4bit mis-assigns absmax blocks when in_features % blocksize != 0 (its own CPU quantizer and
        # the CUDA kernels block the flattened tensor), so the reference dequantizes the flat (1, n) view.
        flat = copy.copy(state)
        flat.shape = torch.Size([1, w.numel()])
        assert torch.equal(dequantize(m.weight), F.dequantize_4bit(packed, flat).reshape(w.shape)), name
        assert m.weight.quant_type == quant_type and m.weight.double_quant == double_quant
        # NF4: the bytes agree with quantizing the same bf16 weight ourselves. (FP4: bnb's CPU quantizer buckets
        # by table midpoints where CUDA, and we, use its literal thresholds: ~1% of codes differ, see
        # test_bnb_compat.py; the exact dequant check above is what loading must get right.)
        if quant_type != "nf4":
            continue
        ours = QuantLinear.from_linear(_linear(w), quant_type, 64, double_quant).weight
        total += ours.data.numel()
        same += int((ours.data == m.weight.data).sum())
    assert same == total and (total > 0) == (quant_type == "nf4")
    # the non-quantized tensors are the bf16 ones that were written
    assert torch.equal(model.model.embed_tokens.weight, dense_sd["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, dense_sd["lm_head.weight"])
    # quantize=None dequantizes the stored 4-bit weights into dense linears
    dense = load_llama(folder, quantize=None, dtype=torch.bfloat16)
    assert not _quant_linears(dense)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(dense(ids), model(ids))


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", True), ("nf4", False)])
def test_bnb_checkpoint_written_by_us_round_trips(tmp_path, quant_type, double_quant):
    folder, dense_sd = _bnb_folder(tmp_path / "bnb", quant_type, double_quant, _write_with_ours)
    model = load_llama(folder, quantize="nf4", dtype=torch.bfloat16)
    # a model quantized on load from the dense weights is the same model, byte for byte
    src = write_folder(tmp_path / "dense", hf_config_dict(CONFIGS[SHARDED]), dense_sd, shards=1)
    ref = load_llama(src, quantize=quant_type, double_quant=double_quant, dtype=torch.bfloat16)
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_ref[k]), k
    # our quantized model's own state dict is a loadable bnb-4bit checkpoint
    out = tmp_path / "resaved"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    again = load_llama(out, dtype=torch.bfloat16)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(again(ids), ref(ids))


def test_bnb_checkpoint_with_a_corrupt_quant_state(tmp_path):
    folder, _ = _bnb_folder(tmp_path / "bnb", "nf4", True, _write_with_ours)
    key = "model.layers.0.mlp.up_proj.weight.absmax"
    shard = next(p for p in folder.glob("*.safetensors") if key in load_file(str(p)))
    sd = load_file(str(shard))
    sd[key] = sd[key][:-1].clone()
    save_file(sd, str(shard))
    with pytest.raises(CorruptCheckpointError, match="model.layers.0.mlp.up_proj.weight"):
        load_llama(folder)


# -- hub repo ids ----------------------------------------------------------------------------------------
def test_hub_offline_error_names_repo_and_env(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = "from qlora_core import load_llama; load_llama('qlora-core-tests/no-such-model')"
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert "HubUnavailableError" in r.stderr
    assert "qlora-core-tests/no-such-model" in r.stderr and "HF_HUB_OFFLINE" in r.stderr


def test_hub_network_failure_and_success(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = make_folder(tmp_path / "snap", SINGLE)
    calls = []

    def fake_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        if repo_id == "org/offline":
            raise ConnectionError("no route to host")
        return str(folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(HubUnavailableError, match=r"org/offline.*HF_HUB_OFFLINE"):
        load_llama("org/offline")
    model = load_llama("org/model", quantize=None, dtype=torch.float32)
    assert model.name_or_path == str(folder)
    patterns = calls[-1][1]
    assert {"config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json"} <= set(patterns)


# -- a checkpoint saved by transformers + bitsandbytes itself --------------------------------------------
def test_checkpoint_saved_by_transformers_bitsandbytes(tmp_path):
    """transformers quantizes a dense folder with bitsandbytes (CPU) and save_pretrained()s it; we load that.

    Dims are multiples of 64 here: bitsandbytes' CPU 4-bit forward and dequant need in_features % blocksize == 0.
    """
    transformers = pytest.importorskip("transformers", reason="transformers writes the reference checkpoint")
    bnbF = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes quantizes for transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate for device_map")
    spec = dict(CONFIGS[SHARDED], arch=dict(CONFIGS[SHARDED]["arch"], hidden_size=64, intermediate_size=128))
    config = hf_config_dict(spec)
    sd = {k: v.to(torch.bfloat16) for k, v in random_state_dict(LlamaConfig.from_hf_config(config), 3).items()}
    dense_dir = write_folder(tmp_path / "dense", config, sd, shards=2)
    bc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=bc, dtype=torch.bfloat16,
                                                           device_map="cpu")
    hf.save_pretrained(tmp_path / "bnb")  # before any forward: bnb's CPU forward repacks weights in place
    hf_weights = {n: bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state)
                  for n, m in hf.named_modules() if n.endswith("_proj")}
    model = load_llama(tmp_path / "bnb", dtype=torch.bfloat16)
    qs = _quant_linears(model)
    assert qs.keys() == hf_weights.keys()
    for n, m in qs.items():  # the 4-bit weights we read are exactly the ones transformers computes with
        assert torch.equal(dequantize(m.weight), hf_weights[n]), n
    # and the 4-bit codes are ours; the 8-bit nested absmax codes may differ on bitsandbytes' CPU tie rule
    ref = load_llama(dense_dir, dtype=torch.bfloat16)
    for n, m in qs.items():
        assert torch.equal(m.weight.data, ref.get_submodule(n).weight.data), n
    # same logits as transformers, both within bf16 error of the float64 model of the dequantized weights
    dense64 = load_llama(dense_dir, quantize=None, dtype=torch.float32).double()
    for n, w in hf_weights.items():
        dense64.get_submodule(n).weight.data = w.double()
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ours, theirs, y64 = model(ids).double(), hf(ids).logits.double(), dense64(ids)
    err_ours = (ours - y64).abs().max().item()
    err_theirs = (theirs - y64).abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-2 and err_theirs <= 2 * err_ours + 1e-2, (err_ours, err_theirs)
