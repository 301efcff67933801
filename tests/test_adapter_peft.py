"""save_adapter / load_adapter: exact round trips, PEFT interop both ways, named errors.

PEFT and transformers are the independent references: a tiny random LlamaForCausalLM (hidden 64, 2 layers,
4 query / 2 key-value heads) is saved as an HF folder; our apply_lora wraps one copy, PEFT wraps another, and
the logits (and LoRA gradients) must agree. Both sides run the same fp32 ops in the same order, so the
tolerance is DTYPE_ATOL[float32] (1e-5), far below the effect of the non-zero adapters checked alongside.
"""
import json
import os

import pytest
import torch
from torch import nn

import qlora_core as qc
from qlora_core.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, AdapterMismatchError
from qlora_core.ops.quant4 import dequantize_as
from qlora_core.lora import LLAMA_TARGETS, apply_lora, lora_modules, merge_lora
from qlora_core.qlinear import QuantLinear
from tests._tiny import write_tiny_hf_llama
from tests.helpers import DTYPE_ATOL, assert_close_verbose

transformers = pytest.importorskip("transformers", reason="test extra: transformers")
peft = pytest.importorskip("peft", reason="test extra: peft")

ATOL = DTYPE_ATOL[torch.float32]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_llama(tmp_path_factory.mktemp("tiny_llama"))


def _hf(hf_dir):
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _randomize(pairs, seed):
    """Fill every (A, B) with non-zero values drawn from a private generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in pairs:
            a.copy_(torch.randn(a.shape, generator=g) * 0.2)
            b.copy_(torch.randn(b.shape, generator=g) * 0.2)


def _ours_pairs(model):
    return [(m.lora_A, m.lora_B) for m in lora_modules(model).values()]


def _peft_pairs(pm):
    mods = [m for m in pm.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    return [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in mods]


TOKENS = torch.tensor([[1, 5, 9, 33, 2, 70, 11], [4, 4, 90, 17, 8, 3, 60]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("use_rslora", [False, True])
def test_our_adapter_loads_in_peft_same_logits_and_grads(hf_dir, tmp_path, use_rslora):
    ours = _hf(hf_dir)
    base_logits = _logits(ours)
    apply_lora(ours, r=4, alpha=12, dropout=0.1, target_modules=LLAMA_TARGETS, use_rslora=use_rslora)
    _randomize(_ours_pairs(ours), seed=1)
    qc.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"], cfg["bias"],
            cfg["task_type"], cfg["base_model_name_or_path"]) == ("LORA", 4, 12, 0.1, use_rslora, "none",
                                                                  "CAUSAL_LM", hf_dir)

    pm = peft.PeftModel.from_pretrained(_hf(hf_dir), str(tmp_path), is_trainable=True).eval()
    ours.eval()
    y_ours, y_peft = _logits(ours), _logits(pm)
    assert (y_ours - base_logits).abs().max() > 0.1  # the adapter matters
    assert_close_verbose(y_ours, y_peft, atol=ATOL, rtol=0, name="logits ours vs PEFT")
    # same training signal: gradients of every A and B
    for model in (ours, pm):
        out = model(input_ids=TOKENS, labels=TOKENS)
        out.loss.backward()
    for (a1, b1), (a2, b2) in zip(_ours_pairs(ours), _peft_pairs(pm), strict=True):
        assert_close_verbose(a1.grad, a2.grad, atol=ATOL, rtol=1e-4, name="dA")
        assert_close_verbose(b1.grad, b2.grad, atol=ATOL, rtol=1e-4, name="dB")


@pytest.mark.parametrize("use_rslora,targets", [(False, ["q_proj", "v_proj", "down_proj"]), (True, "all-linear")])
def test_peft_written_adapter_loads_in_ours(hf_dir, tmp_path, use_rslora, targets):
    pm = peft.get_peft_model(_hf(hf_dir), peft.LoraConfig(r=6, lora_alpha=16, lora_dropout=0.05,
                                                          target_modules=targets, use_rslora=use_rslora,
                                                          task_type="CAUSAL_LM"))
    _randomize(_peft_pairs(pm), seed=2)
    pm.save_pretrained(str(tmp_path))
    pm.eval()

    ours = _hf(hf_dir)
    qc.load_adapter(ours, tmp_path)
    ours.eval()
    mods = lora_modules(ours)
    assert len(mods) == 2 * (3 if isinstance(targets, list) else 7)  # all-linear: all 7 projections, no lm_head
    assert all(m.r == 6 and m.dropout == 0.05 for m in mods.values())
    peft_paths = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(mods) == peft_paths
    # our own "all-linear" expansion picks the same modules PEFT's does
    mine = _hf(hf_dir)
    apply_lora(mine, r=2, target_modules=targets)
    assert set(lora_modules(mine)) == peft_paths
    peft_scaling = {m.scaling["default"] for m in pm.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {m.scaling for m in mods.values()} == peft_scaling
    assert_close_verbose(_logits(ours), _logits(pm), atol=ATOL, rtol=0, name="logits ours vs PEFT")
    # and back out: our save of the loaded adapter holds the same tensors PEFT wrote
    from safetensors.torch import load_file
    qc.save_adapter(ours, tmp_path / "again")
    a, b = load_file(str(tmp_path / WEIGHTS_NAME)), load_file(str(tmp_path / "again" / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nf4_base_adapter_matches_peft_over_dequantized_model(hf_dir, tmp_path):
    """A QLoRA-style model (every projection a QuantLinear) saves an adapter that PEFT applies to the
    transformers model carrying the same dequantized weights; logits agree (fp32 reference path)."""
    ours = _hf(hf_dir)
    twin = _hf(hf_dir)
    for name, m in list(ours.named_modules()):
        if name.rsplit(".", 1)[-1] in LLAMA_TARGETS:
            ql = QuantLinear.from_linear(m)
            ours.set_submodule(name, ql)
            with torch.no_grad():
                twin.get_submodule(name).weight.copy_(dequantize_as(ql.weight, torch.float32))
    counts = apply_lora(ours, r=8, alpha=16)
    assert counts.trainable == sum(p.numel() for p in ours.parameters() if p.requires_grad)
    _randomize(_ours_pairs(ours), seed=3)
    qc.save_adapter(ours, tmp_path)
    pm = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    ours.eval()
    assert_close_verbose(_logits(ours), _logits(pm), atol=ATOL, rtol=0, name="nf4 ours vs PEFT(dequantized)")


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_our_llama_adapters_interchange_with_peft_over_transformers(hf_dir, tmp_path, quantize):
    """The issue's contract on our own Llama (qlora_core.load_llama of the same HF folder, dense or NF4):
    our adapter under PEFT over the transformers model, and PEFT's adapter loaded into our Llama, give the
    same logits. With NF4 the transformers twin carries the dequantized weights. Tolerance: 2x the
    disagreement of the two base models (our Llama vs transformers, no adapter) plus the fp32 atol."""
    ours = qc.load_llama(hf_dir, quantize=quantize, dtype=torch.float32).eval()
    hf = _hf(hf_dir)
    for name, m in ours.named_modules():
        if isinstance(m, QuantLinear):
            with torch.no_grad():
                hf.get_submodule(name).weight.copy_(dequantize_as(m.weight, torch.float32))
    assert (quantize is None) == (not any(isinstance(m, QuantLinear) for m in ours.modules()))
    with torch.no_grad():
        tol = 2 * (ours(TOKENS) - hf(input_ids=TOKENS).logits).abs().max().item() + ATOL
        base_logits = ours(TOKENS)
    apply_lora(ours, r=4, alpha=8, target_modules="all-linear")
    assert len(lora_modules(ours)) == 2 * 7 and "lm_head" not in lora_modules(ours)
    _randomize(_ours_pairs(ours), seed=7)
    qc.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["base_model_name_or_path"] == hf_dir
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        y_ours = ours(TOKENS)
    assert (y_ours - base_logits).abs().max() > 0.1
    assert_close_verbose(y_ours, _logits(pm), atol=tol, rtol=0, name="our Llama+LoRA vs transformers+PEFT")
    # the other way: PEFT writes, our Llama loads (base name check passes: same folder)
    _randomize(_peft_pairs(pm), seed=8)
    pm.save_pretrained(str(tmp_path / "peft"))
    fresh = qc.load_llama(hf_dir, quantize=quantize, dtype=torch.float32).eval()
    qc.load_adapter(fresh, tmp_path / "peft")
    with torch.no_grad():
        assert_close_verbose(fresh(TOKENS), _logits(pm), atol=tol, rtol=0, name="PEFT adapter in our Llama")


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_load_of_save_is_exact(tmp_path, lora_dtype):
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(20, 30), nn.GELU(), nn.Linear(30, 10))
        m[2] = QuantLinear.from_linear(m[2])
        return m

    src = make()
    apply_lora(src, r=3, alpha=5, target_modules=["0", "2"], dtype=lora_dtype)
    _randomize(_ours_pairs(src), seed=4)
    qc.save_adapter(src, tmp_path, base_model_name_or_path="tiny/mlp")
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    # into a bare model (adapters created from the file's config, fp32 as PEFT) ...
    fresh = make()
    qc.load_adapter(fresh, tmp_path)
    for (a1, b1), (a2, b2) in zip(_ours_pairs(src), _ours_pairs(fresh), strict=True):
        assert torch.equal(a1.float(), a2) and torch.equal(b1.float(), b2)  # bf16 -> fp32 is exact
    # ... and into one that already has adapters of the same dtype: bitwise equal
    same = make()
    apply_lora(same, r=3, alpha=1, target_modules=["0", "2"], dtype=lora_dtype)
    qc.load_adapter(same, tmp_path)
    for (a1, b1), (a2, b2) in zip(_ours_pairs(src), _ours_pairs(same), strict=True):
        assert a2.dtype == lora_dtype and torch.equal(a1, a2) and torch.equal(b1, b2)
    x = torch.randn(4, 20)
    assert torch.equal(src.eval()(x), same.eval()(x))  # alpha came from the file


def test_keys_with_peft_adapter_name_load(tmp_path):
    """Some PEFT versions / hand-made files keep the adapter name: `...lora_A.default.weight`."""
    from safetensors.torch import load_file, save_file
    src = nn.Sequential(nn.Linear(6, 5))
    apply_lora(src, r=2, target_modules=["0"])
    _randomize(_ours_pairs(src), seed=6)
    qc.save_adapter(src, tmp_path)
    sd = load_file(str(tmp_path / WEIGHTS_NAME))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in sd.items()}, str(tmp_path / WEIGHTS_NAME))
    dst = nn.Sequential(nn.Linear(6, 5))
    qc.load_adapter(dst, tmp_path)
    assert torch.equal(dst[0].lora_A, src[0].lora_A) and torch.equal(dst[0].lora_B, src[0].lora_B)


def test_failed_write_leaves_previous_files(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(6, 6))
    apply_lora(model, r=2, target_modules=["0"])
    qc.save_adapter(model, tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("qlora_core.adapter.save_file", broken)
    _randomize(_ours_pairs(model), seed=5)
    with pytest.raises(OSError, match="disk full"):
        qc.save_adapter(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]


def _saved(tmp_path, **lora_kw):
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    apply_lora(model, **({"r": 2, "target_modules": ["0", "2"]} | lora_kw))
    qc.save_adapter(model, tmp_path, base_model_name_or_path="org/base-a")
    return tmp_path


def _edit_config(d, **changes):
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg.update(changes)
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


def test_bad_adapters_raise_named_errors(tmp_path):
    plain = lambda: nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))  # noqa: E731
    d = _saved(tmp_path / "ok")
    with pytest.raises(AdapterFileError, match="missing"):
        qc.load_adapter(plain(), tmp_path / "nowhere")
    # shapes that do not fit: same module names, other widths
    other = nn.Sequential(nn.Linear(9, 12), nn.ReLU(), nn.Linear(12, 4))
    with pytest.raises(AdapterMismatchError, match="A \\(2, 8\\)"):
        qc.load_adapter(other, d)
    assert type(other[0]) is nn.Linear and other[0].weight.requires_grad  # left as it came in
    # rank that does not fit existing adapters
    m = plain()
    apply_lora(m, r=3, target_modules=["0", "2"])
    with pytest.raises(AdapterMismatchError, match="r=3"):
        qc.load_adapter(m, d)
    # module sets that differ
    m = plain()
    apply_lora(m, r=2, target_modules=["0"])
    with pytest.raises(AdapterMismatchError, match="differ"):
        qc.load_adapter(m, d)
    with pytest.raises(AdapterMismatchError, match="not in Sequential"):
        qc.load_adapter(nn.Sequential(nn.Linear(8, 12)), d)
    # merged adapters must be unmerged first
    m = plain()
    apply_lora(m, r=2, target_modules=["0", "2"])
    merge_lora(m)
    with pytest.raises(AdapterMismatchError, match="unmerge"):
        qc.load_adapter(m, d)
    # another base model, by name
    m = plain()
    m.name_or_path = "org/base-b"
    with pytest.raises(AdapterMismatchError, match="base-b"):
        qc.load_adapter(m, d)
    qc.load_adapter(m, d, check_base=False)
    # unsupported PEFT options and non-LoRA adapters
    for i, change in enumerate([{"use_dora": True}, {"bias": "all"}, {"rank_pattern": {"0": 4}}]):
        d2 = _saved(tmp_path / f"opt{i}")
        _edit_config(d2, **change)
        with pytest.raises(AdapterMismatchError, match=next(iter(change))):
            qc.load_adapter(plain(), d2)
    d3 = _saved(tmp_path / "ia3")
    _edit_config(d3, peft_type="IA3")
    with pytest.raises(AdapterFileError, match="IA3"):
        qc.load_adapter(plain(), d3)
    d4 = _saved(tmp_path / "r0")
    _edit_config(d4, r=0)
    with pytest.raises(AdapterFileError, match="r must"):
        qc.load_adapter(plain(), d4)
    # corrupt files
    d5 = _saved(tmp_path / "badjson")
    (d5 / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterFileError, match="JSON"):
        qc.load_adapter(plain(), d5)
    d6 = _saved(tmp_path / "badst")
    data = (d6 / WEIGHTS_NAME).read_bytes()
    (d6 / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="safetensors"):
        qc.load_adapter(plain(), d6)
    (d6 / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterFileError, match="missing"):
        qc.load_adapter(plain(), d6)
    with pytest.raises(qc.lora.TargetModuleError, match="no LoRA"):
        qc.save_adapter(plain(), tmp_path / "none")
