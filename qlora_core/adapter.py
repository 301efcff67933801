"""`save_adapter` / `load_adapter`: LoRA adapters in PEFT's on-disk format.

A directory holds two files, as `PeftModel.save_pretrained` writes them:
- adapter_config.json: peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha, lora_dropout, target_modules,
  use_rslora, bias "none", base_model_name_or_path, and the LoraConfig fields that PEFT 0.13+ reads with their
  neutral values (fan_in_fan_out false, use_dora false, empty rank/alpha patterns, ...). Only fields known to
  peft 0.13 are written, because older PEFT rejects unknown keys.
- adapter_model.safetensors: `base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight`
  (out, r) in the stored LoRA dtype, with metadata {"format": "pt", "qlora_sha256": <tensors_sha256>}; the
  checksum (which PEFT ignores) lets read_adapter tell a damaged file from a good one.
Module paths are those of `model.named_modules()`, which for a transformers model equal PEFT's, so an adapter
saved here loads with `peft.PeftModel.from_pretrained(hf_model, dir)` and vice versa.

Each file is written to a temporary name in the same directory and moved into place with os.replace, so a
reader sees either the old file or the new one, never half of one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .durable import atomic_write, atomic_write_text
from .errors import FileLoadError, NonFiniteError, UsageError
from .lora import (LoraConfig, LoraConfigError, LoRALinear, TargetModuleError, apply_lora, is_quantized_linear,
                   lora_modules, unload_lora)
from .targets import unmatched_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
SHA_KEY = "qlora_sha256"  # safetensors metadata key: tensors_sha256 of the file's tensors
BASE_KEY = "qlora_base"  # safetensors metadata key: base_format of the model the adapter was trained on (JSON)


class AdapterFileError(FileLoadError, OSError):
    """The adapter directory lacks a file, or a file is not valid JSON / safetensors / PEFT LoRA content."""


class AdapterMismatchError(UsageError, ValueError):
    """The adapter does not fit the model: other modules, other shapes, other rank, or another base model."""


class NonFiniteAdapterError(NonFiniteError, ValueError):
    """An adapter tensor holds NaN or Inf (the message names the tensor)."""


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: the checksum save_adapter records in
    the safetensors metadata (a file cannot hold the hash of its own bytes, so it covers the tensors instead)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """NonFiniteAdapterError naming the first tensor (in name order) that holds NaN or Inf."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteAdapterError(f"{where}: tensor {name!r} holds {bad} NaN/Inf value(s) of {t.numel()}; "
                                        f"the adapter is unusable (a diverged run?)")


def _model_base_name(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None)
    if not name:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name or None


def _uniform(mods: dict[str, LoRALinear], attr: str):
    values = {getattr(m, attr) for m in mods.values()}
    if len(values) != 1:
        raise AdapterMismatchError(f"adapters disagree on {attr} ({sorted(map(str, values))}); PEFT's format "
                                   f"needs one value (rank/alpha patterns are not supported)")
    return values.pop()


def adapter_config_dict(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json content for `model`'s LoRA adapters."""
    mods = lora_modules(model)
    if not mods:
        raise TargetModuleError(f"{type(model).__name__} has no LoRA adapters to save")
    cfg = getattr(model, "lora_config", None)
    if isinstance(cfg, LoraConfig):
        targets = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
    else:  # adapters built by hand: name each wrapped module by its full path (PEFT matches it exactly)
        targets = sorted(mods)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or _model_base_name(model),
        "revision": None,
        "inference_mode": True,
        "r": int(_uniform(mods, "r")),
        "lora_alpha": _uniform(mods, "alpha"),
        "lora_dropout": float(_uniform(mods, "dropout")),
        "target_modules": targets,
        "use_rslora": bool(_uniform(mods, "use_rslora")),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "layer_replication": None,
    }


def base_format(model: nn.Module) -> dict | None:
    """How the adapted layers' base weights were held while training: {"quant": "nf4" | "fp4" | "none",
    "blocksize": int | None, "double_quant": bool | None, "dtype": "bfloat16" | ...} (dtype: the dense or the
    dequantized dtype). None when the adapted layers disagree (a hand-built mix) or the model has no adapters."""
    formats = set()
    for m in lora_modules(model).values():
        base = m.base_layer
        # FlatQuantLinear keeps the format in its layout: reading its weight would gather an FSDP-sharded buffer
        q = getattr(base, "layout", None) or (base.weight if is_quantized_linear(base) else None)
        if q is not None:
            formats.add((q.quant_type, int(q.blocksize), bool(q.double_quant), q.dtype))
        else:
            formats.add(("none", None, None, base.weight.dtype))
    if len(formats) != 1:
        return None
    quant, blocksize, double_quant, dtype = formats.pop()
    return {"quant": quant, "blocksize": blocksize, "double_quant": double_quant,
            "dtype": str(dtype).removeprefix("torch.")}


def read_base_format(directory: str | os.PathLike) -> dict | None:
    """The base_format save_adapter recorded in the adapter's safetensors metadata; None for an adapter written
    elsewhere (PEFT) or before the record existed. AdapterFileError for an unreadable file or record."""
    wpath = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    try:
        with safe_open(wpath, framework="pt", device="cpu") as f:
            text = (f.metadata() or {}).get(BASE_KEY)
        return None if text is None else dict(json.loads(text))
    except Exception as e:
        raise AdapterFileError(f"{wpath}: cannot read the {BASE_KEY} record: {type(e).__name__}: {e}") from None


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                 tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Write `model`'s LoRA adapters to `directory` (created if needed) in PEFT's format.

    base_model_name_or_path defaults to the model's own `name_or_path` (transformers) if it has one. The format
    of the base weights (base_format: quant type, blocksize, double quant, dtype) goes into the safetensors
    metadata under "qlora_base", so a merge can rebuild the 4-bit base the adapter was trained on. tensors:
    module path -> (lora_A, lora_B) to write instead of the modules' own (FSDP training gathers its sharded
    adapters first: distributed.gather_lora). Raises TargetModuleError if the model has no adapters,
    AdapterMismatchError if they disagree on r / alpha / dropout / rslora (PEFT's file has one value of each).
    """
    directory = os.fspath(directory)
    config = adapter_config_dict(model, base_model_name_or_path)
    pairs = tensors if tensors is not None else {n: (m.lora_A, m.lora_B) for n, m in lora_modules(model).items()}
    tensors = {}
    for name, (a, b) in pairs.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a.detach().cpu().contiguous().clone()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b.detach().cpu().contiguous().clone()
    os.makedirs(directory, exist_ok=True)
    meta = {"format": "pt", SHA_KEY: tensors_sha256(tensors)}  # extra metadata keys: PEFT ignores them
    fmt = base_format(model)
    if fmt is not None:  # what `qlora merge` re-creates to merge onto the base the adapter was trained with
        meta[BASE_KEY] = json.dumps(fmt, sort_keys=True)
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda p: save_file(tensors, p, metadata=meta))
    atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) from an adapter directory.

    AdapterFileError for missing or unreadable files, and for tensors whose checksum differs from the one
    save_adapter recorded (adapters written elsewhere carry none and are not checked);
    NonFiniteAdapterError when a tensor holds NaN or Inf.
    """
    directory = os.fspath(directory)
    cpath, wpath = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for p in (cpath, wpath):
        if not os.path.isfile(p):
            raise AdapterFileError(f"missing {p}" + (" (only safetensors adapters are supported, not "
                                                     "adapter_model.bin)" if p == wpath else ""))
    try:
        with open(cpath, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterFileError(f"{cpath} is not valid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{cpath} must hold a JSON object, got {type(config).__name__}")
    try:
        with safe_open(wpath, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError, OSError or ValueError depending on damage
        raise AdapterFileError(f"{wpath} is not a readable safetensors file: {type(e).__name__}: {e}") from None
    if SHA_KEY in meta and tensors_sha256(tensors) != meta[SHA_KEY]:
        raise AdapterFileError(f"{wpath}: the tensors do not match the checksum recorded when the file was written "
                               f"(the file was damaged or changed since)")
    check_finite(tensors, wpath)
    return config, tensors


def _parse_config(config: dict, path: str) -> LoraConfig:
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{path}: peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise AdapterFileError(f"{path}: field {key!r} is missing")
    if config.get("bias", "none") != "none":
        raise AdapterMismatchError(f"{path}: bias={config['bias']!r} is not supported (only 'none')")
    for key in ("fan_in_fan_out", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save",
                "layers_to_transform", "layer_replication", "lora_bias", "target_parameters", "use_qalora",
                "exclude_modules", "trainable_token_indices", "alora_invocation_tokens"):
        if config.get(key) not in (None, False, [], {}):
            raise AdapterMismatchError(f"{path}: {key}={config[key]!r} is not supported")
    try:
        return LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                          lora_dropout=config.get("lora_dropout", 0.0),
                          target_modules=config["target_modules"], use_rslora=bool(config.get("use_rslora", False)))
    except (LoraConfigError, TargetModuleError) as e:
        raise AdapterFileError(f"{path}: {e}") from None


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.<path>.lora_A.weight' -> (path, 'lora_A'); also accepts PEFT's '.lora_A.default.weight'."""
    if not key.startswith(KEY_PREFIX):
        raise AdapterMismatchError(f"unexpected key {key!r}: PEFT LoRA keys start with {KEY_PREFIX!r}")
    body = key[len(KEY_PREFIX):]
    for which in ("lora_A", "lora_B"):
        for tail in (f".{which}.weight", f".{which}.default.weight"):
            if body.endswith(tail):
                return body[: -len(tail)], which
    raise AdapterMismatchError(f"unexpected key {key!r}: only lora_A / lora_B weights are supported")


def load_adapter(model: nn.Module, directory: str | os.PathLike, check_base: bool = True,
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or PEFT's) into `model`, in place; returns the model.

    A model without adapters first gets them from the file's config (apply_lora with its r, lora_alpha,
    lora_dropout, target_modules, use_rslora; A/B in `dtype`, float32 as PEFT by default). A model that
    already has adapters must have them on exactly the adapter's modules with the same r; alpha, dropout and
    rslora are taken from the file. Loaded values are exact for a file stored in the adapters' dtype.
    Raises AdapterFileError (missing / corrupt files, not LoRA) and AdapterMismatchError (modules, shapes, r,
    unsupported PEFT options, or a base_model_name_or_path that differs from the model's when check_base).
    """
    directory = os.fspath(directory)
    config, tensors = read_adapter(directory)
    cfg = _parse_config(config, os.path.join(directory, CONFIG_NAME))

    want: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        path, which = _split_key(key)
        if which in want.setdefault(path, {}):
            raise AdapterMismatchError(f"{directory}: two tensors for {path}.{which}")
        want[path][which] = t
    half = sorted(p for p, d in want.items() if len(d) != 2)
    if half:
        raise AdapterMismatchError(f"{directory}: modules with only one of lora_A / lora_B: {half[:5]}")
    if not want:
        raise AdapterFileError(f"{directory}: {WEIGHTS_NAME} holds no LoRA tensors")

    file_base, model_base = config.get("base_model_name_or_path"), _model_base_name(model)
    if check_base and file_base and model_base and not _same_base(file_base, model_base):
        raise AdapterMismatchError(f"adapter was trained on {file_base!r} but the model is {model_base!r} "
                                   f"(pass check_base=False to load anyway)")

    mods = lora_modules(model)
    merged = sorted(n for n, m in mods.items() if m.merged)
    if merged:
        raise AdapterMismatchError(f"unmerge_lora(model) before loading: merged adapters at {merged[:5]}")
    fresh = not mods
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if fresh:
        known = {name for name, _ in model.named_modules()}
        absent = sorted(set(want) - known)
        if absent:
            raise AdapterMismatchError(f"adapter modules not in {type(model).__name__}: {absent[:5]}")
        targets = cfg.target_modules
        if not isinstance(targets, str):
            # PEFT saves target_modules as the user listed them and only requires one entry to match; the
            # tensors decide which modules this adapter has (checked below), so entries matching nothing drop
            unmatched = set(unmatched_targets(model, targets))
            targets = tuple(t for t in targets if t not in unmatched) or targets
        try:
            apply_lora(model, cfg, target_modules=targets, dtype=dtype)
        except TargetModuleError as e:
            raise AdapterMismatchError(f"adapter does not fit {type(model).__name__}: {e}") from None
        mods = lora_modules(model)
    try:
        if set(mods) != set(want):
            only_model, only_file = sorted(set(mods) - set(want)), sorted(set(want) - set(mods))
            raise AdapterMismatchError(f"LoRA modules differ: in the model only {only_model[:5]}, in the adapter "
                                       f"only {only_file[:5]}")
        for name, m in mods.items():
            a, b = want[name]["lora_A"], want[name]["lora_B"]
            if tuple(a.shape) != tuple(m.lora_A.shape) or tuple(b.shape) != tuple(m.lora_B.shape):
                raise AdapterMismatchError(
                    f"{name}: adapter A {tuple(a.shape)}, B {tuple(b.shape)} but the layer needs A "
                    f"{tuple(m.lora_A.shape)} (r={m.r}, in={m.in_features}), B {tuple(m.lora_B.shape)} "
                    f"(out={m.out_features})")
    except AdapterMismatchError:
        if fresh:  # leave the model as it came in
            unload_lora(model)
            for n, p in model.named_parameters():
                p.requires_grad_(grad_flags.get(n, p.requires_grad))
        raise
    with torch.no_grad():
        for name, m in mods.items():
            m.lora_A.copy_(want[name]["lora_A"])
            m.lora_B.copy_(want[name]["lora_B"])
            m.alpha, m.use_rslora = cfg.alpha, cfg.use_rslora
            m.set_dropout(cfg.dropout)
    if not fresh:
        prev = getattr(model, "lora_config", None)
        model.lora_config = dataclasses.replace(cfg, dtype=prev.dtype if isinstance(prev, LoraConfig)
                                                else torch.float32)
    return model


def _same_base(a: str, b: str) -> bool:
    """Same checkpoint by name: equal paths, or equal last component (a local copy of a hub id)."""
    na, nb = os.path.normpath(a), os.path.normpath(b)
    return na == nb or os.path.basename(na) == os.path.basename(nb)
