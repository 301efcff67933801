"""Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3 (text) checkpoints beside Llama: config fields, fp32 logits against
transformers, sliding-window attention past the window (one forward, KV-cache decoding, generation, LoRA grads,
training), NF4, LoRA grads and adapters both ways against PEFT, greedy generation, and the whole path
(train -> adapter PEFT loads -> merge transformers loads -> bnb-4bit quantize).

The folders are written by transformers itself (Mistral/Qwen2/Qwen3/Gemma3ForCausalLM built from a tiny random
config, then save_pretrained), with weights rescaled so logits are O(1), and a small tokenizer beside them for
training. Windows are 12 keys: shorter than the 17- and 21-token test inputs, the 17 tokens of generation and the
64 of training. Phi-3 (fused qkv_proj / gate_up_proj) runs one windowed folder and one like Phi-4-mini (LongRoPE
with original_max_position_embeddings 32, so the 100- and 130-token comparisons and the training run take the long
factors while the shorter ones take the short ones; partial rotary 0.75). Tolerances as tests/test_llama.py: our fp32 logits may be off the float64 reference (transformers, with
an adapter transformers + PEFT) by at most 2x the reference's own fp32 error plus the fp32 atol.
"""
import json
import math

import pytest
import torch

import qlora_core as qc
from qlora_core.generation import KVCache
from qlora_core import llama
from qlora_core.llama import LongRopeCacheError
from qlora_core.model_config import ConfigError, LlamaConfig, linear_names
from qlora_core.loading import load_llama
from qlora_core.ops.quant4 import dequantize
from tests._tiny import CHATML, make_tokenizer, swap_task, write_jsonl
from qlora_core.lora import apply_lora, lora_modules
from tests.helpers import DTYPE_ATOL, assert_bnb_checkpoint_matches, assert_close_verbose, run_interpreted

transformers = pytest.importorskip("transformers", reason="transformers is the reference model (test extra)")
peft = pytest.importorskip("peft", reason="test extra: peft")

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

ROPE = {"rope_type": "default", "rope_theta": 1000000.0}
W = 12  # sliding windows: shorter than every test sequence below
# name -> (model_type, transformers config fields)
FAMILIES = {
    "mistral-window-gqa-untied": ("mistral", dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=W, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_parameters=ROPE)),
    "mistral-nowindow-mha-tied": ("mistral", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        sliding_window=None, tie_word_embeddings=True, rope_parameters=ROPE)),
    "qwen2-gqa-tied": ("qwen2", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, use_sliding_window=False, rope_parameters=ROPE)),
    "qwen2-window-mqa-untied": ("qwen2", dict(
        hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=1,
        use_sliding_window=True, sliding_window=W, max_window_layers=1, tie_word_embeddings=False,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Qwen3: q_norm / k_norm per head, head_dim not hidden / heads (64 / 4 = 16 and 48 / 6 = 8)
    "qwen3-gqa-tied-headdim": ("qwen3", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24, tie_word_embeddings=True, use_sliding_window=False, rope_parameters=ROPE)),
    "qwen3-window-bias-mqa-untied": ("qwen3", dict(
        hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=1,
        head_dim=12, attention_bias=True, use_sliding_window=True, sliding_window=W, max_window_layers=1,
        tie_word_embeddings=False, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    # Phi-3: fused qkv_proj and gate_up_proj; Phi-3-mini's sliding_window (2047 there; W here) and GQA of the larger ones
    "phi3-window-gqa-tied": ("phi3", dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=W, tie_word_embeddings=True, pad_token_id=0, rope_parameters=ROPE)),
    # Phi-4-mini's shape of RoPE: LongRoPE over the first 0.75 of each head (12 of 16 dims: 6 factors each)
    "phi3-longrope-partial-untied": ("phi3", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        sliding_window=None, tie_word_embeddings=False, pad_token_id=0, original_max_position_embeddings=32,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                         "long_factor": [1.0, 1.8, 3.5, 6.0, 9.0, 13.0]})),
    # Gemma 3: sliding and full layers with their own RoPE (linear scaling on the full ones, as the 4B+ models),
    # attention scale query_pre_attn_scalar^-0.5 with the scalar != head_dim, (1 + w) norms, GeGLU
    "gemma3-sliding-full-gqa-tied": ("gemma3_text", dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=24, sliding_window=W, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}
GEMMA = ("gemma3_text",)  # (1 + w) RMSNorms: weights centred on 0


def build_folder(dest, name, seed=0, extra_text=(), family=None):
    """transformers' own model of FAMILIES[name] (or of `family`, a (model_type, fields) pair of the same form),
    rescaled random weights, saved with a tokenizer (trained on the swap task, role names and extra_text)."""
    model_type, spec = family or FAMILIES[name]
    tok = make_tokenizer([r["instruction"] + "\n" + r["response"] for r in swap_task(200, seed=99)]
                         + ["user assistant system\n"] * 5 + list(extra_text))
    eos = tok.token_to_id("<|im_end|>")
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=tok.get_vocab_size(), max_position_embeddings=256,
                                            bos_token_id=tok.token_to_id("<|im_start|>"), eos_token_id=eos, **spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(float(model_type not in GEMMA) + 0.2 * torch.randn(p.shape, generator=g))
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


def _hf_layer_windows(hf):
    """The window each of transformers' layers applies (None: full attention)."""
    cfg = hf.config
    if cfg.model_type in ("mistral", "phi3"):  # every layer: Phi3Attention reads config.sliding_window
        return [cfg.sliding_window] * cfg.num_hidden_layers
    return [layer.self_attn.sliding_window for layer in hf.model.layers]


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
    model = load_llama(folder, quantize=None)
    assert [layer.self_attn.window for layer in model.model.layers] == _hf_layer_windows(hf)
    layer = hf.model.layers[0]
    ours = model.model.layers[0]
    assert cfg.fused_qkv_gate_up == (cfg.model_type == "phi3")
    for name in linear_names(cfg):  # the checkpoint's own linears (Phi-3: qkv_proj, gate_up_proj fused)
        assert (ours.get_submodule(name).bias is None) == (layer.get_submodule(name).bias is None), name
    if cfg.model_type == "qwen2":
        assert layer.self_attn.q_proj.bias is not None and layer.self_attn.o_proj.bias is None
    assert cfg.qk_norm == (cfg.model_type in ("qwen3", "gemma3_text")) == hasattr(ours.self_attn, "q_norm")
    if cfg.qk_norm:  # per-head norms of head_dim, which is not hidden / heads here
        assert cfg.head_dim == hf.config.head_dim != cfg.hidden_size // cfg.num_attention_heads
        for n in ("q_norm", "k_norm"):
            assert ours.self_attn.get_submodule(n).weight.shape == layer.self_attn.get_submodule(n).weight.shape


def test_state_dict_keys_are_transformers_keys(folder):
    hf = _hf(folder)
    model = qc.Llama(load_llama(folder, quantize=None).config)
    model.load_state_dict({k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}, strict=True)


@pytest.mark.parametrize("length", ["short", "long"])
def test_dense_logits_match_transformers(folder, length):
    """short: 21 tokens (past a window of 12 already); long: 100, eight windows, where a band mask that slid
    wrongly by one key would show."""
    model = load_llama(folder, quantize=None, dtype=torch.float32)
    T = 21 if length == "short" else 100
    ids = _ids(model.config.vocab_size, T)
    with torch.no_grad():
        ours = model(ids)
        hf32, hf64 = _hf(folder)(ids).logits, _hf(folder, torch.float64)(ids).logits
    bound = 2 * (hf32.double() - hf64).abs().max().item() + DTYPE_ATOL[torch.float32]
    assert ours.abs().max() > 1.0  # logits of a few units, not ~0: the comparison means something
    assert_close_verbose(ours, hf64, atol=bound, rtol=0, name=f"logits {folder.name} T={T}")


def test_kv_cache_decoding_past_the_window_matches_transformers(folder):
    """A prompt of 10 tokens, then chunks of 5, 1 and 14 through a KVCache (30 positions, past the window of 12 on
    the sliding layers): each chunk's logits equal transformers' logits of the whole sequence at those positions
    (bound as above: the band falls on cached keys here, the queries being the chunk's)."""
    model = load_llama(folder, quantize=None, dtype=torch.float32).eval()
    ids = _ids(model.config.vocab_size, 30)
    with torch.no_grad():
        hf32, hf64 = _hf(folder)(ids).logits, _hf(folder, torch.float64)(ids).logits
        cache = KVCache(model.config, 2, 30)
        ours = torch.cat([model(ids[:, a:b], cache=cache) for a, b in ((0, 10), (10, 15), (15, 16), (16, 30))], 1)
    bound = 2 * (hf32.double() - hf64).abs().max().item() + DTYPE_ATOL[torch.float32]
    assert_close_verbose(ours, hf64, atol=bound, rtol=0, name=f"cached chunks {folder.name}")


def _run_path(model, ids, monkeypatch, flex: bool, grads: bool):
    """The logits (and with grads the LoRA grads of a loss) with sdpa's flex_window forced wherever it applies
    (asserting every sliding layer took it), or never taken (flex=False: the band-mask path, on CUDA too)."""
    params = [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]
    taken, real = [], llama._flex_window
    with monkeypatch.context() as mp:
        mp.setattr(llama, "_flex_ok", lambda q, k, mask, w: flex and w is not None and mask is None and k.shape[2] > w)
        mp.setattr(llama, "_flex_window", lambda *a: taken.append(1) or real(*a))
        with torch.set_grad_enabled(grads):
            y = model(ids)
            out = [y.detach()] + (list(torch.autograd.grad(y.float().square().mean(), params)) if grads else [])
    assert len(taken) == flex * sum(layer.self_attn.window is not None for layer in model.model.layers)
    return out


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_window_path_equals_the_band_mask_path(folder, monkeypatch):
    """The CUDA training path (sdpa's flex_window, forced here on the CPU, where flex has no backward) gives the
    band-mask path's logits on a 40-token sequence (both fp32: within 4x the fp32 atol), on every sliding layer;
    a family without a window never takes it (_run_path counts the layers that did)."""
    model = load_llama(folder, quantize=None, dtype=torch.float32).eval()
    ids = _ids(model.config.vocab_size, 40)
    flex, band = (_run_path(model, ids, monkeypatch, f, grads=False) for f in (True, False))
    assert_close_verbose(flex[0], band[0], atol=4 * DTYPE_ATOL[torch.float32], rtol=1e-5, name="flex vs band")


@pytest.mark.gpu
def test_flex_window_lora_grads_on_cuda_within_bf16_bound(tmp_path, monkeypatch):
    """On CUDA in bf16, compiled flex_window (what sdpa_branch picks for training past the window) gives logits
    and LoRA grads within 2x the band-mask path's own bf16 error against float64 plus the bf16 atol."""
    import copy
    folder = build_folder(tmp_path / "g3", "gemma3-sliding-full-gqa-tied")
    model = load_llama(folder, quantize=None, dtype=torch.bfloat16, device="cuda").eval()
    apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    _randomize([p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)], seed=4)
    model64 = copy.deepcopy(model).double()
    ids = _ids(model.config.vocab_size, 128).cuda()
    assert llama.sdpa_branch(torch.empty(1, 4, 128, 16, device="cuda"), torch.empty(1, 2, 128, 16, device="cuda"),
                             None, W) == "flex_window"
    exact = _run_path(model64, ids, monkeypatch, False, grads=True)
    flex, band = (_run_path(model, ids, monkeypatch, f, grads=True) for f in (True, False))
    for i, (f, b, e) in enumerate(zip(flex, band, exact, strict=True)):
        bound = 2 * (b.double() - e).abs().max().item() + DTYPE_ATOL[torch.bfloat16]
        assert_close_verbose(f, e, atol=bound, rtol=0, name="logits" if i == 0 else f"grad {i}")


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_quantized_model_equals_transformers_with_dequantized_weights(folder, quant_type, double_quant):
    """Reference: transformers' model (fp32 and float64) carrying our dequantized weights; norms (Qwen3's q/k norms
    included) and biases stay dense and equal to the checkpoint's."""
    model_q = load_llama(folder, quantize=quant_type, double_quant=double_quant, dtype=torch.float32)
    hf32, hf64 = _hf(folder), _hf(folder, torch.float64)
    n = 0
    for name, m in model_q.named_modules():
        if isinstance(m, qc.QuantLinear):
            with torch.no_grad():
                for hf in (hf32, hf64):
                    hf.get_submodule(name).weight.copy_(dequantize(m.weight))
                if m.bias is not None:  # Qwen2's q/k/v biases stay dense and equal
                    assert torch.equal(m.bias, hf32.get_submodule(name).bias)
            n += 1
    assert n == len(linear_names(model_q.config)) * model_q.config.num_hidden_layers
    for name, p in model_q.named_parameters():
        if name.endswith("norm.weight"):
            assert p.dtype == torch.float32 and torch.equal(p, hf32.get_parameter(name)), name
    ids = _ids(model_q.config.vocab_size, 21)
    with torch.no_grad():
        yq, y32, y64 = model_q(ids), hf32(ids).logits, hf64(ids).logits
    bound = 2 * (y32.double() - y64).abs().max().item() + DTYPE_ATOL[torch.float32]
    assert_close_verbose(yq, y64, atol=bound, rtol=0, name=f"{quant_type} vs transformers(dequantized)")


def test_greedy_generate_equals_transformers(folder):
    """7 prompt tokens + 10 new (past the windows of 12); then row 1 left-padded by 3, where transformers counts
    the window over cache positions, padding included, as our decoder's slots do."""
    model = load_llama(folder, quantize=None, dtype=torch.float32)
    ids = _ids(model.config.vocab_size, 7)
    with torch.no_grad():
        ref = _hf(folder).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=10), ref)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        ref = _hf(folder).generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=10, attention_mask=mask), ref)


def _randomize(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _peft_lora(pm) -> dict:
    """Module path (as in our model) -> PEFT LoraLayer."""
    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def test_lora_grads_match_peft(folder, tmp_path):
    """Our adapter (every projection, random A and B) saved, loaded by PEFT over transformers in fp32 and float64;
    the LoRA gradients of one cross-entropy loss agree within 2x PEFT's own fp32 error plus the fp32 atol."""
    ours = load_llama(folder, quantize=None, dtype=torch.float32).eval()
    apply_lora(ours, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    mods = lora_modules(ours)
    _randomize([p for m in mods.values() for p in (m.lora_A, m.lora_B)], seed=5)
    qc.save_adapter(ours, tmp_path)
    ids = _ids(ours.config.vocab_size, 17)

    def grads(logits, params):
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return torch.autograd.grad(loss, params)
    theirs = []
    for dtype in (torch.float32, torch.float64):
        pm = peft.PeftModel.from_pretrained(_hf(folder, dtype), str(tmp_path), is_trainable=True).eval()
        layers = _peft_lora(pm)
        assert set(layers) == set(mods) and len(mods) == len(linear_names(ours.config)) * ours.config.num_hidden_layers
        params = [w for n in mods for w in (layers[n].lora_A["default"].weight, layers[n].lora_B["default"].weight)]
        theirs.append(grads(pm(input_ids=ids).logits, params))
    mine = grads(ours(ids), [p for m in mods.values() for p in (m.lora_A, m.lora_B)])
    for i, (g, g32, g64) in enumerate(zip(mine, *theirs, strict=True)):
        assert g64.dtype == torch.float64
        bound = 2 * (g32.double() - g64).abs().max().item() + DTYPE_ATOL[torch.float32]
        assert_close_verbose(g, g64, atol=bound, rtol=0, name=f"{list(mods)[i // 2]} d{'AB'[i % 2]}")
    assert max(g.abs().max().item() for g in mine) > 1e-2  # gradients that mean something


def test_peft_written_adapter_loads_in_ours(folder, tmp_path):
    """PEFT's own adapter ("all-linear" over transformers' model) in our model: the same module names, and the
    logits of transformers + PEFT within 2x its fp32 error."""
    pm = peft.get_peft_model(_hf(folder), peft.LoraConfig(r=6, lora_alpha=16, target_modules="all-linear",
                                                          task_type="CAUSAL_LM"))
    _randomize([w for m in _peft_lora(pm).values() for w in (m.lora_A["default"].weight,
                                                              m.lora_B["default"].weight)], seed=6)
    pm.save_pretrained(str(tmp_path))
    pm64 = peft.PeftModel.from_pretrained(_hf(folder, torch.float64), str(tmp_path)).eval()
    ours = load_llama(folder, quantize=None, dtype=torch.float32).eval()
    qc.load_adapter(ours, tmp_path, check_base=False)
    assert set(lora_modules(ours)) == set(_peft_lora(pm))
    ids = _ids(ours.config.vocab_size, 21)
    with torch.no_grad():
        y, y32, y64 = ours(ids), pm.eval()(input_ids=ids).logits, pm64(input_ids=ids).logits
        base = _hf(folder)(ids).logits
    assert (y64 - base.double()).abs().max() > 0.1  # the adapter matters
    bound = 2 * (y32.double() - y64).abs().max().item() + DTYPE_ATOL[torch.float32]
    assert_close_verbose(y, y64, atol=bound, rtol=0, name="PEFT's adapter in ours vs transformers + PEFT")


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
    # onto the dense base, compared with the dense model + adapter (tests/test_cli.py checks the default, 4-bit base)
    assert cli.main(["merge", "--model", str(folder), "--adapter", str(adapter), "--output", str(tmp_path / "m"),
                     "--dtype", "float32", "--base", "dense"]) == 0
    hf = _hf(tmp_path / "m")
    assert type(hf).__name__ == type(_hf(folder)).__name__  # MistralForCausalLM / Qwen2ForCausalLM
    # reference: transformers + PEFT over the unmerged base in float64; bound: 2x its fp32 error + the fp32 atol
    # (a fixed rtol 1e-4 failed on one near-zero logit of 7436 for Phi-3: fp32 rounding, 2.5e-5 on logits of ~50)
    pm32 = peft.PeftModel.from_pretrained(_hf(folder), str(adapter)).eval()
    pm64 = peft.PeftModel.from_pretrained(_hf(folder, torch.float64), str(adapter)).eval()
    ids = _ids(hf.config.vocab_size, 13)
    with torch.no_grad():
        y, y32, y64 = hf(ids).logits, pm32(input_ids=ids).logits, pm64(input_ids=ids).logits
        base = _hf(folder)(ids).logits
    assert (y64 - base.double()).abs().max() > 0.1  # the merged adapter matters
    bound = 2 * (y32.double() - y64).abs().max().item() + DTYPE_ATOL[torch.float32]
    assert_close_verbose(y, y64, atol=bound, rtol=0, name="merged folder in transformers vs transformers + PEFT")


def test_quantize_loads_in_transformers_bitsandbytes(folder, tmp_path):
    """`qlora quantize` -> transformers loads every decoder linear (7 a layer, Phi-3 4) as a bitsandbytes Linear4bit holding
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
    names = linear_names(ours.config)  # 7, or Phi-3's 4 with qkv_proj and gate_up_proj
    for i, layer in enumerate(hf.model.layers):
        for n in names:
            assert isinstance(layer.get_submodule(n), bnb.nn.Linear4bit), f"model.layers.{i}.{n}"
    assert len(hf.model.layers) == ours.config.num_hidden_layers
    assert assert_bnb_checkpoint_matches(ours, hf, back) == len(names) * ours.config.num_hidden_layers


# -- configs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "qwen3_moe", "mixtral", "phi", "gpt_neox"])
def test_other_model_types_are_config_errors(model_type, tmp_path):
    d = {"model_type": model_type, "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ConfigError, match=f"model_type '{model_type}' is not supported.*'llama', 'mistral', 'phi3'"):
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
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_sliding_window_is_derived_as_transformers_does(fields, model_type):
    d = {"model_type": model_type, "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
         "num_hidden_layers": 3, "num_attention_heads": 2, **fields}
    cfg, hf = LlamaConfig.from_hf_config(d), transformers.AutoConfig.for_model(**d)
    assert cfg.sliding_window == _hf_window(hf)
    # which layers slide: transformers' Qwen2Attention.sliding_window per layer, as the config derives it
    assert [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types] == \
        [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]


@pytest.mark.parametrize("fields", [{}, dict(head_dim=6, attention_bias=True)], ids=["defaults", "set"])
def test_qwen3_config_fields_as_transformers_reads_them(fields):
    """head_dim absent means Qwen3Config's 128 (not hidden / heads); attention_bias covers q/k/v and o alike."""
    d = {"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, **fields}
    cfg, hf = LlamaConfig.from_hf_config(d), transformers.Qwen3Config(**d)
    assert (cfg.head_dim, cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias, cfg.qk_norm) == \
        (hf.head_dim, hf.attention_bias, hf.attention_bias, False, True)
    assert LlamaConfig.from_hf_config(cfg.to_hf_config()) == cfg
    d["model_type"] = "llama"  # the other families never take q/k norms
    assert not LlamaConfig.from_hf_config({**d, "qk_norm": True}).qk_norm


def test_to_hf_config_round_trips_through_transformers(folder):
    cfg = load_llama(folder, quantize=None).config
    d = cfg.to_hf_config()
    assert LlamaConfig.from_hf_config(d) == cfg
    hf_cfg = transformers.AutoConfig.for_model(**d)
    assert (hf_cfg.model_type, _hf_window(hf_cfg), hf_cfg.num_key_value_heads, hf_cfg.tie_word_embeddings) == \
        (cfg.model_type, cfg.sliding_window, cfg.num_key_value_heads, cfg.tie_word_embeddings)
    if cfg.sliding_window is not None and cfg.model_type not in ("mistral", "phi3"):  # these window every layer
        assert hf_cfg.layer_types == cfg.layer_types
    assert d["architectures"] == [type(_hf(folder)).__name__]


# -- Phi-3: LongRoPE, partial rotary, fused targets -----------------------------------------------------------------
LONGROPE = "phi3-longrope-partial-untied"


@pytest.fixture(scope="module")
def longrope_folder(tmp_path_factory):
    return build_folder(tmp_path_factory.mktemp("longrope"), LONGROPE)


@pytest.mark.parametrize("fields", [
    dict(rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [3.0, 4.0, 5.0, 6.0]},
         original_max_position_embeddings=64, max_position_embeddings=1024),  # Phi-3-mini-128k's (old) form
    dict(rope_parameters={"rope_type": "longrope", "rope_theta": 250000.0, "partial_rotary_factor": 0.5,
                          "short_factor": [1.0, 1.5], "long_factor": [3.0, 5.0], "attention_factor": 1.3}),
    dict(partial_rotary_factor=0.75, rope_theta=5e5, max_position_embeddings=64),
], ids=["old-form", "longrope-partial-attention-factor", "partial-top-level"])
def test_phi3_rope_fields_as_transformers_reads_them(fields):
    """Inverse frequencies (short and long) and the cos/sin scale equal transformers' own rope init for the same
    config.json (independent reference: ROPE_INIT_FUNCTIONS / Phi3RotaryEmbedding's default)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from qlora_core.model_config import rope_inv_freq
    d = {"model_type": "phi3", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, **fields}
    cfg, hf = LlamaConfig.from_hf_config(d), transformers.Phi3Config(**d)
    rp = hf.rope_parameters
    assert cfg.rms_norm_eps == hf.rms_norm_eps  # Phi3Config's default 1e-5, not Llama's 1e-6
    assert cfg.rotary_dim == int(8 * rp["partial_rotary_factor"]) and cfg.rope_theta == rp["rope_theta"]
    if rp["rope_type"] == "default":
        ref = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding.compute_default_rope_parameters(hf)[0]
        assert cfg.rope_scaling is None and torch.equal(rope_inv_freq(cfg), ref)
    else:
        short, scale = ROPE_INIT_FUNCTIONS["longrope"](hf, None)
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf, None, seq_len=rp["original_max_position_embeddings"] + 1)
        assert not torch.equal(short, long)
        assert torch.equal(rope_inv_freq(cfg), short) and torch.equal(rope_inv_freq(cfg, long=True), long)
        assert cfg.rope_scaling["attention_factor"] == scale and cfg.rope_scaling[
            "original_max_position_embeddings"] == rp["original_max_position_embeddings"]
    assert LlamaConfig.from_hf_config(cfg.to_hf_config()) == cfg
    if "rope_scaling" in d:  # the first Phi-3 long configs said "su" (transformers 4.4x read it; 5.17 fails to)
        assert LlamaConfig.from_hf_config({**d, "rope_scaling": {**d["rope_scaling"], "type": "su"}}) == cfg
    again = transformers.Phi3Config(**cfg.to_hf_config()).rope_parameters
    assert all(again.get(k) == v for k, v in rp.items() if k not in ("attention_factor", "type")), (again, rp)


@pytest.mark.parametrize("fields,match", [
    (dict(partial_rotary_factor=0.1), "rotary width int\\(8 \\* 0.1\\) = 0"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor must be in \\(0, 1\\]"),
    (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4}),
     "short_factor has 3 entries; rotary width 8 needs 4"),
    (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 4}), "missing field\\(s\\) \\['long_factor'\\]"),
])
def test_phi3_bad_rope_fields_are_config_errors(fields, match):
    d = {"model_type": "phi3", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, **fields}
    with pytest.raises(ConfigError, match=match):
        LlamaConfig.from_hf_config(d)


def test_longrope_switches_factors_past_the_original_length(longrope_folder):
    """At 32 tokens (= original_max_position_embeddings) the short factors, at 33 the long ones for every position:
    both match transformers (float64 reference, bound as above), and the 33-token run's first 32 logits differ
    from the 32-token run's (in a causal model only the switch can change them)."""
    model = load_llama(longrope_folder, quantize=None, dtype=torch.float32)
    assert model.config.rope_scaling["original_max_position_embeddings"] == 32
    ids = _ids(model.config.vocab_size, 33)
    outs = {}
    for T in (32, 33):
        with torch.no_grad():
            hf32, hf64 = _hf(longrope_folder)(ids[:, :T]).logits, _hf(longrope_folder, torch.float64)(ids[:, :T]).logits
            outs[T] = model(ids[:, :T])
        bound = 2 * (hf32.double() - hf64).abs().max().item() + DTYPE_ATOL[torch.float32]
        assert_close_verbose(outs[T], hf64, atol=bound, rtol=0, name=f"longrope T={T}")
    assert (outs[33][:, :32] - outs[32]).abs().max() > 0.1


@pytest.mark.parametrize("prompt,new", [(26, 12), (31, 3), (40, 6)], ids=["crossing", "crossing-at-last-step", "long"])
def test_longrope_greedy_generate_equals_transformers(longrope_folder, prompt, new):
    """Greedy decoding across original_max_position_embeddings (32) re-encodes the sequence with the long factors,
    so each token is transformers' argmax over the whole sequence so far; a prompt already past 32 decodes with the
    long factors throughout. Reference: transformers' generate without a cache (each step a full forward). Its
    cached generate is not the reference: transformers 5.17 drops the cache at the switch (Phi3ForCausalLM.
    prepare_inputs_for_generation) but its tokens then leave those of its own full forward (seen at 33 tokens)."""
    model = load_llama(longrope_folder, quantize=None, dtype=torch.float32)
    ids = _ids(model.config.vocab_size, prompt)
    with torch.no_grad():
        ref = _hf(longrope_folder).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                            do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=False)
    assert torch.equal(model.generate(ids, max_new_tokens=new), ref)


def test_longrope_generate_across_the_switch_keeps_eos_rows_done(longrope_folder):
    """With eos, decoding across the switch gives transformers' tokens (uncached, as above; its finished rows pad
    with pad_token_id, set to eos here, as ours keep emitting eos) and length: the eos is one row 0 emits before
    the switch (tokens 26..31 come from sequences < 32) and row 1 does not, so a row finished in the first part
    stays finished."""
    model = load_llama(longrope_folder, quantize=None, dtype=torch.float32)
    ids = _ids(model.config.vocab_size, 26)
    free = model.generate(ids, max_new_tokens=12)[:, 26:]
    eos = next(int(t) for t in free[0, :6] if t not in free[1, :7])
    with torch.no_grad():
        ref = _hf(longrope_folder).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                            do_sample=False, eos_token_id=eos, pad_token_id=eos, use_cache=False)
    out = model.generate(ids, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(out, ref), (out[:, 26:], ref[:, 26:])
    assert (out[0, 33:] == eos).all() and out.shape[1] > 33  # row 0 done before the switch, decoding went past it


def test_longrope_cache_crossing_is_refused(longrope_folder):
    """A KV cache or the static-cache loop (the CLI's, with streaming) never mixes short- and long-factor keys."""
    from qlora_core.generation import GenerationError, generate
    model = load_llama(longrope_folder, quantize=None, dtype=torch.float32)
    with pytest.raises(GenerationError, match="prompt 26 \\+ max_new_tokens 8 cross .* 32"):
        generate(model, _ids(model.config.vocab_size, 26), 8)
    assert generate(model, _ids(model.config.vocab_size, 26), 7).shape == (2, 33)  # the last token: from 32
    cache = KVCache(model.config, 1, 64)
    with torch.no_grad():
        model(_ids(model.config.vocab_size, 30, B=1), cache=cache)
        model(_ids(model.config.vocab_size, 2, B=1), cache=cache)  # 32: still the short factors
        with pytest.raises(LongRopeCacheError, match="32 cached \\+ 1 new tokens cross original_max_position_embeddings 32"):
            model(_ids(model.config.vocab_size, 1, B=1), cache=cache)


def test_phi3_default_targets_are_the_fused_projections(folder):
    """The default targets adapt every projection (PEFT "all-linear"'s set); an explicit part of a fused one is a
    TargetModuleError pointing at it, as PEFT cannot adapt a third of qkv_proj either."""
    from qlora_core.lora import TargetModuleError
    model = load_llama(folder, quantize=None, dtype=torch.float32)
    apply_lora(model, qc.LoraConfig(r=2))
    names = {n.split(".")[-1] for n in lora_modules(model)}
    pm = peft.get_peft_model(_hf(folder), peft.LoraConfig(r=2, target_modules="all-linear"))
    assert names == {n.split(".")[-1] for n in _peft_lora(pm)}
    if model.config.model_type != "phi3":
        return
    assert names == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    with pytest.raises(TargetModuleError, match="'v_proj' \\(did you mean 'qkv_proj'\\?\\)"):
        apply_lora(load_llama(folder, quantize=None), target_modules=["v_proj", "o_proj"])


def test_phi3_cli_targets_preflight(tmp_path):
    """`qlora train --target-modules` before any weight loads (preflight, on the meta-device model): the fused names
    pass, the default passes (it names them), a Llama part of a fused linear is refused with the fused name."""
    from qlora_core.lora import TargetModuleError
    from qlora_core.train_config import TrainConfig, preflight
    folder = build_folder(tmp_path / "p", "phi3-window-gqa-tied")
    data = write_jsonl(tmp_path / "d.jsonl", swap_task(20))

    def check(targets, out):
        lora = qc.LoraConfig() if targets is None else qc.LoraConfig(target_modules=targets)
        preflight(TrainConfig(model=str(folder), data=str(data), output=str(tmp_path / out), lora=lora))
    check(None, "a")
    check(("qkv_proj", "gate_up_proj"), "b")
    with pytest.raises(TargetModuleError, match="'gate_proj' \\(did you mean 'gate_up_proj'\\?\\)"):
        check(("qkv_proj", "gate_proj"), "c")


GEMMA3 = {"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 7, "num_attention_heads": 2}


@pytest.mark.parametrize("fields", [
    {},  # Gemma3TextConfig's defaults: head_dim 256, window 4096 on 5 layers of 6, RoPE bases 1e6 / 1e4, tied
    dict(head_dim=6, query_pre_attn_scalar=144, sliding_window=32, sliding_window_pattern=2, attention_bias=True,
         tie_word_embeddings=False, rope_theta=5e5, rope_local_base_freq=2e4,
         rope_scaling={"rope_type": "linear", "factor": 8.0}),  # the transformers 4 names (hub Gemma 3 configs)
], ids=["defaults", "v4-names"])
def test_gemma3_config_fields_as_transformers_reads_them(fields):
    d = {**GEMMA3, **fields}
    cfg, hf = LlamaConfig.from_hf_config(d), transformers.Gemma3TextConfig(**d)
    assert (cfg.head_dim, cfg.query_pre_attn_scalar, cfg.sliding_window, cfg.layer_types, cfg.tie_word_embeddings,
            cfg.attention_bias, cfg.o_proj_bias) == (hf.head_dim, hf.query_pre_attn_scalar, hf.sliding_window,
                                                     hf.layer_types, hf.tie_word_embeddings, hf.attention_bias,
                                                     hf.attention_bias)
    assert (cfg.rope_theta, cfg.rope_local_theta) == (hf.rope_parameters["full_attention"]["rope_theta"],
                                                      hf.rope_parameters["sliding_attention"]["rope_theta"])
    assert (cfg.rope_scaling or {}).get("factor", 1.0) == hf.rope_parameters["full_attention"].get("factor", 1.0)
    assert cfg.hidden_act == hf.hidden_activation and cfg.norm_unit_offset and cfg.embed_scale and cfg.qk_norm
    assert LlamaConfig.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("fields,match", [
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(hidden_activation="gelu"), "hidden_activation 'gelu'"),
])
def test_gemma3_fields_we_do_not_run_are_config_errors(fields, match):
    with pytest.raises(ConfigError, match=match):
        LlamaConfig.from_hf_config({**GEMMA3, **fields})


# -- the Triton path of Qwen3's q/k norms (CPU interpreter) ------------------------------------------------------
_INTERP_QK_NORM = """
import os, torch
import qlora_core as qc
from qlora_core import backend
from qlora_core.model_config import LlamaConfig
assert backend.interpreting()
torch.manual_seed(0)
shape = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, attention_bias=True, model_type=MODEL_TYPE)
if MODEL_TYPE == "gemma3_text":  # (1 + w) norms, GeGLU, a window of 4 on layer 0 (9 tokens below)
    cfg = LlamaConfig.from_hf_config(dict(shape, sliding_window=4, layer_types=["sliding_attention", "full_attention"]))
else:
    cfg = LlamaConfig(**shape)
assert cfg.qk_norm
model = qc.Llama(cfg)
with torch.no_grad():
    for n, p in model.named_parameters():
        one = float(not cfg.norm_unit_offset)
        p.copy_(one + 0.3 * torch.randn(p.shape) if n.endswith("norm.weight") else torch.randn(p.shape) * 0.3)
ids = torch.randint(0, 40, (2, 9))
def run(which):
    os.environ["QLORA_CORE_BACKEND"] = which
    model.zero_grad()
    y = model(ids)
    y.square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
y_t, g_t = run("triton")
y_r, g_r = run("reference")
torch.testing.assert_close(y_t, y_r, rtol=1e-5, atol=1e-5)
for n in g_r:
    torch.testing.assert_close(g_t[n], g_r[n], rtol=1e-4, atol=1e-5, msg=lambda m: n + ": " + m)
assert g_r["model.layers.0.self_attn.k_norm.weight"].abs().max() > 1e-3
print("qk norm triton == reference")
"""


@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text"])
def test_qk_norm_triton_path_equals_reference_under_interpreter(model_type):
    """The fast path (Triton rms_norm on the strided head views of the packed qkv buffer, then the in-place RoPE
    kernel; for Gemma 3 also the (1 + w) norms and the GeGLU kernel) gives the reference path's logits and
    gradients, q_norm/k_norm weight gradients included."""
    run_interpreted(f"MODEL_TYPE = {model_type!r}\n" + _INTERP_QK_NORM)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3-window-bias-mqa-untied", "phi3-window-gqa-tied", LONGROPE])
def test_lora_grads_on_cuda_fast_path_within_bf16_bound(tmp_path, name):
    """On CUDA in bf16 the fast path (Triton q/k norms on the packed qkv heads, fused RoPE, grouped projections;
    Phi-3: one fused qkv_proj / gate_up_proj each, LongRoPE's long factors at 48 tokens, partial rotary on the
    reference math) gives logits and LoRA grads within 2x the bf16 reference path's own error against float64
    plus the bf16 atol."""
    import copy
    from qlora_core import backend
    folder = build_folder(tmp_path / "f", name)
    model = load_llama(folder, quantize=None, dtype=torch.bfloat16, device="cuda").eval()
    apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    _randomize([p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)], seed=4)
    model64 = copy.deepcopy(model).double()
    ids = _ids(model.config.vocab_size, 48).cuda()

    def run(m):
        params = [p for x in lora_modules(m).values() for p in (x.lora_A, x.lora_B)]
        y = m(ids)
        loss = torch.nn.functional.cross_entropy(y[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        return [y.detach()] + [g.detach() for g in torch.autograd.grad(loss, params)]
    with backend.forced("triton"):
        fast = run(model)
    with backend.forced("reference"):
        ref = run(model)
    exact = run(model64)
    for i, (f, r, e) in enumerate(zip(fast, ref, exact, strict=True)):
        bound = 2 * (r.double() - e).abs().max().item() + DTYPE_ATOL[torch.bfloat16]
        assert_close_verbose(f, e, atol=bound, rtol=0, name="logits" if i == 0 else f"grad {i}")


# -- Gemma 3's chat template through `qlora generate` --------------------------------------------------------------
# google/gemma-3-1b-it's template (text part): the system message folded into the first user turn, "model" turns
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + "
    "'\\n\\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}")


def test_gemma3_chat_template_through_the_generate_cli(tmp_path, capsys):
    """A Gemma 3 folder whose tokenizer_config holds Gemma 3's chat template: our tokenizer renders and encodes the
    prompt as transformers' apply_chat_template does, and `qlora generate` (dense, CPU, greedy) prints what
    transformers' greedy generation from that prompt decodes to (this random model favours newlines: the text
    check is weak, the prompt check is the point)."""
    from qlora_core import cli
    from qlora_core.data import TextTokenizer
    folder = build_folder(tmp_path / "g3", "gemma3-sliding-full-gqa-tied",
                          extra_text=["<start_of_turn>model\nSwap the words.<end_of_turn>\n"] * 5)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    # tokenizer_class: else AutoTokenizer picks Gemma's tokenizer for this model_type, which wants its own vocab
    tc.update(chat_template=GEMMA3_TEMPLATE, bos_token="<|im_start|>", tokenizer_class="PreTrainedTokenizerFast")
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    msgs = [{"role": "system", "content": "Swap the words."}, {"role": "user", "content": "user assistant"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|><start_of_turn>user\nSwap the words.\n\nuser assistant<end_of_turn>\n")
    assert TextTokenizer.from_folder(folder).render(msgs, add_generation_prompt=True) == text
    ids = torch.tensor([hf_tok(text, add_special_tokens=False).input_ids])
    assert TextTokenizer.from_folder(folder).prompt_ids(msgs) == ids[0].tolist()
    with torch.no_grad():
        out = _hf(folder).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                   eos_token_id=hf_tok.eos_token_id, pad_token_id=0)
    want = hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert cli.main(["generate", "--model", str(folder), "--prompt", msgs[1]["content"], "--system",
                     msgs[0]["content"], "--quant", "none", "--max-new-tokens", "12", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed == want + "\n", (printed, want)  # the reply, then the CLI's newline
