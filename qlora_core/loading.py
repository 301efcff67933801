"""`load_llama`: an HF Llama-family folder (or hub repo id) -> our `Llama`, quantizing tensor by tensor while
streaming. model_type "llama" (Llama 2/3/3.x, SmolLM), "mistral", "qwen2", "qwen3", "phi3" (Phi-3, Phi-4; its
fused qkv_proj / gate_up_proj load as one linear each) and "gemma3_text" (model_config.py MODEL_TYPES); any
other is a ConfigError.

Design: the model is built on the meta device (no memory), then filled one tensor at a time from safetensors'
memory-mapped `safe_open`. A decoder-block linear weight is read (one dense tensor on the host), moved to the
target device, cast to `dtype`, quantized there (the Triton quantizer on CUDA) and dropped, so peak host and device
memory stay near the quantized model plus one dense tensor. Embeddings, norms and lm_head are kept in `dtype`.

Checkpoints read:
- a single `model.safetensors`, or shards listed in `model.safetensors.index.json`;
- bitsandbytes "bnb-4bit" checkpoints (transformers `save_pretrained` of a 4-bit model): a linear's weight comes as
  `<module>.weight` (packed uint8) plus `weight.absmax`, `weight.quant_map`, [`weight.nested_absmax`,
  `weight.nested_quant_map`] and `weight.quant_state.bitsandbytes__nf4|fp4`; we rebuild it with
  `QuantizedTensor.from_state_dict` and keep it as is (or dequantize it when quantize=None).
Every failure mode we can name gets its own exception (all subclass LoadError, a ValueError).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .defaults import BLOCKSIZE, DOUBLE_QUANT, FLOAT_DTYPES, QUANT_TYPE, default_dtype
from .errors import FileLoadError, NonFiniteError
from .formats import QUANT_TYPES
from .llama import Llama, RMSNorm
from .model_config import ConfigError, LlamaConfig, linear_names
from .qlinear import QuantLinear
from .ops.quant4 import QuantizedTensor, QuantStateError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HUB_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "*.safetensors", INDEX_FILE]
_BNB_BLOB = re.compile(r"\.weight\.quant_state\.bitsandbytes__(nf4|fp4)$")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class LoadError(FileLoadError, ValueError):
    """Base class of every named loading error."""


class MissingShardError(LoadError, FileNotFoundError):
    """A safetensors file named by the index (or model.safetensors itself) is not in the folder."""


class CorruptCheckpointError(LoadError):
    """A safetensors file is truncated or unreadable, or disagrees with the index / quantization metadata."""


class MissingWeightError(LoadError):
    """The checkpoint lacks a tensor the config requires."""


class UnexpectedWeightError(LoadError):
    """The checkpoint holds tensors this Llama has no place for (a different architecture or config)."""


class ShapeMismatchError(LoadError):
    """A tensor's shape differs from what config.json implies."""


class NonFiniteWeightError(NonFiniteError, LoadError):
    """A weight holds NaN or Inf values."""


class UnsupportedCheckpointError(LoadError):
    """A checkpoint quantized in a format other than bitsandbytes 4-bit (8-bit, GPTQ, AWQ, ...)."""


class ModelFolderError(LoadError, FileNotFoundError):
    """The model path is not a folder and cannot be a hub repo id (an absolute or ./ path, a file, ...)."""


class HubUnavailableError(LoadError, OSError):
    """A hub repo id could not be fetched (offline, no network, or no such repo)."""


def load_llama(path_or_repo_id: str | os.PathLike, quantize: str | None = QUANT_TYPE,
               double_quant: bool = DOUBLE_QUANT, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None, blocksize: int = BLOCKSIZE) -> Llama:
    """Load a Llama checkpoint as our `Llama`, its decoder-block linears quantized to `quantize` ("nf4", "fp4") or
    dense (None).

    path_or_repo_id: a local HF folder, or a hub repo id (downloaded with huggingface_hub; config, tokenizer and
    safetensors only). dtype: the dtype of embeddings, norms, lm_head, dense linears and of the quantized weights'
    dequantized values (default: defaults.default_dtype(device), bfloat16 on CUDA, float32 elsewhere).
    device: where the model lives (default CPU). A bnb-4bit checkpoint keeps its own
    quantization (quantize=None dequantizes it instead). The returned model carries `name_or_path` (the folder)
    and `source` (the argument as given).
    """
    if quantize not in (*QUANT_TYPES, None):
        raise ValueError(f"quantize must be 'nf4', 'fp4' or None, got {quantize!r}")
    device = torch.device(device if device is not None else "cpu")
    dtype = default_dtype(device) if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    folder = resolve_folder(path_or_repo_id)
    cfg = read_config(folder)
    _check_quantization_config(folder)
    reader = _Reader(folder)
    try:
        model = _fill(cfg, reader, quantize, double_quant, blocksize, dtype, device)
    finally:
        reader.close()
    model.name_or_path = str(folder)  # the folder read (a hub snapshot for repo ids): tokenizer files are here
    model.source = str(path_or_repo_id)  # what the caller passed (adapter_config's base_model_name_or_path)
    return model


# -- locating the files -----------------------------------------------------------------------------------
def resolve_folder(path_or_repo_id: str | os.PathLike) -> Path:
    """A local folder as is; a string that is not a local path is taken as a hub repo id and downloaded."""
    p = Path(os.path.expanduser(str(path_or_repo_id)))
    if p.is_dir():
        return p
    s = str(path_or_repo_id)
    if p.exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", s) or s.startswith((".", "/")):
        what = "is a file, not a model folder" if p.exists() else "no such folder, and not a hub id (org/name)"
        raise ModelFolderError(f"{s!r}: {what}; a model is a directory with config.json and safetensors, or a "
                               f"hub repo id")
    return _download(s)


def _download(repo_id: str) -> Path:
    # the string may be a mistyped relative path as well as a hub id: every message says both readings failed
    nowhere = f"{repo_id!r}: no such folder, and not a hub id we could fetch"
    try:  # deferred: 0.25 s to import, and only a hub id needs it
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise HubUnavailableError(f"{nowhere} (huggingface_hub is not installed)") from None
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one readable error
        kind = type(e).__name__
        if offline:
            raise HubUnavailableError(
                f"{nowhere}: HF_HUB_OFFLINE=1 is set and the repo is not in the local Hugging Face cache ({kind}). "
                f"Unset HF_HUB_OFFLINE to download it, or pass a local folder.") from e
        if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            raise HubUnavailableError(f"{nowhere}: the hub has no such repo or it is gated ({kind})") from e
        raise HubUnavailableError(
            f"{nowhere}: the Hugging Face Hub cannot be reached ({kind}). Without network, set HF_HUB_OFFLINE=1 "
            f"to use a cached copy, or pass a local folder.") from e


def read_config(folder: Path) -> LlamaConfig:
    """folder/config.json -> LlamaConfig.

    Raises ConfigError, its message prefixed with the file path, when the file is missing, is not valid JSON, or is
    not a supported Llama config.
    """
    f = Path(folder) / "config.json"
    if not f.exists():
        raise ConfigError(f"{f} not found; a model folder needs config.json")
    try:
        d = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from None
    try:
        return LlamaConfig.from_hf_config(d)
    except ConfigError as e:
        raise ConfigError(f"{f}: {e}") from None


def _check_quantization_config(folder: Path) -> None:
    qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config")
    if not qc:
        return
    method = qc.get("quant_method")
    if method == "bitsandbytes" and qc.get("load_in_4bit", not qc.get("load_in_8bit", False)):
        return
    what = "bitsandbytes 8-bit" if method == "bitsandbytes" else repr(method)
    raise UnsupportedCheckpointError(f"{folder}: {what} checkpoints are not supported; load_llama reads dense "
                                     f"safetensors and bitsandbytes 4-bit (nf4/fp4) checkpoints")


class _Reader:
    """key -> tensor across one file or an index of shards, with every file error turned into a named one."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._handles: dict[str, object] = {}
        index = folder / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CorruptCheckpointError(f"{index} is not a valid safetensors index ({e!r})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).exists()]
            if missing:
                raise MissingShardError(f"{folder}: shard(s) {missing} listed in {INDEX_FILE} are missing "
                                        f"({len(files) - len(missing)} of {len(files)} present)")
            self.key_file = dict(weight_map)
            for f in files:  # the index must agree with the shards' own headers
                have = set(self._open(f).keys())
                absent = [k for k, v in weight_map.items() if v == f and k not in have]
                if absent:
                    raise CorruptCheckpointError(f"{folder / f} lacks {len(absent)} tensor(s) that {INDEX_FILE} "
                                                 f"places there, e.g. {absent[:3]}")
        elif (folder / SINGLE_FILE).exists():
            self.key_file = {k: SINGLE_FILE for k in self._open(SINGLE_FILE).keys()}
        else:
            raise MissingShardError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")

        # weights stored as bnb-4bit: "<module>.weight" for every "<module>.weight.quant_state.bitsandbytes__*"
        self.prequantized = {k.split(".quant_state.")[0] for k in self.key_file if _BNB_BLOB.search(k)}

    def _open(self, fname: str):
        if fname not in self._handles:
            try:
                self._handles[fname] = safe_open(str(self.folder / fname), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
                raise CorruptCheckpointError(f"{self.folder / fname} is not a readable safetensors file "
                                             f"(truncated or corrupt?): {e}") from None
        return self._handles[fname]

    def get(self, key: str) -> torch.Tensor:
        fname = self.key_file[key]
        try:
            return self._open(fname).get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(f"{self.folder / fname}: cannot read tensor {key!r} "
                                         f"(truncated or corrupt?): {e}") from None

    def close(self):
        self._handles.clear()


# -- filling the model ------------------------------------------------------------------------------------
def _check_finite(key: str, t: torch.Tensor) -> None:
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)  # one reduction pass; NaN and +-Inf propagate into min/max
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteWeightError(f"{key}: {bad} of {t.numel()} values are NaN or Inf")


def _take(reader: _Reader, used: set, key: str, shape: tuple, dtype, device) -> torch.Tensor:
    if key not in reader.key_file:
        raise MissingWeightError(f"{reader.folder}: tensor {key!r} is missing from the checkpoint")
    t = reader.get(key)
    used.add(key)
    if not t.is_floating_point():
        raise UnsupportedCheckpointError(f"{key}: stored as {t.dtype} without a bnb-4bit quant_state; only float "
                                         f"tensors and bitsandbytes 4-bit weights are supported")
    if tuple(t.shape) != tuple(shape):
        raise ShapeMismatchError(f"{key}: checkpoint shape {tuple(t.shape)} but config.json implies {tuple(shape)}")
    _check_finite(key, t)
    return t.to(device=device, dtype=dtype)


def _take_quantized(reader: _Reader, used: set, key: str, shape: tuple, device) -> QuantizedTensor:
    """Rebuild a bnb-4bit weight from its `<key>` + `<key>.*` tensors."""
    prefix = key[: -len("weight")]
    keys = [k for k in reader.key_file if k == key or k.startswith(key + ".")]
    sd = {k: reader.get(k) for k in keys}
    used.update(keys)
    try:
        q = QuantizedTensor.from_state_dict(sd, prefix)
    except QuantStateError as e:
        raise CorruptCheckpointError(f"{reader.folder}: bad bnb-4bit state for {key}: {e}") from None
    if tuple(q.shape) != tuple(shape):
        raise ShapeMismatchError(f"{key}: quantized checkpoint shape {tuple(q.shape)} but config.json implies "
                                 f"{tuple(shape)}")
    for name, t in (("absmax", q.absmax), ("nested_absmax", q.nested_absmax), ("offset", q.offset)):
        if t is not None:
            _check_finite(f"{key}.{name}", t)
    return q.to(device)


def _set_param(module: nn.Module, name: str, t: torch.Tensor) -> None:
    module._parameters[name] = nn.Parameter(t, requires_grad=t.is_floating_point())


def _linear(reader: _Reader, used: set, path: str, lin: nn.Linear, quantize, double_quant, blocksize, dtype,
            device) -> nn.Module:
    """The module for the meta nn.Linear `lin` at `path`: a bnb-4bit weight as a QuantLinear (dequantized into
    `lin` when quantize is None); a dense one quantized by QuantLinear.from_linear, or kept dense. The dense weight
    lives only inside this call (peak: one dense tensor beside the model)."""
    key = f"{path}.weight"
    if lin.bias is not None:
        _set_param(lin, "bias", _take(reader, used, f"{path}.bias", lin.bias.shape, dtype, device))
    if key in reader.prequantized:
        q = _take_quantized(reader, used, key, lin.weight.shape, device)
        if quantize is not None:
            return QuantLinear(q, lin.bias)
        _set_param(lin, "weight", q.dequantize().to(dtype))
        return lin
    _set_param(lin, "weight", _take(reader, used, key, lin.weight.shape, dtype, device))
    if quantize is None:
        return lin
    return QuantLinear.from_linear(lin, quantize, blocksize, double_quant)


def _fill(cfg: LlamaConfig, reader: _Reader, quantize, double_quant, blocksize, dtype, device) -> Llama:
    with torch.device("meta"):
        model = Llama(cfg, dtype=dtype)
    used: set[str] = set()
    emb = model.model.embed_tokens
    _set_param(emb, "weight", _take(reader, used, "model.embed_tokens.weight", emb.weight.shape, dtype, device))
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        for norm, m in layer.named_modules():  # input/post_attention_layernorm; self_attn.q_norm/k_norm (qk_norm)
            if isinstance(m, RMSNorm):
                _set_param(m, "weight", _take(reader, used, f"{p}{norm}.weight", m.weight.shape, dtype, device))
        for name in linear_names(cfg):
            parent_name, child = name.split(".")
            parent = getattr(layer, parent_name)
            setattr(parent, child, _linear(reader, used, f"{p}{name}", getattr(parent, child), quantize,
                                           double_quant, blocksize, dtype, device))
    norm = model.model.norm
    _set_param(norm, "weight", _take(reader, used, "model.norm.weight", norm.weight.shape, dtype, device))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        used.add("lm_head.weight")  # transformers may save the tied copy too; the embedding wins
    else:
        _set_param(model.lm_head, "weight",
                   _take(reader, used, "lm_head.weight", model.lm_head.weight.shape, dtype, device))
    extra = sorted(k for k in reader.key_file if k not in used and not _IGNORED.search(k))
    if extra:
        raise UnexpectedWeightError(f"{reader.folder}: {len(extra)} tensor(s) do not belong to a Llama with this "
                                    f"config.json, e.g. {extra[:5]}")
    return model
