"""Tiny random Llama checkpoints written as HF folders (config.json + safetensors, single file or sharded).

The folder is written by hand (not by transformers' save_pretrained), so a test that loads it with both our
`load_llama` and transformers' `from_pretrained` compares two independent readers of the same bytes.
`config_form` picks how RoPE is described: "v5" (transformers 5 `rope_parameters`) or "v4" (top-level
`rope_theta` and `rope_scaling`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from qlora_core.llama import Llama
from qlora_core.model_config import LlamaConfig

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # small on purpose: with head_dim 8-16 this puts RoPE frequencies in all three llama3 bands
               "original_max_position_embeddings": 32}

# name -> (architecture, rope, folder layout). Kept tiny: the whole parity grid runs in seconds on a CPU.
CONFIGS = {
    "llama3-gqa-headdim-untied-3shards-v5": dict(
        arch=dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rms_norm_eps=1e-5),
        rope_theta=500000.0, rope=LLAMA3_ROPE, shards=3, form="v5"),
    "default-mha-tied-single-v4": dict(
        arch=dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  tie_word_embeddings=True, rms_norm_eps=1e-6),
        rope_theta=10000.0, rope=None, shards=1, form="v4"),
    "llama3-mqa-bias-tied-2shards-v4": dict(
        arch=dict(vocab_size=89, hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=1, head_dim=12, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                  rms_norm_eps=1e-5),
        rope_theta=100000.0, rope=LLAMA3_ROPE, shards=2, form="v4"),
}


def hf_config_dict(spec: dict) -> dict:
    d = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
         "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, **spec["arch"]}
    if spec["form"] == "v5":
        d["rope_parameters"] = {"rope_theta": spec["rope_theta"], **(spec["rope"] or {"rope_type": "default"})}
    else:
        d["rope_theta"] = spec["rope_theta"]
        d["rope_scaling"] = dict(spec["rope"]) if spec["rope"] else None
    return d


def random_state_dict(cfg: LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 weights scaled so activations stay O(1) through the blocks (logits of a few units, not ~0)."""
    g = torch.Generator().manual_seed(seed)
    model = Llama(cfg)
    sd = {}
    for k, p in model.state_dict().items():
        if k.endswith("layernorm.weight") or k == "model.norm.weight":
            t = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
        elif k.endswith(".bias"):
            t = 0.1 * torch.randn(p.shape, generator=g)
        elif k == "model.embed_tokens.weight":
            t = torch.randn(p.shape, generator=g)
        else:  # (out, in) linears and lm_head
            t = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
        sd[k] = t.contiguous()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


def write_folder(dest: Path, config: dict, sd: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """Write config.json and sd as one model.safetensors (shards=1) or `shards` files plus the index."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    keys = sorted(sd)
    if shards == 1:
        save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
        return dest
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, str(dest / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return dest


def make_folder(dest: Path, name: str, seed: int = 0) -> Path:
    return write_spec_folder(dest, CONFIGS[name], seed)


def write_spec_folder(dest: Path, spec: dict, seed: int = 0) -> Path:
    """A random fp32 checkpoint of `spec` (a CONFIGS-style dict) written to dest."""
    config = hf_config_dict(spec)
    sd = random_state_dict(LlamaConfig.from_hf_config(config), seed)
    return write_folder(dest, config, sd, spec["shards"])


# GPU tests: the kernels' real paths (decode GEMVs with split-K, cuBLAS above M = 16); one dense linear (1024 x 2816
# fp32 = 11.5 MB) is small next to the quantized model; builds in a second.
GPU_SPEC = dict(arch=dict(vocab_size=1000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                          num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False, rms_norm_eps=1e-5),
                rope_theta=500000.0, rope=None, shards=2, form="v5")
