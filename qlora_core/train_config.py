"""`TrainConfig`, everything a training run needs (each setting checked as the config is built), and `preflight`,
everything about a run that can be checked before its model loads (output folder, model config, target modules,
data, the checkpoint to resume).

    from qlora_core import train, TrainConfig
    result = train(TrainConfig(model="path/to/hf-folder", data="train.jsonl", output="runs/a", max_steps=200))

`qlora train`'s flags are built from these fields and their metadata["help"] (cli.add_train_args).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from . import data as D
from . import distributed
from .activation_checkpoint import POLICIES
from .adapter import read_adapter
from .defaults import (ADAM_BETAS, DOUBLE_QUANT, DTYPE_NAMES, OPTIM_BITS, QUANT_TYPE, WEIGHT_DECAY, default_dtype,
                       setting)
from .errors import UsageError
from .formats import QUANT_TYPES
from .llama import Llama
from .loading import read_config, resolve_folder
from .lora import LoraConfig, check_targets, resolve_targets
from .optim import max_lr
from .train_checkpoint import METRICS, check_metrics, load_checkpoint


class TrainConfigError(UsageError, ValueError):
    """A TrainConfig setting out of range, or a run that cannot start as configured (the message names it)."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs; `qlora train` flags map 1:1 onto these fields (--max-steps -> max_steps) and onto
    the fields of `lora` (--lora-r -> lora.r, --lora-alpha, --lora-dropout, --target-modules, ...)."""
    model: str = setting("", "HF model folder or hub repo id")
    data: str = setting("", "JSONL file: messages, instruction/response, prompt/completion or text rows "
                            "(docs/data.md)")
    output: str = setting("qlora-out", "directory for adapter files, metrics.jsonl and checkpoints")
    eval_data: str | None = setting(None, "held-out JSONL file; default: eval_fraction of --data")
    eval_fraction: float = setting(0.05, "fraction of records held out for eval when no eval_data (0 = no eval)")
    max_steps: int = setting(-1, "optimizer steps; -1 = derived from epochs")
    epochs: float = setting(1.0, "passes over the training rows (used when max_steps is -1)")
    batch_size: int = setting(4, "rows per micro-batch (with several processes: at most, per process)")
    grad_accum: int = setting(1, "micro-batches per optimizer step; a step is batch_size * grad_accum rows on any "
                                 "process count")
    seq_len: int = setting(512, "tokens per row (samples are truncated to it, packed up to it)")
    lr: float = setting(2e-4, "peak learning rate (after warmup)")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of lr (end of the cosine)")
    warmup_steps: int = setting(-1, "linear warmup steps; -1 = 5% of the steps")
    weight_decay: float = setting(WEIGHT_DECAY, "AdamW decoupled weight decay on the LoRA matrices")
    max_grad_norm: float = setting(1.0, "clip the global grad norm to this (0 = no clipping)")
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig,
                                         metadata={"help": "the adapters (r, alpha, dropout, targets)"})
    quant: str = setting(QUANT_TYPE, "base weights: nf4, fp4 or none (dense)")
    double_quant: bool = setting(DOUBLE_QUANT, "quantize the absmax too (bnb compress_statistics), "
                                               "~0.37 bits/param saved")
    dtype: str = setting("auto", "model dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32")
    device: str = setting("auto", "auto (cuda if available; this rank's GPU under torchrun), cpu, cuda, cuda:1, ...")
    parallel: str = setting("fsdp", "with several processes (torchrun): fsdp (shard weights, LoRA, grads, "
                                    "optimizer) or ddp")
    optim_bits: int = setting(OPTIM_BITS, "PagedAdamW state bits: 8 (bnb-style blockwise) or 32")
    gradient_checkpointing: bool = setting(True, "recompute decoder blocks in backward (off = policy none "
                                                 "everywhere)")
    checkpoint_policy: str = setting("full", "per block: none, save_attn, full or offload "
                                             "(docs: activation_checkpoint.py)")
    memory_budget_gib: float = setting(0.0, "> 0: per-block policies planned to fit this GPU budget in GiB "
                                            "(overrides the policy)")
    host_memory_budget_gib: float = setting(0.0, "with memory_budget_gib: pinned host memory in GiB for offloaded "
                                                 "block inputs (0 = unlimited)")
    mlp_chunk_tokens: int = setting(0, "long context: each block's MLP in sequence chunks of this many tokens "
                                       "(0 = off; a memory budget picks it itself)")
    offload_every: int = setting(1, "policy offload: one host copy of a block input per this many blocks, the rest "
                                    "recomputed (host memory short; a memory budget picks it itself)")
    fused: bool = setting(True, "grouped LoRA projections (ops/nf4_linear.py); off = module by module, the reference "
                                "path")
    pack: bool = setting(True, "concatenate short samples into rows of up to seq_len tokens")
    pack_isolate: bool = setting(True, "packed samples attend only to themselves, positions restart (off: plain "
                                       "causal row)")
    chat_template: bool = setting(True, "use the checkpoint's chat template if it has one (else the plain "
                                        "template)")
    eval_every: int = setting(50, "evaluate every N steps and at the end (0 = only at the end)")
    eval_batch_size: int = setting(8, "samples per eval batch")
    save_every: int = setting(50, "checkpoint every N steps and at the end (0 = only at the end)")
    log_every: int = setting(1, "print a progress line every N steps")
    max_bad_steps: int = setting(5, "stop after this many consecutive steps with non-finite loss or grad norm")
    seed: int = setting(0, "seeds LoRA init, data order and dropout")
    resume: bool = setting(False, "continue from output/checkpoint.json if present")
    overwrite: bool = setting(False, "start over in a non-empty output folder (its earlier run's checkpoints and "
                                     "metrics go)")

    def __post_init__(self):
        if not isinstance(self.lora, LoraConfig):
            raise TrainConfigError(f"lora must be a LoraConfig, got {type(self.lora).__name__}")
        if self.quant not in (*QUANT_TYPES, "none"):
            raise TrainConfigError(f"quant must be nf4, fp4 or none, got {self.quant!r}")
        if self.optim_bits not in (8, 32):
            raise TrainConfigError(f"optim_bits must be 8 or 32, got {self.optim_bits}")
        if self.parallel not in distributed.PARALLEL_MODES:
            raise TrainConfigError(f"parallel must be one of {distributed.PARALLEL_MODES}, got {self.parallel!r}")
        for name in ("batch_size", "grad_accum", "seq_len", "max_bad_steps", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise TrainConfigError(f"max_steps must be positive or -1 (from epochs), got {self.max_steps}")
        if self.max_steps == -1 and not self.epochs > 0:
            raise TrainConfigError(f"epochs must be > 0 when max_steps is -1, got {self.epochs}")
        if self.checkpoint_policy not in POLICIES:
            raise TrainConfigError(f"checkpoint_policy must be none, save_attn, full or offload, "
                                   f"got {self.checkpoint_policy!r}")
        if self.memory_budget_gib < 0:
            raise TrainConfigError(f"memory_budget_gib must be >= 0, got {self.memory_budget_gib}")
        if self.host_memory_budget_gib < 0 or self.mlp_chunk_tokens < 0 or self.offload_every < 1:
            raise TrainConfigError(f"host_memory_budget_gib and mlp_chunk_tokens must be >= 0 and offload_every "
                                   f">= 1, got {self.host_memory_budget_gib}, {self.mlp_chunk_tokens}, "
                                   f"{self.offload_every}")
        # 0 is allowed as torch.optim allows it (a run that only evaluates, or reads the initial adapter)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0):
            raise TrainConfigError(f"lr must be a finite number >= 0, got {self.lr!r}")
        if self.lr > max_lr(ADAM_BETAS[0]):
            raise TrainConfigError(f"lr must be <= {max_lr(ADAM_BETAS[0]):.3g} (AdamW's first step, "
                                   f"lr / (1 - {ADAM_BETAS[0]}), must fit in float32), got {self.lr!r}")
        if not 0 <= self.eval_fraction < 1:
            raise TrainConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise TrainConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.resume and self.overwrite:
            raise TrainConfigError("resume and overwrite contradict each other: --resume continues the run in "
                                   "--output, --overwrite replaces it")
        if self.dtype not in ("auto", *DTYPE_NAMES):
            raise TrainConfigError(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")

    def to_dict(self) -> dict:
        """Plain values (a checkpoint's trainer_state): every field, `lora` as a dict with its dtype by name."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        lora = dataclasses.asdict(self.lora)
        lora["dtype"] = str(lora["dtype"]).removeprefix("torch.")
        if not isinstance(lora["target_modules"], str):
            lora["target_modules"] = list(lora["target_modules"])
        d["lora"] = lora
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of to_dict. Keys no field knows are ignored."""
        names = {f.name for f in dataclasses.fields(cls)} - {"lora"}
        lora_names = {f.name for f in dataclasses.fields(LoraConfig)}
        lora = {k: v for k, v in (d.get("lora") or {}).items() if k in lora_names}
        if isinstance(lora.get("dtype"), str):
            lora["dtype"] = getattr(torch, lora["dtype"])
        if isinstance(lora.get("target_modules"), list):
            lora["target_modules"] = tuple(lora["target_modules"])
        return cls(**{k: v for k, v in d.items() if k in names}, lora=LoraConfig(**lora))


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for cfg: device "auto" is cuda when available (this rank's GPU under torchrun), else cpu;
    dtype "auto" is bfloat16 on CUDA, float32 elsewhere."""
    device = distributed.local_device(cfg.device)
    if cfg.dtype == "auto":
        return device, default_dtype(device)
    return device, DTYPE_NAMES[cfg.dtype]


def check_output(out: Path, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an output folder that would lose data or cannot be written: a file in its place, a non-empty folder
    (an earlier run, whose checkpoints and metrics a fresh start deletes) unless `resume` or `overwrite`, or no
    write permission on it or the folder it would be created in. Raises TrainConfigError."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise TrainConfigError(f"output folder {out} is not empty (an earlier run?); pass --resume to continue "
                               f"it, --overwrite to replace it, or choose another --output")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    # os.access, not a probe file: under torchrun every rank runs this while rank 0 may be creating the folder
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainConfigError(f"cannot write to {existing} (permission denied), so not to output {out}")


def preflight(cfg: TrainConfig) -> None:
    """Everything a run can check before the model's weights load: the output folder (check_output), the model
    folder's config.json, target_modules against the model's module names (a weightless meta-device copy), and
    the data: readable, parseable, and enough records for the eval split. The scalar settings were checked when
    cfg was built. With cfg.resume, the checkpoint's checksums and adapter are verified too. Raises
    TrainConfigError, TargetModuleError, DataFormatError, CheckpointError or a loading error, each naming the
    problem."""
    if not cfg.model or not cfg.data:
        raise TrainConfigError("TrainConfig needs model and data")
    distributed.check_device(cfg.device)
    # a later rank may run this after rank 0 has begun writing the new run (metrics.jsonl): only rank 0 judges
    # whether the folder holds an earlier run; torchrun stops the other ranks when rank 0 fails
    later_rank = int(os.environ.get("RANK", "0")) != 0
    check_output(Path(cfg.output), cfg.resume or later_rank, cfg.overwrite)
    if cfg.resume:  # a damaged checkpoint fails now, not after the model has loaded
        found = load_checkpoint(Path(cfg.output))
        if found is not None:
            read_adapter(found[0])
            check_metrics(Path(cfg.output) / METRICS, found[1]["step"], found[1].get("metrics_record"))
    convs = D.read_jsonl(cfg.data)
    if cfg.eval_data:
        D.read_jsonl(cfg.eval_data)
    else:
        D.split_holdout(convs, cfg.eval_fraction, cfg.seed)
    config = read_config(resolve_folder(cfg.model))
    if cfg.lora.target_modules != "all-linear":
        with torch.device("meta"):
            skeleton = Llama(config)
        check_targets(skeleton, resolve_targets(skeleton, cfg.lora.target_modules))  # Phi-3: fused names
