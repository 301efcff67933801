"""export.save_gguf: the f16 GGUF file reads back with `gguf` (llama.cpp's tensor names, types and values) and with
transformers' GGUF loader, whose logits equal those of the same weights rounded to f16 (fp32 rounding only) and
stay within the measured f16 weight-rounding gap of our 4-bit model. Each other family (Mistral, Qwen2, Qwen3,
Phi-3, Gemma 3) as llama.cpp's architecture for it, read back the same way (transformers' GGUF loader; the keys it
skips against convert_hf_to_gguf's rules); what an architecture cannot express is refused by name."""
import math

import numpy as np
import pytest
import torch

from qlora_core.export import merged_state_dict, save_gguf
from qlora_core.loading import load_llama
from tests._tiny import make_model_folder

gguf = pytest.importorskip("gguf", reason="test extra: gguf")
transformers = pytest.importorskip("transformers", reason="test extra: transformers (GGUF loader)")
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_reads_back_in_gguf_and_transformers(tmp_path, tie):
    folder = make_model_folder(tmp_path / "m", tie=tie)
    ours = load_llama(folder, quantize="nf4", dtype=torch.float32).eval()
    save_gguf(ours, tmp_path / "m.gguf")
    sd = merged_state_dict(ours, torch.float16)

    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    t = {x.name: x for x in reader.tensors}
    assert ("output.weight" in t) == (not tie) and len(t) == 2 + 9 * 2 + (not tie)
    emb = t["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.F16 and t["output_norm.weight"].tensor_type == \
        gguf.GGMLQuantizationType.F32
    assert np.array_equal(np.asarray(emb.data), sd["model.embed_tokens.weight"].numpy())
    assert np.array_equal(np.asarray(t["blk.1.ffn_down.weight"].data), sd["model.layers.1.mlp.down_proj.weight"].numpy())

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)  # the same weights, f16-rounded
    ids = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        a, r, b = hf(ids).logits, ref(ids).logits, ours(ids)
    torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)  # q/k rows un-permuted exactly, names all mapped
    # f16 rounding of the dequantized weights: measured 0.0020 (tied) / 0.0023 (untied) on logits of max ~2.5
    assert (a - b).abs().max() < 0.01


# The families beside Llama: transformers' own tiny random models (tests/test_families.py builds them), a LoRA
# with random B folded in by save_gguf, read back by transformers' GGUF loader.
from qlora_core.export import GGUFExportError  # noqa: E402
from qlora_core.lora import apply_lora, lora_modules  # noqa: E402
from tests.test_families import FAMILIES, W, build_folder  # noqa: E402

# Gemma 3 as llama.cpp's gemma3 fixes it: every 6th layer full, attention scale head_dim^-0.5 (1B-12B), the full
# layers' RoPE linearly scaled (4B+), the sliding ones at base 1e4
GEMMA3_LLAMA_CPP = ("gemma3_text", dict(
    hidden_size=48, intermediate_size=80, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, query_pre_attn_scalar=16, sliding_window=W, tie_word_embeddings=True,
    layer_types=["sliding_attention"] * 5 + ["full_attention"],
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))
# case -> (family, llama.cpp architecture, transformers' GGUF loader rebuilds the config from the file alone)
GGUF_CASES = {
    "mistral-nowindow-mha-tied": (FAMILIES["mistral-nowindow-mha-tied"], "llama", True),
    "qwen2-gqa-tied": (FAMILIES["qwen2-gqa-tied"], "qwen2", True),
    "qwen3-gqa-tied-headdim": (FAMILIES["qwen3-gqa-tied-headdim"], "qwen3", False),  # no attention.key_length
    "phi3-window-gqa-tied": (FAMILIES["phi3-window-gqa-tied"], "phi3", False),  # no window
    "phi3-longrope-partial-untied": (FAMILIES["phi3-longrope-partial-untied"], "phi3", False),  # no LongRoPE
    "gemma3-llama-cpp-pattern": (GEMMA3_LLAMA_CPP, "gemma3", False),  # no rope scaling, query_pre_attn_scalar
}


def _field(reader, key):
    return reader.fields[key].contents()


def _arch_keys(reader, arch, hf_cfg):
    """The keys transformers' loader skips, against what convert_hf_to_gguf.py derives from config.json (a
    weaker reference: the converter's rules as read, not a program that loads them)."""
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads  # Phi-3: none
    want = {"attention.key_length": head_dim, "attention.value_length": head_dim}
    if arch == "phi3":
        rope = hf_cfg.rope_parameters
        want["rope.dimension_count"] = int(rope.get("partial_rotary_factor", 1.0) * hf_cfg.hidden_size) // \
            hf_cfg.num_attention_heads
        want["attention.sliding_window"] = hf_cfg.sliding_window or 0
        if rope["rope_type"] == "longrope":
            orig = hf_cfg.original_max_position_embeddings
            want["rope.scaling.original_context_length"] = orig
            scale = hf_cfg.max_position_embeddings / orig
            want["rope.scaling.attn_factor"] = pytest.approx(math.sqrt(1 + math.log(scale) / math.log(orig)))
    if arch == "gemma3":
        full, local = hf_cfg.rope_parameters["full_attention"], hf_cfg.rope_parameters["sliding_attention"]
        want.update({"attention.sliding_window": hf_cfg.sliding_window, "rope.freq_base": full["rope_theta"],
                     "rope.freq_base_swa": local["rope_theta"], "rope.scaling.factor": full["factor"],
                     "rope.scaling.type": "linear"})
    return {k: _field(reader, f"{arch}.{k}") for k in want}, want


def _f16_reference(hf, sd):
    """transformers' original model with the weights save_gguf writes: matrices rounded to f16, vectors f32."""
    hf.load_state_dict({k: v.half().float() if v.dim() > 1 else v for k, v in sd.items()}, strict=False)
    return hf


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_family_gguf_reads_back_in_transformers(tmp_path, case):
    """Architecture, the tensor names of gguf's table for it, the keys transformers reads (its config equals the
    original's) and those it skips, and the logits of transformers' GGUF-loaded model against the original
    model with the merged weights f16-rounded: equal but for fp32 rounding (Gemma's norms pass (1 + w) - 1)."""
    family, arch, self_described = GGUF_CASES[case]
    folder = build_folder(tmp_path / "hf", case, family=family)
    ours = load_llama(folder, quantize=None, dtype=torch.float32).eval()
    torch.manual_seed(1)
    apply_lora(ours, r=2, alpha=4, dropout=0.0, target_modules="all-linear")
    for m in lora_modules(ours).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    save_gguf(ours, tmp_path / "m.gguf")

    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert _field(reader, "general.architecture") == arch
    L = ours.config.num_hidden_layers
    allowed = {gguf.TENSOR_NAMES[t].format(bid=b) for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]
               for b in range(L)}
    assert {t.name.rsplit(".", 1)[0] for t in reader.tensors} <= allowed
    ref = _f16_reference(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
                         merged_state_dict(ours, torch.float32))
    parsed = load_gguf_checkpoint(str(tmp_path / "m.gguf"))["config"]
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "rms_norm_eps", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert parsed[k] == pytest.approx(getattr(ref.config, k)), k
    got, want = _arch_keys(reader, arch, ref.config)
    assert got == want
    t = {x.name: x for x in reader.tensors}
    rope = getattr(ref.config, "rope_parameters", None) or {}
    for kind in ("long", "short"):  # LongRoPE: llama.cpp reads the factors from tensors (transformers does not)
        if rope.get("rope_type") == "longrope":
            assert np.asarray(t[f"rope_factors_{kind}.weight"].data).tolist() == \
                pytest.approx(rope[f"{kind}_factor"])

    kw = {} if self_described else {"config": ref.config}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32,
                                                           **kw).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, r = hf(ids).logits, ref(ids).logits
    assert r.abs().max() > 1.0
    print(f"{case}: max |gguf - f16 reference| {(a - r).abs().max().item():.2e} of logits up to {r.abs().max():.1f}")
    torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def load_gguf_checkpoint(path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint as load
    return load(path)


# family, the setting llama.cpp's architecture lacks or fixes otherwise, a word the error names it by
REFUSED = {
    "qwen2-window-mqa-untied": (FAMILIES["qwen2-window-mqa-untied"], "sliding_window"),
    "qwen3-window-bias-mqa-untied": (FAMILIES["qwen3-window-bias-mqa-untied"], "sliding_window"),
    "mistral-window-gqa-untied": (FAMILIES["mistral-window-gqa-untied"], "sliding_window"),
    "gemma3-sliding-full-gqa-tied": (FAMILIES["gemma3-sliding-full-gqa-tied"], "layer_types"),
    "qwen3-bias": (("qwen3", {**FAMILIES["qwen3-gqa-tied-headdim"][1], "attention_bias": True}), "attention_bias"),
    "gemma3-scalar": (("gemma3_text", {**GEMMA3_LLAMA_CPP[1], "query_pre_attn_scalar": 24}),
                      "query_pre_attn_scalar"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_gguf_refuses_what_the_llama_cpp_arch_cannot_express(tmp_path, case):
    """A window on llama / qwen2 / qwen3, Gemma 3 off llama.cpp's layer pattern or attention scale, Qwen3 with
    biases: GGUFExportError naming the model_type and the setting, and no file."""
    family, setting = REFUSED[case]
    ours = load_llama(build_folder(tmp_path / "hf", case, family=family), quantize=None, dtype=torch.float32)
    with pytest.raises(GGUFExportError, match=f"model_type '{family[0]}' with {setting}"):
        save_gguf(ours, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    """Llama 3.1's rope scaling as llama.cpp takes it: rope_freqs holds each pair's frequency divisor, so plain
    RoPE frequencies over it give our scaled ones (transformers' loader ignores the tensor: ours is the reference)."""
    from qlora_core.model_config import LlamaConfig, rope_inv_freq
    from qlora_core.llama import Llama
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                      rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=1024)
    save_gguf(Llama(cfg), tmp_path / "m.gguf")
    t = {x.name: x for x in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    factors = torch.from_numpy(np.asarray(t["rope_freqs.weight"].data).copy())
    plain = rope_inv_freq(LlamaConfig(**{**cfg.__dict__, "rope_scaling": None}))
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the ramp are present
    torch.testing.assert_close(plain / factors, rope_inv_freq(cfg), rtol=1e-6, atol=0)
