"""`LlamaConfig`: the shapes and switches of one checkpoint, read from and written to HF config.json.

One dataclass serves every family `llama.py` runs (MODEL_TYPES); what a family's transformers code fixes or
derives instead of reading config.json as is (biases, windows, q/k norms, fused projections, Gemma 3's switches)
is filled in by `_family_fields`, so the model code reads plain fields. Also here: the rope-scaling dicts in their
normalized form and `rope_inv_freq`, the inverse frequencies a config's RoPE uses. Any unsupported value is a
ConfigError naming the field.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .errors import FileLoadError


class ConfigError(FileLoadError, ValueError):
    """config.json lacks a required field or holds a value this Llama cannot run (the message names it)."""


# model_type -> the transformers class it names. They share the block's math; they differ in config.json fields,
# in which projections carry a bias, in Qwen3's q/k norms and in Gemma 3's switches (see _family_fields).
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


# LlamaConfig fields that config.json does not hold as is: _family_fields derives them per model_type
_DERIVED = ("o_proj_bias", "sliding_window", "qk_norm", "fused_qkv_gate_up", "partial_rotary_factor", "layer_types",
            "rope_local_theta", "hidden_act", "norm_unit_offset", "embed_scale", "sandwich_norms",
            "query_pre_attn_scalar")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names of the two attention kinds
HIDDEN_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # config name -> ops/swiglu.py activation
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Phi-3's checkpoint names: q/k/v stacked along out features in qkv_proj, [gate; up] in gate_up_proj
FUSED_LINEAR_NAMES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def linear_names(cfg: "LlamaConfig") -> tuple[str, ...]:
    """The decoder-block linears of a block of `cfg`, as module paths under model.layers.N."""
    return FUSED_LINEAR_NAMES if cfg.fused_qkv_gate_up else LINEAR_NAMES


@dataclasses.dataclass
class LlamaConfig:
    """Shapes and hyper-parameters of a Llama checkpoint (`from_hf_config` reads config.json in both forms)."""
    vocab_size: int                          # rows of embed_tokens / lm_head
    hidden_size: int                         # model width d
    intermediate_size: int                   # SwiGLU hidden width
    num_hidden_layers: int                   # decoder blocks
    num_attention_heads: int                 # query heads H
    num_key_value_heads: int | None = None   # K/V heads (GQA); None -> H
    head_dim: int | None = None              # per-head width D; None -> hidden_size // H
    rms_norm_eps: float = 1e-6               # RMSNorm epsilon
    rope_theta: float = 10000.0              # RoPE base
    rope_scaling: dict | None = None         # None (plain RoPE) or the llama3 dict (factor, low/high_freq_factor, ...)
    max_position_embeddings: int = 2048      # context the checkpoint was trained for (informational)
    tie_word_embeddings: bool = False        # lm_head shares embed_tokens.weight
    attention_bias: bool = False             # bias on q/k/v/o projections
    mlp_bias: bool = False                   # bias on gate/up/down projections
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"                # "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"
    o_proj_bias: bool | None = None          # bias on o_proj; None -> attention_bias (Qwen2: q/k/v only)
    sliding_window: int | None = None        # keys a query of a sliding layer sees (itself included); None = none
    qk_norm: bool | None = None              # RMSNorm (head_dim,) on each q and k head before RoPE; None -> qwen3
    fused_qkv_gate_up: bool | None = None    # one qkv_proj and one gate_up_proj linear (Phi-3); None -> phi3
    partial_rotary_factor: float = 1.0       # RoPE rotates the first int(head_dim * this) dims of a head (Phi-4-mini)
    # per-layer attention and the Gemma 3 switches (all off for the Llama-shaped families)
    layer_types: list[str] | None = None     # LAYER_TYPES per layer; None -> all sliding with a window, else all full
    rope_local_theta: float | None = None    # RoPE base of sliding layers, unscaled (Gemma 3); None -> as full layers
    hidden_act: str = "silu"                 # MLP gate activation, HIDDEN_ACTS: silu (SwiGLU), gelu_pytorch_tanh
    norm_unit_offset: bool = False           # RMSNorms scale by (1 + weight), in fp32, output in x's dtype (Gemma)
    embed_scale: bool = False                # embeddings times sqrt(hidden_size) rounded to their dtype (Gemma)
    sandwich_norms: bool = False             # also norm the attention and MLP outputs, and the MLP input (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar^-0.5; None -> head_dim^-0.5

    def __post_init__(self):
        for f in REQUIRED_FIELDS:
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {f!r} must be a positive int, got {v!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                  f"{self.num_attention_heads} and config has no head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim must be a positive even int (RoPE rotates pairs), got {self.head_dim}")
        if not self.rope_theta or self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported (supported: {sorted(MODEL_TYPES)})")
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias
        if self.qk_norm is None:
            self.qk_norm = self.model_type == "qwen3"
        if self.fused_qkv_gate_up is None:
            self.fused_qkv_gate_up = self.model_type == "phi3"
        self._check_rotary()
        w = self.sliding_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w <= 0):
            raise ConfigError(f"sliding_window must be a positive int or null, got {w!r}")
        self._derive_layer_types()
        if self.hidden_act not in HIDDEN_ACTS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (supported: {sorted(HIDDEN_ACTS)})")

    def _derive_layer_types(self) -> None:
        """layer_types as one LAYER_TYPES entry per layer. As transformers: a "sliding_attention" layer without a
        window attends fully; and a window no layer uses is dropped (sliding_window None)."""
        L, w = self.num_hidden_layers, self.sliding_window
        types = self.layer_types
        if types is None:
            types = ["sliding_attention" if w is not None else "full_attention"] * L
        types = list(types)
        if len(types) != L or any(t not in LAYER_TYPES for t in types):
            raise ConfigError(f"layer_types must list {L} entries of {LAYER_TYPES}, got {self.layer_types!r}")
        if w is None:
            types = ["full_attention"] * L
        if "sliding_attention" not in types:
            self.sliding_window = None
        self.layer_types = types

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head RoPE rotates (transformers: int(head_dim * partial_rotary_factor)); the rest
        pass through."""
        return int(self.head_dim * self.partial_rotary_factor)

    def _check_rotary(self) -> None:
        """ConfigError for a partial_rotary_factor giving no or an odd rotary width, or LongRoPE factors that do
        not have one entry per rotated pair; fills LongRoPE's default attention_factor."""
        f = self.partial_rotary_factor
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1:
            raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {f!r}")
        R = self.rotary_dim
        if R < 2 or R % 2:
            raise ConfigError(f"partial_rotary_factor {f!r} gives rotary width int({self.head_dim} * {f!r}) = {R}; "
                              f"RoPE rotates pairs, so it must be even and >= 2")
        s = self.rope_scaling
        if s is None or s["rope_type"] != "longrope":
            return
        for k in ("short_factor", "long_factor"):
            if len(s[k]) != R // 2:
                raise ConfigError(f"longrope {k} has {len(s[k])} entries; rotary width {R} needs {R // 2}")
        if s.get("attention_factor") is None:
            s["attention_factor"] = _longrope_attention_factor(s, self.max_position_embeddings)

    @classmethod
    def from_hf_config(cls, d: dict) -> "LlamaConfig":
        """Build from a parsed HF config.json (transformers 4 form with top-level `rope_theta`/`rope_scaling`, or
        transformers 5 form with `rope_parameters`). Raises ConfigError naming missing or unsupported fields."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not supported (supported: {sorted(MODEL_TYPES)}, "
                              f"the Llama family)")
        missing = [f for f in REQUIRED_FIELDS if d.get(f) is None]
        if missing:
            raise ConfigError(f"config is missing required field(s) {missing}")
        if model_type != "gemma3_text" and d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {d['hidden_act']!r} is not supported (only 'silu', SwiGLU)")
        rope = d.get("rope_parameters")
        if isinstance(rope, dict):  # transformers 5: {"rope_type", "rope_theta", and the scaling fields}
            theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
            scaling = rope
        else:
            theta = d.get("rope_theta", 10000.0)
            scaling = d.get("rope_scaling")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls)
              if f.name in d and f.name not in ("rope_theta", "rope_scaling") + _DERIVED}
        kw.update(rope_theta=float(theta), rope_scaling=scaling)
        kw.update(_family_fields(model_type, d))
        if model_type == "phi3":
            kw["rope_scaling"] = _phi3_rope_scaling(d, kw["rope_scaling"])
        return cls(**kw)

    def to_hf_config(self) -> dict:
        """A config.json dict that transformers (4.45+ and 5) reads as the model_type's *ForCausalLM."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        for k in _DERIVED:  # written below in the family's own fields, or fixed by its code
            d.pop(k, None)
        d.update(model_type=self.model_type, architectures=[MODEL_TYPES[self.model_type]], hidden_act="silu")
        if self.rope_scaling is None:
            d.pop("rope_scaling", None)
        if self.model_type != "llama":  # biases are fixed by the family's code, not read from config.json
            d.pop("mlp_bias", None)
            if self.model_type not in ("qwen3", "gemma3_text"):  # these read attention_bias (q/k/v/o alike)
                d.pop("attention_bias", None)
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):  # layer_types names the sliding layers (transformers 4.5x+)
            d.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                     max_window_layers=_first_sliding(self.layer_types), layer_types=self.layer_types)
        if self.model_type == "phi3":  # Phi3Config reads these top-level, and its 4096 default would override
            d.update(sliding_window=self.sliding_window, partial_rotary_factor=self.partial_rotary_factor)
            if self.rope_scaling is not None:
                d["original_max_position_embeddings"] = self.rope_scaling["original_max_position_embeddings"]
        if self.model_type == "gemma3_text":
            _gemma3_hf_fields(self, d)
        return d


def _first_sliding(layer_types: list[str]) -> int:
    """max_window_layers for transformers before layer_types: the index of the first sliding layer (or L)."""
    return next((i for i, t in enumerate(layer_types) if t == "sliding_attention"), len(layer_types))


def _gemma3_hf_fields(cfg: LlamaConfig, d: dict) -> None:
    """Gemma3TextConfig's own names in d: hidden_activation, RoPE per layer type, window, layer_types."""
    for k in ("hidden_act", "rope_theta", "rope_scaling", "mlp_bias"):
        d.pop(k, None)
    full = dict(cfg.rope_scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    d.update(hidden_activation=cfg.hidden_act, sliding_window=cfg.sliding_window, layer_types=cfg.layer_types,
             query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
             rope_parameters={"full_attention": full, "sliding_attention": local})


def _family_fields(model_type: str, d: dict) -> dict:
    """The LlamaConfig fields a family's transformers code fixes or derives instead of reading them as is."""
    if model_type == "mistral":  # MistralAttention / MistralMLP: no bias anywhere; the window on every layer
        return dict(attention_bias=False, mlp_bias=False, o_proj_bias=False, sliding_window=d.get("sliding_window"))
    if model_type == "qwen2":  # Qwen2Attention: bias on q/k/v, none on o_proj; Qwen2MLP: no bias
        return dict(attention_bias=True, mlp_bias=False, o_proj_bias=False, **_qwen2_window(d))
    if model_type == "qwen3":  # Qwen3Attention: attention_bias on q/k/v/o, q_norm/k_norm; Qwen3MLP: no bias;
        bias = bool(d.get("attention_bias", False))  # Qwen3Config's head_dim defaults to 128, not hidden / heads
        return dict(attention_bias=bias, mlp_bias=False, o_proj_bias=bias, **_qwen2_window(d),
                    qk_norm=True, head_dim=d.get("head_dim", 128))
    if model_type == "phi3":  # Phi3Attention / Phi3MLP: fused qkv_proj and gate_up_proj, no bias anywhere
        rope = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
        return dict(attention_bias=False, mlp_bias=False, o_proj_bias=False, fused_qkv_gate_up=True,
                    sliding_window=d.get("sliding_window"), rms_norm_eps=d.get("rms_norm_eps", 1e-5),
                    max_position_embeddings=d.get("max_position_embeddings", 4096),  # Phi3Config's defaults
                    partial_rotary_factor=rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
    if model_type == "gemma3_text":
        return _gemma3_fields(d)
    return {}


def _phi3_rope_scaling(d: dict, scaling: dict | None) -> dict | None:
    """Phi3Config's reading of the rope dict: types "su" and "yarn" mean "longrope", and the top-level
    original_max_position_embeddings (default 4096) wins over the dict's own."""
    if not isinstance(scaling, dict):
        return scaling
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("longrope", "su", "yarn"):
        return scaling
    return {**scaling, "rope_type": "longrope",
            "original_max_position_embeddings": d.get("original_max_position_embeddings", 4096)}


def _longrope_attention_factor(s: dict, max_position_embeddings: int) -> float:
    """transformers' default LongRoPE cos/sin scale: sqrt(1 + ln(factor) / ln(original length)) for factor > 1,
    factor defaulting to max_position_embeddings / original_max_position_embeddings (Phi-3's convention)."""
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_position_embeddings / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def _qwen2_window(d: dict) -> dict:
    """sliding_window and layer_types as transformers' Qwen2Config / Qwen3Config derive them: sliding_window
    counts only with use_sliding_window; the sliding layers are those layer_types names, by default the layers
    from max_window_layers on."""
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    types = d.get("layer_types")
    if types is None:
        first = d.get("max_window_layers", 28)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(d["num_hidden_layers"])]
    return dict(sliding_window=window, layer_types=types)


def _gemma3_fields(d: dict) -> dict:
    """Gemma3TextConfig as transformers reads it (its defaults where config.json is silent): GeGLU, (1 + w) norms,
    scaled embeddings, four norms a block, q/k norms, bias on q/k/v/o or none, head_dim 256, window 4096 on five
    layers of six, a RoPE base of 1e6 on full layers (the rope scaling too) and 1e4 on sliding ones."""
    for k in ("final_logit_softcapping", "attn_logit_softcapping"):
        if d.get(k) is not None:
            raise ConfigError(f"{k} {d[k]!r} is not supported (Gemma 3 has none; tanh soft-capping is Gemma 2's)")
    if d.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention is not supported (a causal LM only)")
    act = d.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"hidden_activation {act!r} is not supported (only 'gelu_pytorch_tanh', GeGLU)")
    L, pattern = d["num_hidden_layers"], d.get("sliding_window_pattern", 6)
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and ("full_attention" in rope or "sliding_attention" in rope):  # transformers 5
        full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        scaling, local_theta = full, local.get("rope_theta", 10000.0)
        if _normalize_rope_scaling(local) is not None:
            raise ConfigError(f"sliding_attention rope {local!r} is not supported (only plain RoPE)")
        theta = full.get("rope_theta", 1e6)
    else:  # transformers 4: rope_theta / rope_scaling for full layers, rope_local_base_freq for sliding ones
        theta, scaling = d.get("rope_theta", 1e6), d.get("rope_scaling")
        local_theta = d.get("rope_local_base_freq", 10000.0)
    bias = bool(d.get("attention_bias", False))
    return dict(attention_bias=bias, o_proj_bias=bias, mlp_bias=False, qk_norm=True, head_dim=d.get("head_dim", 256),
                sliding_window=d.get("sliding_window", 4096), layer_types=types, rope_theta=float(theta),
                rope_scaling=scaling, rope_local_theta=float(local_theta), hidden_act=act, norm_unit_offset=True,
                embed_scale=True, sandwich_norms=True, query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
                tie_word_embeddings=d.get("tie_word_embeddings", True))


def _normalize_rope_scaling(s: dict) -> dict | None:
    """None for plain RoPE; the llama3 parameters as a clean dict; ConfigError for anything else."""
    if not isinstance(s, dict):
        raise ConfigError(f"rope_scaling must be a dict or null, got {type(s).__name__}")
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return None
    if kind == "longrope":
        return _normalize_longrope(s)
    if kind == "linear":  # positions divided by factor (Gemma 3 4B+ full layers): inv_freq / factor
        if not s.get("factor", 0) > 0:
            raise ConfigError(f"linear rope scaling needs factor > 0, got {s!r}")
        return {"rope_type": "linear", "factor": float(s["factor"])}
    if kind != "llama3":
        raise ConfigError(f"rope type {kind!r} is not supported (only 'default', 'linear', 'llama3' and Phi-3's "
                          f"'longrope')")
    missing = [k for k in _LLAMA3_KEYS if k not in s]
    if missing:
        raise ConfigError(f"llama3 rope scaling is missing field(s) {missing}")
    out = {"rope_type": "llama3", **{k: s[k] for k in _LLAMA3_KEYS}}
    if out["high_freq_factor"] <= out["low_freq_factor"] or out["factor"] <= 0:
        raise ConfigError(f"llama3 rope scaling needs factor > 0 and high_freq_factor > low_freq_factor, got {out}")
    return out


_LONGROPE_KEYS = ("short_factor", "long_factor", "original_max_position_embeddings")


def _normalize_longrope(s: dict) -> dict:
    """LongRoPE (Phi-3 long-context): per-pair divisors short_factor / long_factor, the length where the long
    ones take over, and the cos/sin scale attention_factor (None: derived in LlamaConfig._check_rotary)."""
    missing = [k for k in _LONGROPE_KEYS if s.get(k) is None]
    if missing:
        raise ConfigError(f"longrope rope scaling is missing field(s) {missing}")
    for k in ("short_factor", "long_factor"):
        if not isinstance(s[k], list) or not all(isinstance(x, (int, float)) and x > 0 for x in s[k]):
            raise ConfigError(f"longrope {k} must be a list of positive numbers, got {s[k]!r}")
    out = {"rope_type": "longrope", **{k: s[k] for k in _LONGROPE_KEYS}}
    out.update({k: s[k] for k in ("factor", "attention_factor") if s.get(k) is not None})
    return out


def rope_inv_freq(cfg: LlamaConfig, device=None, local: bool = False, long: bool = False,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(R/2,) inverse frequencies in `dtype` (the model's RoPE: fp32) over the rotary width R = cfg.rotary_dim, with
    llama3 or linear scaling when configured. local=True: those of the sliding layers, plain RoPE of base
    cfg.rope_local_theta when set (Gemma 3), else the same as the full layers. LongRoPE divides each by its
    short_factor, or long_factor when `long`."""
    D = cfg.rotary_dim
    own = local and cfg.rope_local_theta is not None
    theta = cfg.rope_local_theta if own else cfg.rope_theta
    base = theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).to(dtype) / D)
    inv = 1.0 / base
    s = None if own else cfg.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    if s["rope_type"] == "longrope":  # transformers' order: 1 / (ext * base**(2j/R)), not inv / ext
        ext = torch.tensor(s["long_factor" if long else "short_factor"], dtype=dtype, device=device)
        return 1.0 / (ext * base)
    # llama3: wavelengths longer than orig/low_freq_factor are slowed by `factor`, shorter than orig/high_freq_factor
    # kept, and the band between interpolated linearly in (orig / wavelen).
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    orig = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > orig / lo, inv / factor, inv)
    smooth = (orig / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / hi) & (wavelen <= orig / lo)
    return torch.where(medium, blended, scaled)
