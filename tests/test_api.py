"""The public API as a dependency user meets it (`import qlora_core as qc`): the exported names, quantize_model on
any nn.Module, LoraConfig in PEFT's spellings, merge_and_unload, save_merged / save_quantized, the defaults
stated once, the bitsandbytes optimizer aliases, and the fixed QuantizedTensor / quantize / PagedAdamW bugs.

References: bitsandbytes (the 4-bit bytes and the checkpoint it loads), PEFT (which modules a LoraConfig
targets, merge_and_unload's weights), transformers (loads what save_merged / save_quantized write),
torch.optim.AdamW (a tensor learning rate). Merged weights are compared at 1 fp32 ulp of the weight (the fp32 sum
W + s * B @ A may round differently when PEFT orders the product otherwise).
"""
import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import qlora_core as qc
from qlora_core import defaults
from qlora_core.lora import LoraConfigError, TargetModuleError, lora_modules
from qlora_core.defaults import FLOAT_DTYPES as SUPPORTED_DTYPES
from tests._tiny import write_tiny_hf_llama
from tests.helpers import DTYPE_ATOL, assert_bnb_checkpoint_matches, assert_close_verbose

transformers = pytest.importorskip("transformers", reason="test extra: transformers")
peft = pytest.importorskip("peft", reason="test extra: peft")

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 70, 11], [4, 4, 90, 17, 8, 3, 60]])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """transformers' tiny random Llama (untied, GQA), weights drawn so the logits are O(1)."""
    return Path(write_tiny_hf_llama(tmp_path_factory.mktemp("tiny_llama"), weight_std=0.1))


def _hf(d, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()


def _randomize_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.2)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


# -- exports and defaults --------------------------------------------------------------------------------------
def test_dir_lists_the_lazy_public_names_and_each_resolves():
    listed = set(dir(qc))
    for name in qc.__all__:
        assert name in listed, name
        assert getattr(qc, name) is not None
    assert {"QuantLinear", "Linear4bit", "LoraConfig", "unload_lora", "merge_and_unload", "quantize_model",
            "save_merged", "save_quantized", "PagedAdamW8bit", "PagedAdamW32bit"} <= set(qc.__all__)
    assert qc.Linear4bit is qc.QuantLinear


def test_train_is_the_loop_function():
    """`qc.train(cfg)` is train_loop.train (no module shares its name); calling it runs train(): without model and
    data that is train()'s own ValueError."""
    from qlora_core import train_config, train_loop
    assert qc.train is train_loop.train and qc.TrainConfig is train_config.TrainConfig
    with pytest.raises(ValueError, match="needs model and data"):
        qc.train(max_steps=1)


def test_defaults_are_stated_once():
    from qlora_core.cli import build_parser
    from qlora_core.loading import load_llama
    from qlora_core.train_config import TrainConfig
    t, lc = TrainConfig(), qc.LoraConfig()
    assert (lc.r, lc.lora_alpha, lc.lora_dropout) == (t.lora.r, t.lora.lora_alpha, t.lora.lora_dropout) == \
        (defaults.LORA_R, defaults.LORA_ALPHA, defaults.LORA_DROPOUT)
    assert t.lora.target_modules == lc.target_modules == defaults.LORA_TARGETS
    lin = inspect.signature(qc.LoRALinear).parameters
    assert (lin["r"].default, lin["alpha"].default, lin["dropout"].default) == (lc.r, lc.lora_alpha, lc.lora_dropout)
    opt = qc.PagedAdamW([nn.Parameter(torch.zeros(3))])
    assert (opt.optim_bits, opt.defaults["weight_decay"]) == (t.optim_bits, t.weight_decay) == \
        (defaults.OPTIM_BITS, defaults.WEIGHT_DECAY)
    ll = inspect.signature(load_llama).parameters
    assert (ll["quantize"].default, ll["double_quant"].default, ll["blocksize"].default) == \
        (t.quant, t.double_quant, defaults.BLOCKSIZE)
    from qlora_core.cli import config_from_args
    from_flags = config_from_args(build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", "o"]))
    assert from_flags.lora == t.lora and from_flags.optim_bits == t.optim_bits
    assert defaults.default_dtype("cpu") == torch.float32 and defaults.default_dtype("cuda:0") == torch.bfloat16


def test_load_llama_and_cli_pick_the_same_dtype_on_cpu(hf_dir):
    from qlora_core import cli
    from qlora_core.train_config import TrainConfig, resolve_device
    lib = qc.load_llama(hf_dir, quantize=None)
    via_cli = cli._load(str(hf_dir), "none", "auto", "cpu")
    _, train_dtype = resolve_device(TrainConfig(device="cpu"))
    assert lib.lm_head.weight.dtype == via_cli.lm_head.weight.dtype == train_dtype == torch.float32


# -- quantize_model --------------------------------------------------------------------------------------------
class _Net(nn.Module):
    """Nested linears, a bias-free one, an attention block, a tied output layer and a non-linear module."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.block = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64, bias=False))
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.proj = nn.Linear(64, 40)
        self.out = nn.Linear(64, 50, bias=False)
        self.out.weight = self.embed.weight  # tied

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.block(h)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(h), self.proj(h)


def test_quantize_model_converts_any_module():
    """The bytes are quantize()'s (checked against bitsandbytes in test_bnb_compat.py) with the given settings."""
    torch.manual_seed(0)
    net = _Net().eval()
    dense = {n: (m.weight.detach().clone(), m.bias) for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    ids = torch.randint(0, 50, (2, 5))
    assert qc.quantize_model(net, quant_type="fp4", blocksize=128, double_quant=False) is net
    kinds = {n: type(m).__name__ for n, m in net.named_modules() if n in dense}
    # every plain linear is 4-bit; the tied output layer and MultiheadAttention's directly-read out_proj stay dense
    assert kinds == {"block.0": "QuantLinear", "block.2": "QuantLinear", "proj": "QuantLinear",
                     "out": "Linear", "attn.out_proj": "NonDynamicallyQuantizableLinear"}
    assert net.out.weight is net.embed.weight
    for name in ("block.0", "block.2", "proj"):
        q, ref = net.get_submodule(name).weight, qc.quantize(dense[name][0], "fp4", 128, False)
        assert (q.quant_type, q.blocksize, q.double_quant, q.dtype) == ("fp4", 128, False, torch.float32)
        assert torch.equal(q.data, ref.data) and torch.equal(q.absmax, ref.absmax), name
        bias = net.get_submodule(name).bias
        assert (bias is None) == (dense[name][1] is None) and (bias is None or not bias.requires_grad)
    # the forward is the dense network's over the dequantized weights
    twin = _Net().eval()
    twin.load_state_dict({k: v for k, v in _dense_state(net).items()})
    with torch.no_grad():
        a, b = net(ids), twin(ids)
    for x, y in zip(a, b):
        assert_close_verbose(x, y, atol=DTYPE_ATOL[torch.float32], rtol=0, name="quantized vs dequantized twin")


class _MLP(nn.Module):
    """A plain MLP: no lm_head, no get_output_embeddings; `head` is its output layer by the last-linear rule."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("make", [_MLP, lambda: nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))])
def test_readme_snippet_on_a_plain_mlp(make):
    """quantize_model leaves the last linear dense and says so; apply_lora with the README's LoraConfig (default
    targets, Llama names) adapts every linear it quantized, as PEFT's all-linear, and the adapters train."""
    torch.manual_seed(0)
    model = make()
    head = "head" if isinstance(model, _MLP) else "2"
    quantized = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]
    assert qc.quantize_model(model) is model and model.dense_output_layer == head
    assert type(model.get_submodule(head)) is nn.Linear
    assert all(isinstance(model.get_submodule(n), qc.QuantLinear) for n in quantized)
    qc.apply_lora(model, qc.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05))
    assert sorted(lora_modules(model)) == sorted(quantized)
    x = torch.randn(3, 64)
    model(x).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert not model.get_submodule(head).weight.requires_grad
    assert qc.quantize_model(make(), quantize_output=True).dense_output_layer is None


def test_default_targets_stay_llama_names_on_a_llama_shaped_module():
    """Only a module with none of the Llama names gets all-linear; one with some keeps the named targets."""
    model = nn.Module()
    model.q_proj, model.v_proj, model.other = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
    with pytest.raises(TargetModuleError, match="k_proj"):  # the seven names must all match, as before
        qc.apply_lora(model, qc.LoraConfig(r=2))


def _dense_state(net):
    from qlora_core.export import merged_state_dict
    return merged_state_dict(net)


def test_quantize_model_skip_and_output_layer_on_a_transformers_model(hf_dir):
    hf = qc.quantize_model(_hf(hf_dir))
    quantized = {n for n, m in hf.named_modules() if isinstance(m, qc.QuantLinear)}
    assert len(quantized) == 2 * 7 and "lm_head" not in quantized  # the output layer stays dense
    ours = qc.load_llama(hf_dir, quantize="nf4", dtype=torch.float32)
    for n in quantized:  # the same bytes as load_llama's streaming quantizer
        a, b = hf.get_submodule(n).weight, ours.get_submodule(n).weight
        assert torch.equal(a.data, b.data) and torch.equal(a.absmax, b.absmax) and torch.equal(a.offset, b.offset)
    with torch.no_grad():  # bound: 2x the two dense models' own disagreement + the fp32 atol
        tol = 2 * (_hf(hf_dir)(input_ids=TOKENS).logits - qc.load_llama(hf_dir, quantize=None)(TOKENS)).abs().max()
        assert_close_verbose(hf(input_ids=TOKENS).logits, ours(TOKENS), atol=float(tol) + DTYPE_ATOL[torch.float32],
                             rtol=0, name="logits")
    part = qc.quantize_model(_hf(hf_dir), skip=["down_proj"])
    assert {n.rsplit(".", 1)[-1] for n, m in part.named_modules() if isinstance(m, qc.QuantLinear)} == \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}
    every = qc.quantize_model(_hf(hf_dir), quantize_output=True)
    assert isinstance(every.lm_head, qc.QuantLinear)
    regex = qc.quantize_model(_hf(hf_dir), skip=r".*\.mlp\..*")
    assert {n.rsplit(".", 1)[-1] for n, m in regex.named_modules() if isinstance(m, qc.QuantLinear)} == \
        {"q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(ValueError, match="'downproj'"):
        qc.quantize_model(_hf(hf_dir), skip=["down_proj", "downproj"])
    with pytest.raises(ValueError, match="match no module"):
        qc.quantize_model(_hf(hf_dir), skip=r"model\.layers\.7\..*")
    with pytest.raises(TypeError, match="from_linear"):
        qc.quantize_model(nn.Linear(4, 4))


def test_quantize_model_meta_weight_names_the_layer():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"0\.weight.*meta tensor"):
        qc.quantize_model(net)


# -- LoraConfig with PEFT's spellings, apply_lora's two forms ------------------------------------------------------
PEFT_KW = dict(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
               bias="none", task_type="CAUSAL_LM")


def test_lora_config_takes_peft_keywords_and_targets_what_peft_does(hf_dir):
    pm = peft.get_peft_model(_hf(hf_dir), peft.LoraConfig(**PEFT_KW))
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = _hf(hf_dir)
    cfg = qc.LoraConfig(**PEFT_KW)
    assert (cfg.alpha, cfg.dropout) == (12, 0.1)
    counts = qc.apply_lora(ours, cfg)
    mods = lora_modules(ours)
    assert set(mods) == set(peft_layers)
    assert {m.scaling for m in mods.values()} == {m.scaling["default"] for m in peft_layers.values()}
    assert {m.dropout for m in mods.values()} == {0.1}
    trainable, total = pm.get_nb_trainable_parameters()
    assert (counts.trainable, counts.total) == (trainable, total)
    # the keyword form (ours and PEFT's names) builds the same adapters
    for kw in (dict(r=4, alpha=12, dropout=0.1), dict(r=4, lora_alpha=12, lora_dropout=0.1)):
        m2 = _hf(hf_dir)
        qc.apply_lora(m2, target_modules=PEFT_KW["target_modules"], **kw)
        assert dataclasses.replace(m2.lora_config, task_type="CAUSAL_LM") == ours.lora_config
    # keywords override a config's fields
    m3 = _hf(hf_dir)
    qc.apply_lora(m3, cfg, r=2, dtype=torch.bfloat16)
    assert {(m.r, m.lora_A.dtype) for m in lora_modules(m3).values()} == {(2, torch.bfloat16)}


def test_lora_config_errors():
    with pytest.raises(LoraConfigError, match="bias"):
        qc.LoraConfig(bias="all")
    with pytest.raises(LoraConfigError, match="task_type"):
        qc.LoraConfig(task_type="SEQ_CLS")
    with pytest.raises(LoraConfigError, match="name the same setting"):
        qc.apply_lora(nn.Sequential(nn.Linear(4, 4)), alpha=8, lora_alpha=16, target_modules=["0"])
    with pytest.raises(TypeError, match="qlora_core LoraConfig"):
        qc.apply_lora(nn.Sequential(nn.Linear(4, 4)), peft.LoraConfig(r=2, target_modules=["0"]))


def test_a_target_name_that_matches_nothing_is_an_error_naming_it(hf_dir):
    model = _hf(hf_dir)
    with pytest.raises(TargetModuleError, match=r"'vproj' \(did you mean 'v_proj'\?\)"):
        qc.apply_lora(model, target_modules=["q_proj", "vproj"])
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())  # nothing changed
    with pytest.raises(TargetModuleError, match="matches no module"):
        qc.apply_lora(model, target_modules=r"model\.layers\.9\..*")


def test_cli_train_rejects_a_misspelled_target_module(tmp_path, capsys):
    from qlora_core import cli
    from tests._tiny import make_model_folder, swap_task, write_jsonl
    folder = make_model_folder(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", swap_task(20))
    rc = cli.main(["train", "--model", str(folder), "--data", str(data), "--output", str(tmp_path / "o"),
                   "--max-steps", "1", "--target-modules", "q_proj,vproj"])
    err = capsys.readouterr().err
    assert rc == TargetModuleError.exit_code == 2 and "'vproj' (did you mean 'v_proj'?)" in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_adapter_listing_extra_peft_targets_still_loads(hf_dir, tmp_path):
    """PEFT itself only needs one target entry to match; its saved list may name modules this model lacks."""
    pm = peft.get_peft_model(_hf(hf_dir), peft.LoraConfig(r=2, target_modules=["q_proj", "query_key_value"]))
    pm.save_pretrained(tmp_path)
    ours = qc.load_adapter(_hf(hf_dir), tmp_path)
    assert {n.rsplit(".", 1)[-1] for n in lora_modules(ours)} == {"q_proj"}


# -- merge_and_unload, save_merged, save_quantized ------------------------------------------------------------------
def _ulp_bound(w: torch.Tensor) -> float:
    return float(torch.finfo(torch.float32).eps * w.abs().max())


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_and_unload_matches_peft(hf_dir, quantize):
    from qlora_core.ops.quant4 import dequantize_as
    ours = qc.load_llama(hf_dir, quantize=quantize, dtype=torch.float32).eval()
    twin = _hf(hf_dir)
    for name, m in ours.named_modules():  # the transformers twin carries the same (dequantized) weights
        if isinstance(m, qc.QuantLinear):
            with torch.no_grad():
                twin.get_submodule(name).weight.copy_(dequantize_as(m.weight, torch.float32))
    qc.apply_lora(ours, qc.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    _randomize_lora(ours, seed=3)
    pm = peft.get_peft_model(twin, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(m.lora_A)
            layer.lora_B["default"].weight.copy_(m.lora_B)
    merged_peft = pm.merge_and_unload()
    assert qc.merge_and_unload(ours) is ours and not lora_modules(ours) and not hasattr(ours, "lora_config")
    for name in [n for n, m in merged_peft.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        mine, ref = ours.get_submodule(name), merged_peft.get_submodule(name)
        assert type(mine) is nn.Linear, name  # a 4-bit base comes back dense (requantize=False)
        assert_close_verbose(mine.weight, ref.weight, atol=_ulp_bound(ref.weight), rtol=0, name=name)


def test_merge_and_unload_requantize_keeps_the_format(hf_dir):
    ours = qc.load_llama(hf_dir, quantize="fp4", double_quant=False, blocksize=128, dtype=torch.float32)
    qc.apply_lora(ours, r=2, target_modules=["o_proj"])
    _randomize_lora(ours, seed=4)
    expected = {n: m.merged_weight() for n, m in lora_modules(ours).items()}
    qc.merge_and_unload(ours, requantize=True)
    for n, w in expected.items():
        q = ours.get_submodule(n).weight
        ref = qc.quantize(w, "fp4", 128, False)
        assert (q.quant_type, q.blocksize, q.double_quant) == ("fp4", 128, False)
        assert torch.equal(q.data, ref.data) and torch.equal(q.absmax, ref.absmax)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_save_merged_loads_in_transformers_and_leaves_the_model_alone(hf_dir, tmp_path, quantize):
    ours = qc.load_llama(hf_dir, quantize=quantize, dtype=torch.float32).eval()
    qc.apply_lora(ours, r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])
    _randomize_lora(ours, seed=5)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in ours.state_dict().items()}
    out = qc.save_merged(ours, tmp_path / "merged")
    after = ours.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float32" and "quantization_config" not in cfg
    hf = _hf(out)
    assert not any("lora" in k or "base_layer" in k for k in hf.state_dict())
    with torch.no_grad():
        a, b = hf(input_ids=TOKENS).logits, ours(TOKENS)
    # merged W + BA vs W x + B(A x): fp32 rounding of the sum only (the CLI's merge test uses the same bound)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    bf16 = qc.save_merged(ours, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert _hf(bf16, torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_save_merged_of_a_transformers_model_matches_peft(hf_dir, tmp_path):
    ours = _hf(hf_dir)
    qc.apply_lora(ours, r=2, alpha=4, target_modules=["k_proj", "up_proj"])
    _randomize_lora(ours, seed=6)
    qc.save_adapter(ours, tmp_path / "adapter")
    qc.save_merged(ours, tmp_path / "merged")
    merged_peft = peft.PeftModel.from_pretrained(_hf(hf_dir), str(tmp_path / "adapter")).merge_and_unload()
    loaded = _hf(tmp_path / "merged")
    ref = merged_peft.state_dict()
    for k, v in loaded.state_dict().items():
        assert_close_verbose(v, ref[k], atol=_ulp_bound(ref[k]), rtol=0, name=k)


@pytest.mark.parametrize("skip,quantize_output,n4", [((), False, 14), (["down_proj"], False, 12), ((), True, 15)])
def test_save_quantized_loads_in_transformers_bitsandbytes_and_back(hf_dir, tmp_path, skip, quantize_output, n4):
    pytest.importorskip("bitsandbytes", reason="test extra: bitsandbytes (4-bit runs on CPU)")
    model = qc.quantize_model(_hf(hf_dir, torch.bfloat16), skip=skip, quantize_output=quantize_output)
    out = qc.save_quantized(model, tmp_path / "q")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qcfg["bnb_4bit_quant_type"], qcfg["bnb_4bit_use_double_quant"], qcfg["bnb_4bit_compute_dtype"]) == \
        ("nf4", True, "bfloat16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    # load_llama reads the bnb-4bit checkpoint as it is (its lm_head must be dense: the loss reads its weight)
    back = None if quantize_output else qc.load_llama(out, dtype=torch.bfloat16)
    assert assert_bnb_checkpoint_matches(model, hf, back) == n4


def test_save_quantized_refuses_what_it_cannot_describe(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="no 4-bit layer"):
        qc.save_quantized(_hf(hf_dir), tmp_path / "a")
    m = qc.quantize_model(_hf(hf_dir))
    qc.apply_lora(m, r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="merge_and_unload"):
        qc.save_quantized(m, tmp_path / "b")
    mixed = qc.quantize_model(_hf(hf_dir), skip=["q_proj", "lm_head"])
    qc.quantize_model(mixed.model.layers[0], quant_type="fp4", skip=[])
    with pytest.raises(ValueError, match="mix formats"):
        qc.save_quantized(mixed, tmp_path / "c")


# -- the bugs --------------------------------------------------------------------------------------------------------
def test_quantized_tensor_to_dtype_changes_only_the_dequantized_dtype():
    w = torch.randn(48, 80)
    q = qc.quantize(w)
    h = q.to(torch.float16)
    # the packed codes and every absmax state are untouched: same bytes, same dtypes
    for f in ("data", "absmax", "nested_absmax", "offset"):
        assert getattr(h, f).dtype == getattr(q, f).dtype and torch.equal(getattr(h, f), getattr(q, f)), f
    assert h.dtype == torch.float16 and q.dtype == torch.float32
    # dequantize(h) is the fp32 product rounded once to fp16, i.e. the fp32 dequantization cast
    assert torch.equal(h.dequantize(), q.dequantize().to(torch.float16))
    for args, kw in (((), {"dtype": torch.bfloat16}), (("cpu", torch.bfloat16), {}),
                     ((torch.zeros(1, dtype=torch.bfloat16),), {})):
        b = q.to(*args, **kw)
        assert b.dtype == torch.bfloat16 and torch.equal(b.absmax, q.absmax) and b.device == q.device
    assert q.to("cpu").device.type == "cpu" and q.to("cpu").dtype == q.dtype
    for bad in (torch.uint8, torch.int8, torch.float64):
        with pytest.raises(TypeError, match="never cast"):
            q.to(bad)
    assert set(SUPPORTED_DTYPES) == {torch.float32, torch.float16, torch.bfloat16}


def test_quantize_detaches_a_tensor_that_requires_grad():
    w = nn.Parameter(torch.randn(32, 64))
    q = qc.quantize(w, double_quant=True)
    for f in ("data", "absmax", "nested_absmax", "offset"):
        t = getattr(q, f)
        assert not t.requires_grad and t.grad_fn is None, f
    assert torch.equal(q.data, qc.quantize(w.detach()).data)


def test_quantize_meta_tensor_is_a_clear_error():
    with pytest.raises(ValueError, match="meta tensor .*holds no values"):
        qc.quantize(torch.empty(64, 64, device="meta"))


def test_quantized_tensor_repr_is_short():
    q = qc.quantize(torch.randn(300, 200))
    r = repr(q)
    assert "tensor(" not in r and len(r) < 300, r
    assert r.startswith("QuantizedTensor(shape=(300, 200), dtype=torch.float32, quant_type='nf4', blocksize=64")
    assert "data=uint8(30000, 1)" in r and "absmax=uint8(938,)" in r and "offset=float32()" in r
    assert "nested_absmax=None" in repr(qc.quantize(torch.randn(64), double_quant=False))


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_adamw_takes_a_tensor_learning_rate(bits):
    def run(lr, cls=qc.PagedAdamW, **kw):
        p = nn.Parameter(torch.linspace(-1, 1, 5000))
        opt = cls([p], lr=lr, weight_decay=0.01, **kw)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        for t in range(3):
            p.grad = torch.sin(torch.arange(5000.0) * (t + 1)) * 0.01
            opt.step()
            sched.step()
        return p.detach()
    as_float = run(1e-3, optim_bits=bits)
    # float64 tensor: the scheduler's base_lr * factor then equals the Python-float path bit for bit
    assert torch.equal(run(torch.tensor(1e-3, dtype=torch.float64), optim_bits=bits), as_float)
    run(torch.tensor(1e-3), optim_bits=bits)  # an fp32 tensor is accepted too
    if bits == 32:  # and it is torch.optim.AdamW's update with that tensor lr (same schedule)
        ref = run(torch.tensor(1e-3, dtype=torch.float64), torch.optim.AdamW, foreach=False)
        assert_close_verbose(as_float, ref, atol=1e-7, rtol=1e-6, name="vs torch AdamW")
    for bad in (torch.tensor([1e-3, 1e-3]), torch.tensor(-1e-3), torch.tensor(1)):
        with pytest.raises(ValueError, match="learning rate"):
            qc.PagedAdamW([nn.Parameter(torch.zeros(2))], lr=bad)


def test_bitsandbytes_optimizer_aliases():
    p = [nn.Parameter(torch.zeros(5000))]
    assert qc.PagedAdamW8bit(p, 1e-3).optim_bits == 8 and qc.PagedAdamW32bit(p, lr=1e-3).optim_bits == 32
    assert isinstance(qc.PagedAdamW8bit(p), qc.PagedAdamW)
    with pytest.raises(ValueError, match="optim_bits=8"):
        qc.PagedAdamW8bit(p, optim_bits=32)
    with pytest.raises(ValueError, match="optim_bits=32"):
        qc.PagedAdamW32bit(p, optim_bits=8)


def test_lora_config_is_a_dataclass_with_peft_field_names():
    names = [f.name for f in dataclasses.fields(qc.LoraConfig)]
    assert names[:4] == ["r", "lora_alpha", "lora_dropout", "target_modules"]
