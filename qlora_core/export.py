"""Writing models as Hugging Face checkpoints: `save_merged` (LoRA folded in, dense) and `save_quantized`
(bitsandbytes 4-bit, the "bnb-4bit" layout transformers + bitsandbytes load). The `qlora merge` and `qlora quantize`
commands are these two functions after a load.

A checkpoint folder is `model.safetensors` + `config.json` (+ the tokenizer files of the source folder, copied),
built in a temporary folder and put in place as a whole (durable.replace_dir), so a crash leaves the old folder or
the new one. The output may not be the model's own folder, nor one holding other files (check_export_target).
config.json is the source folder's own config.json when the model came from one (`load_llama` records it as
`model.name_or_path`), else the model's config (`to_hf_config()` of ours, `to_dict()` of a transformers model),
with `torch_dtype` / `dtype` set and `quantization_config` replaced.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .adapter import load_adapter, read_adapter, read_base_format
from .defaults import BLOCKSIZE, DOUBLE_QUANT, QUANT_TYPE
from .durable import replace_dir
from .errors import NonFiniteError, UsageError
from .loading import load_llama, resolve_folder
from .model_config import LlamaConfig, rope_inv_freq
from .lora import LoRALinear, is_quantized_linear, lora_modules
from .ops.quant4 import dequantize
from .targets import output_layer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
CHECKPOINT_FILES = frozenset(("model.safetensors", "config.json", *TOKENIZER_FILES))  # what write_checkpoint writes


def source_folder(model: nn.Module) -> Path | None:
    """The folder the model was loaded from (`name_or_path` of ours, `config._name_or_path` of transformers'),
    when it is a local directory; else None."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (embeddings for a causal LM): its dense dtype."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    raise ValueError(f"{type(model).__name__} has no floating-point parameter to take a dtype from")


def hf_config(model: nn.Module, dtype: torch.dtype, quantization_config: dict | None = None,
              base: dict | None = None) -> dict:
    """config.json for `model`: `base` (a copy) when given, else the source described in the module docstring;
    dtype set, quantization_config replaced by `quantization_config` (dropped when None). ValueError when the
    model has no config to write."""
    folder = source_folder(model)
    cfg_obj = getattr(model, "config", None)
    if base is not None:
        cfg = json.loads(json.dumps(base))
    elif folder is not None and (folder / "config.json").is_file():
        cfg = json.loads((folder / "config.json").read_text())
    elif hasattr(cfg_obj, "to_hf_config"):
        cfg = cfg_obj.to_hf_config()
    elif hasattr(cfg_obj, "to_dict"):
        cfg = cfg_obj.to_dict()
    else:
        raise ValueError(f"{type(model).__name__} carries no config to write as config.json; pass config=")
    cfg.pop("quantization_config", None)
    name = str(dtype).removeprefix("torch.")
    cfg["torch_dtype"] = name  # transformers 4.x reads torch_dtype, 5.x dtype
    cfg["dtype"] = name
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    return cfg


class ExportTargetError(UsageError, ValueError):
    """An output folder that writing a checkpoint would damage: the model's own folder (or one inside it), or a
    folder holding files the checkpoint does not consist of."""


class NonFiniteExportError(NonFiniteError, ValueError):
    """A tensor to be written holds NaN or Inf (a diverged adapter folded in, ...)."""


def check_export_target(out: str | os.PathLike, protect=()) -> None:
    """Refuse `out` as a checkpoint folder when it is, or lies inside, one of the `protect` folders (the base
    model, the adapter: writing there would replace their files), when it is a file, or when it already holds
    anything but the files write_checkpoint writes (replacing the folder would delete them), or when the folder it
    lies in cannot be written. ExportTargetError."""
    out = Path(out)
    target = out.resolve()
    for folder in protect:
        if folder is None:
            continue
        f = Path(folder).resolve()
        if target == f or f in target.parents or target in f.parents:
            raise ExportTargetError(f"output {out} is, contains or lies inside {folder}, whose files writing it "
                                    f"would replace or delete; choose another output folder")
    if out.exists() and not out.is_dir():
        raise ExportTargetError(f"output {out} exists and is not a folder")
    if out.is_dir():
        foreign = sorted(n for n in os.listdir(out) if n not in CHECKPOINT_FILES)
        if foreign:
            raise ExportTargetError(f"output folder {out} holds files a model checkpoint does not consist of "
                                    f"({foreign[:3]}); choose a new or empty folder")
    parent = target.parent  # the new folder is built beside `out` and renamed onto it
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportTargetError(f"cannot write to {parent} (permission denied), so not to output {out}")


def write_checkpoint(state_dict: dict[str, torch.Tensor], out: str | os.PathLike, config: dict,
                     tokenizer_from: str | os.PathLike | None = None) -> Path:
    """model.safetensors (CPU copies of `state_dict`), config.json and the tokenizer files of `tokenizer_from`
    into the folder `out`, written as a whole (durable.replace_dir: a failure leaves the old folder or the new one,
    never a mix). With config["tie_word_embeddings"] the lm_head.weight copy is left out (transformers re-ties it
    from the embeddings). Refuses (ExportTargetError) an `out` that is or holds tokenizer_from, or holds other
    files (check_export_target), and a NaN/Inf tensor (NonFiniteExportError). Returns the folder."""
    out = Path(out)
    check_export_target(out, [tokenizer_from])
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if config.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    for k, v in sd.items():  # load_llama refuses such a checkpoint; better not to write it
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            raise NonFiniteExportError(f"{k} holds NaN/Inf values; nothing was written to {out}")

    def fill(tmp: Path) -> None:
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_from) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)

    return replace_dir(out, fill)


def bnb_quantization_config(quant: str, double_quant: bool, compute_dtype: torch.dtype,
                            skip_modules: list[str] | None = None) -> dict:
    """config.json's quantization_config as transformers' BitsAndBytesConfig(load_in_4bit=True).to_dict() writes
    it; skip_modules become llm_int8_skip_modules (the linears left dense; None: transformers' default, the output
    layer; [] quantizes every linear)."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "_load_in_4bit": True, "_load_in_8bit": False,
            "bnb_4bit_quant_type": quant, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": 6.0, "llm_int8_skip_modules": skip_modules,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False}


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The dense state dict of `model` with every LoRA adapter folded in, under the base model's own keys
    (`...q_proj.weight`, no `base_layer` / `lora_A` / `lora_B`); the model is not changed.

    Each adapted weight is LoRALinear.merged_weight() (W + scaling * B @ A in fp32, rounded once to the base
    dtype; a 4-bit base dequantized first), every other 4-bit weight is dequantized, and with `dtype` every
    floating tensor is then cast to it. Non-persistent buffers are left out, as state_dict() does.
    """
    out: dict[str, torch.Tensor] = {}

    def visit(prefix: str, m: nn.Module) -> None:
        if isinstance(m, LoRALinear):
            out[prefix + "weight"] = m.merged_weight()
            bias = getattr(m.base_layer, "bias", None)
            if bias is not None:
                out[prefix + "bias"] = bias.detach()
            return
        if is_quantized_linear(m):
            out[prefix + "weight"] = dequantize(m.weight)
        for name, p in m._parameters.items():
            if p is not None:
                out[prefix + name] = p.detach()
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                out[prefix + name] = b
        for name, child in m._modules.items():
            if child is not None:
                visit(f"{prefix}{name}.", child)

    visit("", model)
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def save_merged(model: nn.Module, output: str | os.PathLike, dtype: torch.dtype | None = None,
                config: dict | None = None, tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Write `model` with its LoRA adapters folded in as a dense HF checkpoint that transformers loads
    (`AutoModelForCausalLM.from_pretrained(output)`); the model itself is not changed. Returns the folder.

    dtype: of the written weights (default: the model's dense dtype). Over a 4-bit base (the model as trained)
    the merged weight is the dequantized one plus the update, so the written model computes what the trained one
    did; over a dense base (`load_llama(..., quantize=None)`) it is the original weight plus the update, which
    differs from the trained model by the quantization error (merge_adapter does either from folders). config: the config.json content to start from (default:
    see hf_config; dtype is set and quantization_config dropped either way); tokenizer_from (default: the
    source folder) as in write_checkpoint. A model without adapters is written as it is (4-bit
    weights dequantized).
    """
    check_export_target(output, [source_folder(model), tokenizer_from])  # before the merge's work
    dtype = dtype or model_dtype(model)
    cfg = hf_config(model, dtype, base=config)
    return write_checkpoint(merged_state_dict(model, dtype), output, cfg,
                            tokenizer_from if tokenizer_from is not None else source_folder(model))


MERGE_BASES = ("quantized", "dense")


def merge_adapter(model_path: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike,
                  base: str = "quantized", dtype: torch.dtype = torch.bfloat16) -> Path:
    """Load the base model at `model_path`, fold the adapter directory `adapter` in, and write a dense HF
    checkpoint to `output` (save_merged) with weights in `dtype` (default bfloat16); returns the folder.

    base="quantized" (default): the adapter is folded onto the base it was trained with: the dense weights are
    quantized again as the adapter records (adapter.read_base_format: quant type, blocksize, double quant, dtype;
    an adapter without that record, e.g. one written by PEFT, gets the library defaults nf4, blocksize 64, double
    quant, in `dtype`) and dequantized, so the merged model computes what the trained model computed.
    base="dense": onto the original dense weights, W + scaling * B @ A; the adapter then corrects a base it never
    saw, and the result differs from the trained model by the quantization error of W. Loads on the CPU.
    """
    if base not in MERGE_BASES:
        raise UsageError(f"merge base must be one of {MERGE_BASES}, got {base!r}")
    check_export_target(output, [resolve_folder(model_path), adapter])  # before any loading
    read_adapter(adapter)  # a damaged or non-finite adapter fails before the model loads
    fmt = read_base_format(adapter) or {"quant": QUANT_TYPE, "blocksize": BLOCKSIZE, "double_quant": DOUBLE_QUANT}
    quant = None if base == "dense" or fmt["quant"] == "none" else fmt["quant"]
    load_dtype = getattr(torch, fmt["dtype"]) if quant and fmt.get("dtype") else dtype  # as trained
    model = load_llama(model_path, quantize=quant, double_quant=bool(fmt.get("double_quant", DOUBLE_QUANT)),
                       blocksize=int(fmt.get("blocksize") or BLOCKSIZE), dtype=load_dtype, device="cpu")
    load_adapter(model, adapter, check_base=False)
    return save_merged(model, output, dtype=dtype)


def save_quantized(model: nn.Module, output: str | os.PathLike, config: dict | None = None,
                   tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Write a 4-bit model (QuantLinear layers, from load_llama(quantize=...) or quantize_model) as a bitsandbytes
    "bnb-4bit" checkpoint: Linear4bit keys in model.safetensors and a quantization_config in config.json, so
    transformers + bitsandbytes read it back byte for byte, and so does load_llama while the output layer is dense
    (the default of quantize_model). Returns the folder.

    The dense tensors (embeddings, norms, dense linears) keep the model's dtype, which is also written as
    bnb_4bit_compute_dtype. config and tokenizer_from as in save_merged (the quantization_config is added).
    ValueError when the model still carries LoRA adapters (merge_and_unload(model, requantize=True) first, or
    save_adapter them), has no 4-bit layer, or mixes quant types / double quant (one quantization_config
    describes them all).
    """
    check_export_target(output, [source_folder(model), tokenizer_from])
    if lora_modules(model):
        raise ValueError("save_quantized: the model carries LoRA adapters; fold them in with "
                         "merge_and_unload(model, requantize=True) or save them with save_adapter")
    quantized = {n: m.weight for n, m in model.named_modules() if is_quantized_linear(m)}
    if not quantized:
        raise ValueError(f"save_quantized: {type(model).__name__} has no 4-bit layer; quantize_model(model) first")
    formats = {(q.quant_type, q.double_quant) for q in quantized.values()}
    if len(formats) != 1:
        raise ValueError(f"save_quantized: the 4-bit layers mix formats {sorted(formats)} (quant_type, "
                         f"double_quant); one bnb quantization_config describes a single one")
    quant, double_quant = formats.pop()
    dtype = model_dtype(model)
    # transformers quantizes every linear it is not told to skip, and skips only the output layer when told
    # nothing: name the dense ones unless that default already describes them
    out_layer = output_layer(model)
    dense = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    default = [n for n, m in model.named_modules() if m is out_layer and isinstance(m, nn.Linear)]
    qcfg = bnb_quantization_config(quant, double_quant, dtype, None if default and dense == default else dense)
    cfg = hf_config(model, dtype, qcfg, base=config)
    return write_checkpoint(model.state_dict(), output, cfg,
                            tokenizer_from if tokenizer_from is not None else source_folder(model))


class GGUFExportError(UsageError, ValueError):
    """A model save_gguf cannot write as a llama.cpp architecture computing what it computes (the message names
    the model_type and the setting llama.cpp's architecture lacks or fixes otherwise)."""


def _llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf permute): each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _refuse(cfg: LlamaConfig, what: str) -> None:
    """GGUFExportError naming the model_type and `what` (the setting, and what llama.cpp's architecture does)."""
    raise GGUFExportError(f"save_gguf: model_type {cfg.model_type!r} with {what}; nothing was written")


def _check_no_window(cfg: LlamaConfig) -> None:
    """llama.cpp's llama / qwen2 / qwen3 graphs attend to every earlier key: a sliding window would be lost."""
    if cfg.sliding_window is not None:
        _refuse(cfg, f"sliding_window={cfg.sliding_window}: llama.cpp's {GGUF_ARCHS[cfg.model_type].name} "
                     f"architecture has no sliding window, so the file would differ past {cfg.sliding_window} tokens")


def _check_llama(cfg: LlamaConfig) -> None:
    _check_no_window(cfg)
    if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] != "llama3":
        _refuse(cfg, f"rope scaling {cfg.rope_scaling['rope_type']!r} (llama.cpp's llama takes only llama3's)")


def _check_plain_rope(cfg: LlamaConfig) -> None:
    if cfg.rope_scaling is not None:
        _refuse(cfg, f"rope scaling {cfg.rope_scaling['rope_type']!r} (not written for this architecture)")


def _check_qwen3(cfg: LlamaConfig) -> None:
    _check_no_window(cfg)
    if cfg.attention_bias:  # real Qwen3 checkpoints have none; llama.cpp's qwen3 graph adds no q/k/v/o bias
        _refuse(cfg, "attention_bias=True: llama.cpp's qwen3 architecture has no attention biases")
    _check_plain_rope(cfg)


def _check_qwen2(cfg: LlamaConfig) -> None:
    _check_no_window(cfg)
    _check_plain_rope(cfg)


def _check_phi3(cfg: LlamaConfig) -> None:
    if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] != "longrope":
        _refuse(cfg, f"rope scaling {cfg.rope_scaling['rope_type']!r} (llama.cpp's phi3 takes LongRoPE factors)")


GEMMA3_SWA_PATTERN = 6  # llama.cpp's gemma3 fixes it: layer i attends fully iff (i + 1) % 6 == 0, the rest slide


def _check_gemma3(cfg: LlamaConfig) -> None:
    """llama.cpp's gemma3 fixes the layer pattern and the attention scale (1/sqrt(head_dim); hidden/heads for the
    62-layer 27B) and ties the output layer to the embeddings: refuse a model that differs."""
    pattern = ["sliding_attention" if (i + 1) % GEMMA3_SWA_PATTERN else "full_attention"
               for i in range(cfg.num_hidden_layers)]
    if cfg.layer_types != pattern:
        _refuse(cfg, f"layer_types {cfg.layer_types} (sliding_window={cfg.sliding_window}): llama.cpp's gemma3 "
                     f"makes every {GEMMA3_SWA_PATTERN}th layer full and the rest sliding")
    scalar = cfg.hidden_size / cfg.num_attention_heads if cfg.num_hidden_layers == 62 else cfg.head_dim
    if (cfg.query_pre_attn_scalar or cfg.head_dim) != scalar:
        _refuse(cfg, f"query_pre_attn_scalar={cfg.query_pre_attn_scalar}: llama.cpp's gemma3 scales attention "
                     f"by {scalar}^-0.5")
    if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] != "linear":
        _refuse(cfg, f"rope scaling {cfg.rope_scaling['rope_type']!r} (llama.cpp's gemma3 takes linear only)")
    if not cfg.tie_word_embeddings or cfg.attention_bias:
        _refuse(cfg, "an untied output layer or attention biases (llama.cpp's gemma3 has neither)")


def _common_metadata(w, cfg: LlamaConfig) -> None:
    """The keys convert_hf_to_gguf's TextModel writes for every architecture (+ vocab_size, which transformers'
    loader needs without an embedded tokenizer)."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)


def _llama3_rope_factors(cfg: LlamaConfig) -> torch.Tensor:
    """llama.cpp's `rope_freqs` for llama3 rope scaling (LlamaModel.generate_extra_tensors): per rotary pair, the
    divisor of its frequency (1 for short wavelengths, factor for long ones, smooth between): the plain inverse
    frequencies over the scaled ones, both from rope_inv_freq in float64 (as the converter computes), then fp32."""
    plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None), dtype=torch.float64)
    return (plain / rope_inv_freq(cfg, dtype=torch.float64)).float()


def _llama_extras(w, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.rope_scaling is None:
        return {}
    return {"rope_freqs.weight": _llama3_rope_factors(cfg)}


def _no_extras(w, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    return {}


def _phi3_extras(w, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Phi3Model.set_gguf_parameters / generate_extra_tensors: rotary width (partial rotary), the window (0 for
    none, as Phi-4), and with LongRoPE the original length, the cos/sin scale and the two factor tensors."""
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_sliding_window(cfg.sliding_window or 0)
    s = cfg.rope_scaling
    if s is None:
        return {}
    w.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))
    w.add_rope_scaling_attn_factors(float(s["attention_factor"]))
    return {"rope_factors_long.weight": torch.tensor(s["long_factor"], dtype=torch.float32),
            "rope_factors_short.weight": torch.tensor(s["short_factor"], dtype=torch.float32)}


def _gemma3_extras(w, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Gemma3Model.set_gguf_parameters: the window, linear scaling of the full layers' RoPE; the sliding layers'
    base as rope.freq_base_swa (llama.cpp builds that do not read it assume Gemma 3's 10000)."""
    w.add_sliding_window(cfg.sliding_window)
    w.add_rope_freq_base_swa(float(cfg.rope_local_theta or cfg.rope_theta))
    if cfg.rope_scaling is not None:
        w.add_rope_scaling_type(gguf_module().RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    return {}


@dataclasses.dataclass(frozen=True)
class GGUFArch:
    name: str            # llama.cpp's architecture
    permute_qk: bool     # q/k rows reordered for llama.cpp's interleaved RoPE (llama); NEOX-RoPE arches keep them
    norm_shift: float    # added to every *norm.weight: Gemma's (1 + w) norms are stored as 1 + w
    check: Callable      # GGUFExportError for a setting the architecture cannot express
    extras: Callable     # (writer, cfg) -> extra tensors; writes the architecture's own keys


# model_type -> what llama.cpp's convert_hf_to_gguf.py writes for it (Mistral is converted as llama)
GGUF_ARCHS = {
    "llama": GGUFArch("llama", True, 0.0, _check_llama, _llama_extras),
    "mistral": GGUFArch("llama", True, 0.0, _check_llama, _llama_extras),
    "qwen2": GGUFArch("qwen2", False, 0.0, _check_qwen2, _no_extras),
    "qwen3": GGUFArch("qwen3", False, 0.0, _check_qwen3, _no_extras),
    "phi3": GGUFArch("phi3", False, 0.0, _check_phi3, _phi3_extras),
    "gemma3_text": GGUFArch("gemma3", False, 1.0, _check_gemma3, _gemma3_extras),
}


def gguf_module():
    import gguf  # optional peer (the demo/test extras)
    return gguf


def gguf_config(model: nn.Module) -> LlamaConfig:
    """The model's config as ours (LlamaConfig.from_hf_config of hf_config), checked against its GGUF arch."""
    cfg = LlamaConfig.from_hf_config(hf_config(model, torch.float16))
    if cfg.model_type not in GGUF_ARCHS:
        raise GGUFExportError(f"save_gguf: model_type {cfg.model_type!r} has no GGUF architecture here "
                              f"(supported: {sorted(GGUF_ARCHS)})")
    GGUF_ARCHS[cfg.model_type].check(cfg)
    return cfg


def gguf_tensors(sd: dict[str, torch.Tensor], cfg: LlamaConfig, path) -> dict[str, torch.Tensor]:
    """`sd` (HF keys, fp32) under llama.cpp's names for the architecture (gguf's TensorNameMap, the table
    convert_hf_to_gguf maps names by), in llama.cpp's conventions: q/k rows permuted (llama), norms shifted
    (Gemma), the output layer left out when tied."""
    arch = GGUF_ARCHS[cfg.model_type]
    gguf = gguf_module()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], cfg.num_hidden_layers)
    heads = {".attn_q.": cfg.num_attention_heads, ".attn_k.": cfg.num_key_value_heads}
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point() or (k == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        if not bool(torch.isfinite(v).all()):
            raise NonFiniteExportError(f"{k} holds NaN/Inf values; nothing was written to {path}")
        name = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"save_gguf: no llama.cpp name for tensor {k} in architecture {arch.name!r} "
                                  f"(model_type {cfg.model_type!r})")
        if arch.permute_qk:
            for part, n in heads.items():
                if part in name:
                    v = _llama_cpp_permute(v, n)
        if name.endswith("norm.weight"):
            v = v + arch.norm_shift
        out[name] = v
    return out


def save_gguf(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a model of one of the GGUF_ARCHS families (ours or transformers', LoRA adapters folded in, 4-bit
    weights dequantized) as an f16 GGUF file for llama.cpp, as llama.cpp's convert_hf_to_gguf.py writes that
    family: architecture llama (Llama, Mistral), qwen2, qwen3, phi3 or gemma3 (Gemma 3 text); the architecture's
    hyperparameter keys; tensors under llama.cpp's names (token_embd, blk.N.attn_q, ..., Phi-3's fused
    blk.N.attn_qkv and blk.N.ffn_up = [gate; up], Qwen3 / Gemma 3's blk.N.attn_q_norm / attn_k_norm, Gemma 3's
    post_attention_norm / ffn_norm / post_ffw_norm); q/k rows in llama.cpp's rotary order for llama only; Gemma's
    norm weights stored as 1 + w; llama3 rope_freqs and Phi-3's rope_factors_long / rope_factors_short tensors;
    norms and those tensors in float32, the rest f16.

    No tokenizer is embedded: llama.cpp needs one, so this file serves as the weights for a tokenizer taken from
    the source folder. Returns the path. Needs the `gguf` package (the demo/test extras). GGUFExportError for a
    setting the family's llama.cpp architecture cannot express (a sliding window on llama / qwen2 / qwen3, a
    Gemma 3 layer pattern other than llama.cpp's, ...), naming it; NonFiniteExportError for a NaN/Inf weight."""
    gguf = gguf_module()
    cfg = gguf_config(model)
    arch = GGUF_ARCHS[cfg.model_type]
    tensors = gguf_tensors(merged_state_dict(model, torch.float32), cfg, path)
    writer = gguf.GGUFWriter(str(path), arch.name)
    _common_metadata(writer, cfg)
    tensors.update(arch.extras(writer, cfg))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for name, v in tensors.items():
        writer.add_tensor(name, v.to(torch.float32 if v.dim() == 1 else torch.float16).contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
