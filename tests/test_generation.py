"""generation.py on the CPU: the static-cache loop against the dynamic-cache reference loop (today's
`generate_reference`), left padding, LoRA, eos and streaming, the sampler against float64 probabilities, errors.

Tokens are compared exactly (rtol = atol = 0). The static loop attends over a fixed-length cache with masked
slots, so its float sums can differ from the reference in the last bit; on these tiny fp32 models no greedy
choice is that close (the assertions would show it as a token mismatch).
"""
import math
import types

import pytest
import torch

from qlora_core import generation as G
from qlora_core.generation import GenerationError, SamplingConfig, generate, generate_reference, sample
from qlora_core.loading import load_llama
from qlora_core.lora import apply_lora, lora_modules, merge_lora
from tests.helpers import assert_tokens_are_argmax
from tests.llama_folders import CONFIGS, make_folder

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def folder(request, tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp(request.param), request.param, seed=1)


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("gqa"), "llama3-gqa-headdim-untied-3shards-v5", seed=2)


def _ids(vocab, B=2, T=9, seed=3):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _model(folder, quantize=None, lora=None, dtype=torch.float32):
    """A loaded model; lora: None, "unmerged" or "merged" (r=4 on all projections, B random so it matters)."""
    model = load_llama(folder, quantize=quantize, dtype=dtype)
    if lora:
        apply_lora(model, r=4, alpha=8)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g))
        if lora == "merged":
            merge_lora(model)
    return model


def _left_pad(rows):
    T = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - r.shape[1]:] = r[0]
        mask[i, T - r.shape[1]:] = 1
    return ids, mask


# -- greedy tokens: static loop == dynamic reference loop ------------------------------------------------------------
@pytest.mark.parametrize("lora", [None, "unmerged", "merged"])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_static_loop_equals_reference_loop(folder, quantize, lora):
    model = _model(folder, quantize, lora)
    ids = _ids(model.config.vocab_size, B=3, T=9)
    out = generate(model, ids, 14)
    ref = generate_reference(model, ids, 14)
    assert out.shape == (3, 23) and out.dtype == torch.long
    assert torch.equal(out, ref)
    rows, lengths = [], [7, 3, 5]
    for n in lengths:
        rows.append(_ids(model.config.vocab_size, B=1, T=n, seed=20 + n))
    ids, mask = _left_pad(rows)
    assert torch.equal(generate(model, ids, 9, attention_mask=mask),
                       generate_reference(model, ids, 9, attention_mask=mask))


def test_more_than_16_rows_with_unmerged_lora(gqa_folder):
    """Above 16 rows lora.project groups the projections; the step runs them module by module (_unfused)."""
    model = _model(gqa_folder, "nf4", "unmerged")
    ids = _ids(model.config.vocab_size, B=18, T=5)
    assert torch.equal(generate(model, ids, 6), generate_reference(model, ids, 6))
    assert all("fuse_projections" not in layer.self_attn.__dict__ for layer in model.model.layers)


def test_llama_generate_delegates_to_the_static_loop(gqa_folder):
    model = _model(gqa_folder)
    ids = _ids(model.config.vocab_size)
    G.release(model)
    out = model.generate(ids, 6)
    assert model in G._DECODERS and torch.equal(out, generate_reference(model, ids, 6))


def test_bf16_model_picks_argmax_tokens(gqa_folder):
    """bf16: the two loops round attention differently (S vs past+T keys), and on this model one step's top two
    logits are one bf16 ulp apart, so exact equality would hinge on the CPU's kernels; the property that holds
    is helpers.assert_tokens_are_argmax (3% of the logit scale, as on the GPU)."""
    model = _model(gqa_folder, dtype=torch.bfloat16)
    ids = _ids(model.config.vocab_size)
    out = generate(model, ids, 8)
    assert out.shape == (2, 17) and torch.equal(out[:, :9], ids)
    assert_tokens_are_argmax(model, out, 9, 0.03, "bf16 static loop")


def test_left_padded_rows_decode_as_alone(folder):
    model = _model(folder, "nf4", "unmerged")
    rows = [_ids(model.config.vocab_size, B=1, T=n, seed=10 + n) for n in (9, 4, 6, 1)]
    ids, mask = _left_pad(rows)
    out = generate(model, ids, 10, attention_mask=mask)
    T = ids.shape[1]
    for i, r in enumerate(rows):
        alone = generate(model, r, 10)
        assert torch.equal(out[i, T:], alone[0, r.shape[1]:]), f"row {i}"
        assert torch.equal(out[i, :T], ids[i])


# -- stopping, lengths, streaming ------------------------------------------------------------------------------------
def test_eos_stops_and_pads_finished_rows(gqa_folder):
    model = _model(gqa_folder)
    ids = _ids(model.config.vocab_size, B=3, T=6)
    free = generate(model, ids, 12)
    eos = int(free[0, 8])  # row 0's third generated token becomes "eos"
    for sync in (1, 3, 16):
        out = generate(model, ids, 12, eos_token_id=[eos, 10_000 % model.config.vocab_size], sync_every=sync)
        assert torch.equal(out, generate_reference(model, ids, 12, eos_token_id=[eos, 10_000 % model.config.vocab_size]))
        assert torch.equal(out[0, :9], free[0, :9]) and (out[0, 9:] == eos).all()
    # every row emits eos at once: the result stops right there, whatever sync_every is
    same = torch.stack([free[0, :6]] * 2)
    eos_now = int(generate(model, same, 1)[0, 6])
    out = generate(model, same, 12, eos_token_id=eos_now, sync_every=5)
    assert out.shape == (2, 7) and (out[:, 6] == eos_now).all()


@pytest.mark.parametrize("n", [0, 1, 2, 17, 33])
def test_max_new_tokens_is_honoured(gqa_folder, n):
    model = _model(gqa_folder)
    ids = _ids(model.config.vocab_size, B=2, T=5)
    out = generate(model, ids, n, sync_every=16)
    assert out.shape == (2, 5 + n) and torch.equal(out[:, :5], ids)
    assert torch.equal(out, generate_reference(model, ids, n))


def test_stream_delivers_every_token_in_chunks(gqa_folder):
    model = _model(gqa_folder)
    ids = _ids(model.config.vocab_size, B=2, T=5)
    chunks = []
    out = generate(model, ids, 20, stream=chunks.append, sync_every=8)
    assert [c.shape[1] for c in chunks] == [1, 8, 8, 3]  # the first token right after the prefill
    assert all(c.device.type == "cpu" and c.dtype == torch.long for c in chunks)
    assert torch.equal(torch.cat(chunks, dim=1), out[:, 5:])
    eos = int(out[0, 9])
    chunks = []
    cut = generate(model, ids, 20, eos_token_id=eos, stream=chunks.append, sync_every=8)
    assert torch.equal(torch.cat(chunks, dim=1), cut[:, 5:])


def test_decoder_is_reused_and_rebuilt_when_weights_change(gqa_folder):
    model = _model(gqa_folder, "nf4", "unmerged")
    ids = _ids(model.config.vocab_size, B=2, T=5)
    G.release(model)
    a = generate(model, ids, 6)
    dec = G._DECODERS[model]
    assert torch.equal(generate(model, ids, 6), a) and G._DECODERS[model] is dec  # same shapes: reused
    generate(model, ids, 6, temperature=0.5)
    assert G._DECODERS[model] is not dec  # other sampling: rebuilt
    dec = G._DECODERS[model]
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.mul_(0.5)  # in place: same addresses, the decoder stays
    generate(model, ids, 6, temperature=0.5)
    assert G._DECODERS[model] is dec
    merge_lora(model)  # new base modules: rebuilt
    out = generate(model, ids, 6)
    assert G._DECODERS[model] is not dec and torch.equal(out, generate_reference(model, ids, 6))
    G.release(model)
    assert model not in G._DECODERS


def test_generate_restores_train_mode_and_ignores_lora_dropout(gqa_folder):
    model = _model(gqa_folder, None, "unmerged")
    for m in lora_modules(model).values():
        m.set_dropout(0.5)
    model.train()
    ids = _ids(model.config.vocab_size)
    out = generate(model, ids, 8)
    assert model.training
    assert torch.equal(out, generate_reference(model.eval(), ids, 8))


def test_sampling_is_reproducible_and_top_k_1_is_greedy(gqa_folder):
    model = _model(gqa_folder)
    ids = _ids(model.config.vocab_size, B=3, T=4)
    runs = [generate(model, ids, 12, temperature=1.3, top_p=0.95, generator=torch.Generator().manual_seed(5))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = generate(model, ids, 12, temperature=1.3, top_p=0.95, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(runs[0], other)
    greedy = generate(model, ids, 12)
    assert torch.equal(generate(model, ids, 12, temperature=2.0, top_k=1), greedy)
    assert torch.equal(generate(model, ids, 12, temperature=2.0, top_p=1e-6), greedy)


# -- the sampler against float64 -------------------------------------------------------------------------------------
LOGITS = torch.tensor([2.0, 1.2, 1.0, 0.3, -0.5, -2.0, 0.9])


def _expected(logits, temperature, top_k=0, top_p=1.0) -> torch.Tensor:
    """float64 probabilities of each token under temperature, then top-k, then top-p (independent of `sample`)."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    order = torch.argsort(p, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[:top_k or len(p)]] = True
    p = torch.where(keep, p, 0.0)
    p = p / p.sum()
    mass = 0.0
    for i in order.tolist():  # the nucleus: best tokens until the mass before one reaches top_p
        if not keep[i]:
            continue
        if mass >= top_p:
            keep[i] = False
        mass += float(p[i])
    p = torch.where(keep, p, 0.0)
    return p / p.sum()


def _chi2_critical(df: int, alpha_z: float = 4.753) -> float:
    """Upper chi-square quantile at alpha = 1e-6 (z = 4.753), Wilson-Hilferty (within 1% for df >= 1)."""
    return df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.6, 0, 1.0), (1.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (0.8, 4, 0.7), (1.0, 100, 1.0)])
def test_sampler_matches_float64_distribution(temperature, top_k, top_p):
    n = 60_000
    cfg = SamplingConfig(temperature, top_p, top_k)
    draws = sample(LOGITS.expand(n, -1).contiguous(), cfg, torch.Generator().manual_seed(11))
    assert draws.shape == (n,) and draws.dtype == torch.long
    counts = torch.bincount(draws, minlength=len(LOGITS)).double()
    p = _expected(LOGITS, temperature, top_k, top_p)
    support = p > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the kept set: {counts.tolist()} vs p {p.tolist()}"
    expect = n * p[support]
    chi2 = float(((counts[support] - expect) ** 2 / expect).sum())
    df = int(support.sum()) - 1
    if df:
        assert chi2 < _chi2_critical(df), f"chi2 {chi2:.1f} (df {df}): counts {counts.tolist()}, p {p.tolist()}"


def test_reference_sampler_agrees_with_the_same_float64_distribution():
    """sample_next (the reference loop's sampler) is held to the same expectation, so both samplers agree."""
    from qlora_core.generation import sample_next
    n = 60_000
    draws = sample_next(LOGITS.expand(n, -1).contiguous(), 0.8, 0.7, torch.Generator().manual_seed(12))
    counts = torch.bincount(draws, minlength=len(LOGITS)).double()
    p = _expected(LOGITS, 0.8, 0, 0.7)
    support = p > 0
    assert counts[~support].sum() == 0
    expect = n * p[support]
    assert float(((counts[support] - expect) ** 2 / expect).sum()) < _chi2_critical(int(support.sum()) - 1)


def test_sampler_support_on_a_wide_vocabulary():
    """top-k never leaves the k best, top-p never leaves the nucleus, on 1000 random logits per row."""
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(512, 1000, generator=g)
    got = sample(logits, SamplingConfig(1.0, top_k=5), g)
    best5 = logits.topk(5, dim=-1).indices
    assert (best5 == got[:, None]).any(dim=-1).all()
    probs = torch.softmax(logits.double(), dim=-1)
    got = sample(logits, SamplingConfig(1.0, top_p=0.5), g)
    p_sorted = probs.sort(dim=-1, descending=True).values
    cut = ((p_sorted.cumsum(-1) - p_sorted) < 0.5).sum(-1)  # nucleus size per row
    rank = (probs > probs.gather(-1, got[:, None])).sum(-1)  # 0 = the best token
    assert (rank < cut).all()
    assert torch.equal(sample(logits, SamplingConfig(0.0), g), logits.argmax(-1))


# -- errors -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(sync_every=0), "sync_every"),
    (dict(eos_token_id="2"), "eos_token_id"),
    (dict(eos_token_id=[-1]), "eos_token_id"),
    (dict(cuda_graph=True), "cuda_graph"),
    (dict(input_ids=torch.zeros(5, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.zeros(2, 3)), "integer"),
    (dict(input_ids=torch.full((1, 3), 10_000)), "vocab_size"),
    (dict(attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])), "left-padded"),
    (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), "left-padded"),
    (dict(attention_mask=torch.full((2, 3), 2)), "left-padded"),
])
def test_bad_arguments_raise_named_errors(gqa_folder, kwargs, match):
    model = _model(gqa_folder)
    args = {"input_ids": torch.ones(2, 3, dtype=torch.long), "max_new_tokens": 4, **kwargs}
    with pytest.raises(GenerationError, match=match):
        generate(model, **args)


def test_generator_on_another_device_is_refused(gqa_folder):
    model = _model(gqa_folder)
    cuda_generator = types.SimpleNamespace(device=torch.device("cuda", 0))  # only .device is read before the refusal
    with pytest.raises(GenerationError, match="generator is on cuda:0"):
        generate(model, torch.ones(1, 3, dtype=torch.long), 2, temperature=1.0, generator=cuda_generator)


# -- `qlora generate` streaming ----------------------------------------------------------------------------------------
def test_token_printer_streams_text_that_adds_up_to_the_whole_decode(capsys):
    """Byte-level tokens split 'é' and '✓' over several ids: a prefix ends in U+FFFD and is held back."""
    from qlora_core.cli import TokenPrinter
    from qlora_core.data import TextTokenizer
    from tests._tiny import make_tokenizer
    tok = TextTokenizer(make_tokenizer(["reverse a b c\n", "d e f"] * 20), eos_token="<|im_end|>")
    text = "ab é c ✓ done"
    ids = tok.encode(text) + [tok.eos_token_id] * 3  # a finished row keeps emitting eos
    printer = TokenPrinter(tok)
    pieces = []
    for i in range(len(ids)):
        printer(torch.tensor([ids[i:i + 1]]))
        pieces.append(capsys.readouterr().out)
    printer.finish()
    tail = capsys.readouterr().out
    assert "".join(pieces) + tail == text + "\n"
    assert all("\ufffd" not in p for p in pieces) and sum(bool(p) for p in pieces) > 5
