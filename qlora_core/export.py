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

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .adapter import load_adapter, read_adapter, read_base_format
from .defaults import BLOCKSIZE, DOUBLE_QUANT, QUANT_TYPE
from .durable import replace_dir
from .errors import NonFiniteError, UsageError
from .loading import load_llama, resolve_folder
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


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf permute): each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def save_gguf(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a Llama-family model (ours or transformers', LoRA adapters folded in, 4-bit weights dequantized) as an
    f16 GGUF file for llama.cpp: architecture "llama", the llama.* hyperparameters of its config, tensors under
    llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output; q/k rows in llama.cpp's rotary order;
    norms in float32, as llama.cpp's converter writes them). No tokenizer is embedded: llama.cpp needs one, so
    this file serves as the weights for a tokenizer taken from the source folder. Returns the path. Needs the
    `gguf` package (the demo/test extras). NonFiniteExportError for a NaN/Inf weight."""
    import gguf  # optional peer
    cfg = hf_config(model, torch.float16)
    sd = merged_state_dict(model, torch.float32)
    heads, kv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    rope = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    tensors = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            continue
        if not bool(torch.isfinite(v).all()):
            raise NonFiniteExportError(f"{k} holds NaN/Inf values; nothing was written to {path}")
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        elif k == "lm_head.weight":
            if cfg.get("tie_word_embeddings"):
                continue
            name = "output.weight"
        else:
            parts = k.split(".")  # model.layers.N.<module path>.weight
            if parts[:2] != ["model", "layers"] or ".".join(parts[3:-1]) not in GGUF_NAMES:
                raise ValueError(f"save_gguf: no llama.cpp name for tensor {k}")
            name = f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
            if name.endswith("attn_q.weight"):
                v = _llama_cpp_permute(v, heads)
            elif name.endswith("attn_k.weight"):
                v = _llama_cpp_permute(v, kv)
        tensors[name] = v.to(torch.float32 if v.dim() == 1 else torch.float16).contiguous().numpy()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_vocab_size(int(cfg["vocab_size"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for name, arr in tensors.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)

