"""Mistral and Qwen2 checkpoints beside Llama: config fields, fp32 logits against transformers, the sliding-window
limit, NF4, and the whole path (train -> adapter PEFT loads -> merge transformers loads -> bnb-4bit quantize).

The folders are written by transformers itself (MistralForCausalLM / Qwen2ForCausalLM built from a tiny random
config, then save_pretrained), with weights rescaled so logits are O(1), and a small tokenizer beside them for
training. Tolerances as tests/test_llama.py: our fp32 logits may be off the float64 reference (transformers, with
an adapter transformers + PEFT) by at most 2x the reference's own fp32 error plus the fp32 atol.
"""
import json
import math

import pytest
import torch

import qlora_core as qc
from qlora_core.generation import KVCache
from qlora_core.llama import ConfigError, LlamaConfig, SlidingWindowError
from qlora_core.loading import load_llama
from qlora_core.ops.quant4 import dequantize
from tests._tiny import CHATML, make_tokenizer, swap_task, write_jsonl
from tests.helpers import DTYPE_ATOL, assert_bnb_checkpoint_matches, assert_close_verbose

transformers = pytest.importorskip("transformers", reason="transformers is the reference model (test extra)")
peft = pytest.importorskip("peft", reason="test extra: peft")

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

ROPE = {"rope_type": "default", "rope_theta": 1000000.0}
# name -> (model_type, transformers config fields). sliding windows of 64 = the training seq_len below.
FAMILIES = {
    "mistral-window-gqa-untied": ("mistral", dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=64, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_parameters=ROPE)),
    "mistral-nowindow-mha-tied": ("mistral", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        sliding_window=None, tie_word_embeddings=True, rope_parameters=ROPE)),
    "qwen2-gqa-tied": ("qwen2", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, use_sliding_window=False, rope_parameters=ROPE)),
    "qwen2-window-mqa-untied": ("qwen2", dict(
        hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=1,
        use_sliding_window=True, sliding_window=64, max_window_layers=1, tie_word_embeddings=False,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


def build_folder(dest, name, seed=0):
    """transformers' own model of FAMILIES[name], rescaled random weights, saved with a tokenizer."""
    model_type, spec = FAMILIES[name]
    tok = make_tokenizer([r["instruction"] + "\n" + r["response"] for r in swap_task(200, seed=99)]
                         + ["user assistant system\n"] * 5)
    eos = tok.token_to_id("<|im_end|>")
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=tok.get_vocab_size(), max_position_embeddings=256,
                                            bos_token_id=tok.token_to_id("<|im_start|>"), eos_token_id=eos, **spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in n:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    model.save_pretrained(dest)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                            "chat_template": CHATML}))
    return dest


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def folder(request, tmp_path_factory):
    return build_folder(tmp_path_factory.mktemp(request.param), request.param)


def _hf(folder, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def _hf_window(hf_cfg):
    """The window transformers applies to some layer, or None (Qwen2: only on "sliding_attention" layers)."""
    types = getattr(hf_cfg, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return hf_cfg.sliding_window


def _ids(vocab, T, B=2, seed=3):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_config_reads_the_family_fields(folder):
    cfg = load_llama(folder, quantize=None).config
    hf = _hf(folder)
    assert cfg.model_type == hf.config.model_type and cfg.sliding_window == _hf_window(hf.config)
    layer = hf.model.layers[0]
    ours = load_llama(folder, quantize=None).model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"):
        assert (ours.get_submodule(name).bias is None) == (layer.get_submodule(name).bias is None), name
    if cfg.model_type == "qwen2":
        assert layer.self_attn.q_proj.bias is not None and layer.self_attn.o_proj.bias is None


def test_state_dict_keys_are_transformers_keys(folder):
    hf = _hf(folder)
    model = qc.Llama(load_llama(folder, quantize=None).config)
    model.load_state_dict({k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}, strict=True)


@pytest.mark.parametrize("length", ["short", "window"])
def test_dense_logits_match_transformers(folder, length):
    model = load_llama(folder, quantize=None, dtype=torch.float32)
    w = model.config.sliding_window
    T = 21 if length == "short" else (w or 100)  # at exactly the window the mask is still the full causal one
    ids = _ids(model.config.vocab_size, T)
    with torch.no_grad():
        ours = model(ids)
        hf32, hf64 = _hf(folder)(ids).logits, _hf(folder, torch.float64)(ids).logits
    bound = 2 * (hf32.double() - hf64).abs().max().item() + DTYPE_ATOL[torch.float32]
    assert ours.abs().max() > 1.0  # logits of a few units, not ~0: the comparison means something
    assert_close_verbose(ours, hf64, atol=bound, rtol=0, name=f"logits {folder.name} T={T}")


def test_sequences_beyond_the_window_are_refused(folder):
    model = load_llama(folder, quantize=None, dtype=torch.float32)
    w = model.config.sliding_window
    vocab = model.config.vocab_size
    if w is None:  # no window: long sequences run (and match transformers, bound as above)
        ids = _ids(vocab, 130, B=1)
        with torch.no_grad():
            hf32, hf64 = _hf(folder)(ids).logits, _hf(folder, torch.float64)(ids).logits
            bound = 2 * (hf32.double() - hf64).abs().max().item() + DTYPE_ATOL[torch.float32]
            assert_close_verbose(model(ids), hf64, atol=bound, rtol=0, name="long sequence")
        return
    with pytest.raises(SlidingWindowError, match=f"65 positions exceed this {model.config.model_type} .*window {w}"):
        model(_ids(vocab, w + 1, B=1))
    cache = KVCache(model.config, 1, w + 8)
    with torch.no_grad():
        model(_ids(vocab, w - 2, B=1), cache=cache)
        with pytest.raises(SlidingWindowError, match="62 cached \\+ 3 new"):
            model(_ids(vocab, 3, B=1), cache=cache)
    with pytest.raises(SlidingWindowError, match="prompt \\+ max_new_tokens"):
        model.generate(_ids(vocab, 60, B=1), max_new_tokens=5)
    assert model.generate(_ids(vocab, 60, B=1), max_new_tokens=4).shape == (1, 64)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_quantized_model_equals_dense_from_dequantized(folder, quant_type, double_quant):
    model_q = load_llama(folder, quantize=quant_type, double_quant=double_quant, dtype=torch.float32)
    dense = load_llama(folder, quantize=None, dtype=torch.float32)
    n = 0
    for name, m in model_q.named_modules():
        if isinstance(m, qc.QuantLinear):
            with torch.no_grad():
                dense.get_submodule(name).weight.copy_(dequantize(m.weight))
                if m.bias is not None:  # Qwen2's q/k/v biases stay dense and equal
                    assert torch.equal(m.bias, dense.get_submodule(name).bias)
            n += 1
    assert n == 7 * model_q.config.num_hidden_layers
    ids = _ids(model_q.config.vocab_size, 21)
    with torch.no_grad():
        yq, yd, y64 = model_q(ids), dense(ids), dense.double()(ids)
    bound = 2 * (yd.double() - y64).abs().max().item() + DTYPE_ATOL[torch.float32]
    assert_close_verbose(yq, y64, atol=bound, rtol=0, name=f"{quant_type} vs dense(dequantized)")


# -- the whole path: train, adapter in PEFT, merge, quantize -------------------------------------------------------
@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data = write_jsonl(root / "data.jsonl", swap_task(160))
    r = qc.train(model=str(folder), data=str(data), output=str(root / "adapter"), max_steps=24, batch_size=4,
                 seq_len=64, lr=1e-2, lora=qc.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0), eval_every=0,
                 save_every=0, log_every=100, eval_fraction=0.1, seed=1)
    return r, root / "adapter"


def test_training_learns(trained):
    r, _ = trained
    first, last = sum(r.losses[:4]) / 4, sum(r.losses[-4:]) / 4
    assert r.stopped is None and r.steps == 24 and last < 0.8 * first, (first, last)


def test_adapter_loads_in_peft_with_the_same_logits(folder, trained):
    """Bound: 2x transformers + PEFT's own fp32 error against its float64 run, plus the fp32 atol."""
    _, adapter = trained
    ours = load_llama(folder, quantize=None, dtype=torch.float32).eval()
    ids = _ids(ours.config.vocab_size, 21)
    with torch.no_grad():
        base = ours(ids)
        qc.load_adapter(ours, adapter, check_base=False)
        pm32 = peft.PeftModel.from_pretrained(_hf(folder), str(adapter)).eval()
        pm64 = peft.PeftModel.from_pretrained(_hf(folder, torch.float64), str(adapter)).eval().double()
        y_ours, y32, y64 = ours(ids), pm32(input_ids=ids).logits, pm64(input_ids=ids).logits
    assert y64.dtype == torch.float64 and (y_ours - base).abs().max() > 0.1  # the trained adapter matters
    bound = 2 * (y32.double() - y64).abs().max().item() + DTYPE_ATOL[torch.float32]
    assert_close_verbose(y_ours, y64, atol=bound, rtol=0, name="ours + adapter vs transformers + PEFT (float64)")


def test_merge_loads_in_transformers(folder, trained, tmp_path):
    from qlora_core import cli
    _, adapter = trained
    assert cli.main(["merge", "--model", str(folder), "--adapter", str(adapter), "--output", str(tmp_path / "m"),
                     "--dtype", "float32"]) == 0
    hf = _hf(tmp_path / "m")
    assert type(hf).__name__ == type(_hf(folder)).__name__  # MistralForCausalLM / Qwen2ForCausalLM
    ours = load_llama(folder, quantize=None, dtype=torch.float32)
    qc.load_adapter(ours, adapter, check_base=False)
    ours.eval()
    ids = _ids(ours.config.vocab_size, 13)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-5)  # as tests/test_cli.py


def test_quantize_loads_in_transformers_bitsandbytes(folder, tmp_path):
    """`qlora quantize` -> transformers loads every decoder linear (7 a layer) as a bitsandbytes Linear4bit holding
    our quant state byte for byte, whose values are bitsandbytes' CUDA dequantization (float64, tests/helpers.py)
    and equal ours; load_llama reads the same state back. Most of these linears have rows (in_features) of 48, 72,
    80 or 96 elements, so 64-element blocks straddle rows, where bitsandbytes' CPU dequantize is known to differ
    from its CUDA kernel: it is not the reference here."""
    bnb = pytest.importorskip("bitsandbytes", reason="test extra: bitsandbytes (4-bit runs on CPU)")
    from qlora_core import cli
    assert cli.main(["quantize", "--model", str(folder), "--output", str(tmp_path / "q"), "--device", "cpu"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16).eval()
    ours = load_llama(folder, quantize="nf4", dtype=torch.bfloat16)
    back = load_llama(tmp_path / "q", dtype=torch.bfloat16)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    for i, layer in enumerate(hf.model.layers):
        for n in names:
            assert isinstance(layer.get_submodule(n), bnb.nn.Linear4bit), f"model.layers.{i}.{n}"
    assert len(hf.model.layers) == ours.config.num_hidden_layers
    assert assert_bnb_checkpoint_matches(ours, hf, back) == 7 * ours.config.num_hidden_layers


# -- configs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["gemma", "qwen3", "mixtral", "phi3", "gpt_neox"])
def test_other_model_types_are_config_errors(model_type, tmp_path):
    d = {"model_type": model_type, "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ConfigError, match=f"model_type '{model_type}' is not supported.*'llama', 'mistral', 'qwen2'"):
        LlamaConfig.from_hf_config(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="config.json: model_type"):
        load_llama(tmp_path)


@pytest.mark.parametrize("fields", [
    dict(use_sliding_window=True, sliding_window=32, max_window_layers=1),
    dict(use_sliding_window=True, sliding_window=32, max_window_layers=4),  # every layer below max_window_layers
    dict(use_sliding_window=False, sliding_window=32),
    dict(use_sliding_window=True, sliding_window=32, layer_types=["full_attention"] * 3),
    dict(use_sliding_window=True, sliding_window=32, layer_types=["full_attention", "sliding_attention"] * 1
         + ["full_attention"]),
], ids=["from-layer-1", "none-past-max", "off", "all-full", "one-sliding"])
def test_qwen2_sliding_window_is_derived_as_transformers_does(fields):
    d = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 3,
         "num_attention_heads": 2, **fields}
    assert LlamaConfig.from_hf_config(d).sliding_window == _hf_window(transformers.Qwen2Config(**d))


def test_to_hf_config_round_trips_through_transformers(folder):
    cfg = load_llama(folder, quantize=None).config
    d = cfg.to_hf_config()
    assert LlamaConfig.from_hf_config(d) == cfg
    hf_cfg = transformers.AutoConfig.for_model(**d)
    assert (hf_cfg.model_type, _hf_window(hf_cfg), hf_cfg.num_key_value_heads, hf_cfg.tie_word_embeddings) == \
        (cfg.model_type, cfg.sliding_window, cfg.num_key_value_heads, cfg.tie_word_embeddings)
    assert d["architectures"] == [type(_hf(folder)).__name__]
