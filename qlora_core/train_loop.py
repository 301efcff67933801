"""`train(cfg)`: the QLoRA training loop, written to be read top to bottom.

    from qlora_core import train, TrainConfig
    result = train(TrainConfig(model="path/to/hf-folder", data="train.jsonl", output="runs/a", max_steps=200))

One step = grad_accum micro-batches of batch_size rows (data.py: chat-formatted, response-only labels, packed).
The loss is the mean over every label token of the whole step (each micro-batch's summed loss is divided by the
step's label count before backward, so accumulation gives the same gradient as one big batch). Then: clip the
global grad norm, PagedAdamW (8-bit states by default), cosine schedule with linear warmup.
train() reads as its steps: setup (data, model, wrapping, optimizer, resume), then per step next_batch,
forward_backward, train_step (reduce, clip, update), maybe_evaluate, checkpoint.

Several processes (torchrun, distributed.py): each rank takes a contiguous 1/N of every step's rows (the global
batch stays batch_size * grad_accum rows), runs them in micro-batches of at most batch_size, and FSDP2 (default)
or DDP averages the gradients; losses, skip decisions and eval sums are reduced over ranks; only rank 0 prints and
writes metrics.jsonl, checkpoints and adapters. Dropout masks come from (seed, step, rank), and optimizer state is
saved per shard (optim_shards.py), so a run resumes on any process count.

Memory choices (the point of QLoRA):
- decoder linears are frozen NF4 (QuantLinear); only LoRA A/B train; each block is recomputed in backward
  (gradient checkpointing), so activations are one block's plus one (B, T, d) tensor per block;
- logits are never materialized for the whole batch: the lm_head and cross entropy run only on positions that
  carry a label, in chunks of LOSS_CHUNK_ELEMS logits, each chunk recomputed in backward (at Llama-3's 128k vocab
  a full (4, 2048) batch of fp32 logits would be 4.2 GB).

Robustness:
- a non-finite loss or grad norm skips the step (no update; the data is consumed) and, after max_bad_steps in a
  row, stops the run with a message instead of silently training on garbage;
- checkpoints (adapter, optimizer, scheduler, RNG states, data position, step) are written into a fresh directory
  that is renamed into place, then a small pointer file `checkpoint.json` is replaced atomically: a run killed at
  any moment finds either the old or the new checkpoint, whole, and `resume=True` continues bit-exactly (same data
  order, dropout masks, optimizer state). metrics.jsonl lines past the checkpoint are dropped on resume.
- checkpoint.json records the sha256 of every file of the checkpoint; resume verifies them, the adapter's own
  checksum and that no adapter or optimizer tensor is NaN/Inf before it continues (CheckpointError otherwise).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from . import distributed
from .defaults import DOUBLE_QUANT, OPTIM_BITS, QUANT_TYPE, WEIGHT_DECAY, default_dtype
from .distributed import PARALLEL_MODES, World
from .durable import atomic_write, atomic_write_text, fsync_dir, fsync_file, fsync_tree
from .errors import FileLoadError, NonFiniteError, UsageError
from .lora import LoraConfig

LOSS_CHUNK_ELEMS = 1 << 27  # logits per loss chunk (fp32: 512 MiB); bounds the lm_head/CE peak at any vocab
POINTER = "checkpoint.json"
METRICS = "metrics.jsonl"


class TrainConfigError(UsageError, ValueError):
    """A TrainConfig setting out of range, or a run that cannot start as configured (the message names it)."""


class CheckpointError(FileLoadError, ValueError):
    """A training checkpoint (checkpoint.json and the files it names) that is missing, damaged or inconsistent."""


class NonFiniteCheckpointError(NonFiniteError, ValueError):
    """A checkpoint's optimizer state holds NaN or Inf (the message names the tensor)."""


def _default_lora() -> LoraConfig:
    return LoraConfig()  # defaults.py: r, alpha, dropout and all seven projections


# The LoRA settings' names from before TrainConfig held a LoraConfig: still taken as keywords (TrainConfig(lora_r=8))
# and read from old checkpoints' config dicts.
LEGACY_LORA_FIELDS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                      "target_modules": "target_modules"}


def parse_targets(text: str | Sequence[str]) -> tuple[str, ...] | str:
    """target_modules as flags and old configs give it: "all-linear" as is, else a tuple of the comma-separated
    names ("q_proj, v_proj" or ["q_proj,v_proj", "gate_proj"])."""
    parts = [text] if isinstance(text, str) else list(text)
    names = tuple(n.strip() for part in parts for n in part.split(",") if n.strip())
    return "all-linear" if names == ("all-linear",) else names


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs; `qlora train` flags map 1:1 onto these fields (--max-steps -> max_steps) and onto
    the fields of `lora` (--lora-r -> lora.r, --lora-alpha, --lora-dropout, --target-modules, ...)."""
    model: str = ""  # HF model folder or hub repo id
    data: str = ""  # JSONL file: messages, instruction/response, prompt/completion or text rows (docs/data.md)
    output: str = "qlora-out"  # directory for adapter files, metrics.jsonl and checkpoints
    eval_data: str | None = None  # held-out JSONL file; default: eval_fraction of --data
    eval_fraction: float = 0.05  # fraction of records held out for eval when no eval_data (0 = no eval)
    max_steps: int = -1  # optimizer steps; -1 = derived from epochs
    epochs: float = 1.0  # passes over the training rows (used when max_steps is -1)
    batch_size: int = 4  # rows per micro-batch (with several processes: at most, per process)
    grad_accum: int = 1  # micro-batches per optimizer step; a step is batch_size * grad_accum rows on any process count
    seq_len: int = 512  # tokens per row (samples are truncated to it, packed up to it)
    lr: float = 2e-4  # peak learning rate (after warmup)
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr (end of the cosine)
    warmup_steps: int = -1  # linear warmup steps; -1 = 5% of the steps
    weight_decay: float = WEIGHT_DECAY  # AdamW decoupled weight decay on the LoRA matrices
    max_grad_norm: float = 1.0  # clip the global grad norm to this (0 = no clipping)
    lora: LoraConfig = dataclasses.field(default_factory=_default_lora)  # the adapters (r, alpha, dropout, targets)
    quant: str = QUANT_TYPE  # base weights: nf4, fp4 or none (dense)
    double_quant: bool = DOUBLE_QUANT  # quantize the absmax too (bnb compress_statistics), ~0.37 bits/param saved
    dtype: str = "auto"  # model dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32
    device: str = "auto"  # auto (cuda if available; this rank's GPU under torchrun), cpu, cuda, cuda:1, ...
    parallel: str = "fsdp"  # with several processes (torchrun): fsdp (shard weights, LoRA, grads, optimizer) or ddp
    optim_bits: int = OPTIM_BITS  # PagedAdamW state bits: 8 (bnb-style blockwise) or 32
    gradient_checkpointing: bool = True  # recompute decoder blocks in backward (off = policy none everywhere)
    checkpoint_policy: str = "full"  # per block: none, save_attn, full or offload (docs: checkpointing.py)
    memory_budget_gib: float = 0.0  # > 0: per-block policies planned to fit this GPU budget (overrides the policy)
    fused: bool = True  # grouped LoRA projections (fused_lora.py); off = module by module, the reference path
    pack: bool = True  # concatenate short samples into rows of up to seq_len tokens
    pack_isolate: bool = True  # packed samples attend only to themselves, positions restart (off: plain causal row)
    chat_template: bool = True  # use the checkpoint's chat template if it has one (else the plain template)
    eval_every: int = 50  # evaluate every N steps and at the end (0 = only at the end)
    eval_batch_size: int = 8  # samples per eval batch
    save_every: int = 50  # checkpoint every N steps and at the end (0 = only at the end)
    log_every: int = 1  # print a progress line every N steps
    max_bad_steps: int = 5  # stop after this many consecutive steps with non-finite loss or grad norm
    seed: int = 0  # seeds LoRA init, data order and dropout
    resume: bool = False  # continue from output/checkpoint.json if present
    overwrite: bool = False  # start over in a non-empty output folder (its earlier run's checkpoints and metrics go)
    lora_r: dataclasses.InitVar[int | None] = None
    lora_alpha: dataclasses.InitVar[float | None] = None
    lora_dropout: dataclasses.InitVar[float | None] = None
    target_modules: dataclasses.InitVar[str | Sequence[str] | None] = None

    def __post_init__(self, lora_r, lora_alpha, lora_dropout, target_modules):
        legacy = {k: v for k, v in zip(LEGACY_LORA_FIELDS, (lora_r, lora_alpha, lora_dropout, target_modules))
                  if v is not None}
        if legacy:
            if "target_modules" in legacy:
                legacy["target_modules"] = parse_targets(legacy["target_modules"])
            self.lora = dataclasses.replace(self.lora, **{LEGACY_LORA_FIELDS[k]: v for k, v in legacy.items()})
        if not isinstance(self.lora, LoraConfig):
            raise TrainConfigError(f"lora must be a LoraConfig, got {type(self.lora).__name__}")
        if self.quant not in ("nf4", "fp4", "none"):
            raise TrainConfigError(f"quant must be nf4, fp4 or none, got {self.quant!r}")
        if self.optim_bits not in (8, 32):
            raise TrainConfigError(f"optim_bits must be 8 or 32, got {self.optim_bits}")
        if self.parallel not in PARALLEL_MODES:
            raise TrainConfigError(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        for name in ("batch_size", "grad_accum", "seq_len", "max_bad_steps", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise TrainConfigError(f"max_steps must be positive or -1 (from epochs), got {self.max_steps}")
        if self.max_steps == -1 and not self.epochs > 0:
            raise TrainConfigError(f"epochs must be > 0 when max_steps is -1, got {self.epochs}")
        if self.checkpoint_policy not in ("none", "save_attn", "full", "offload"):
            raise TrainConfigError(f"checkpoint_policy must be none, save_attn, full or offload, "
                                   f"got {self.checkpoint_policy!r}")
        if self.memory_budget_gib < 0:
            raise TrainConfigError(f"memory_budget_gib must be >= 0, got {self.memory_budget_gib}")
        # 0 is allowed as torch.optim allows it (a run that only evaluates, or reads the initial adapter)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0):
            raise TrainConfigError(f"lr must be a finite number >= 0, got {self.lr!r}")
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
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
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
        """Inverse of to_dict; also reads the loose lora_r / lora_alpha / lora_dropout / target_modules of configs
        saved before TrainConfig held a LoraConfig. Keys no field knows are ignored."""
        names = {f.name for f in dataclasses.fields(cls)} - {"lora"}
        lora_names = {f.name for f in dataclasses.fields(LoraConfig)}
        lora = {k: v for k, v in (d.get("lora") or {}).items() if k in lora_names}
        if isinstance(lora.get("dtype"), str):
            lora["dtype"] = getattr(torch, lora["dtype"])
        if isinstance(lora.get("target_modules"), list):
            lora["target_modules"] = tuple(lora["target_modules"])
        for old, new in LEGACY_LORA_FIELDS.items():
            if old in d:
                lora[new] = parse_targets(d[old]) if old == "target_modules" else d[old]
        return cls(**{k: v for k, v in d.items() if k in names}, lora=dataclasses.replace(_default_lora(), **lora))


# The legacy names read through to `lora` (TrainConfig().lora_r == 16), so old code reading them does not get the
# InitVar's None. Set after the class is built: the dataclass __init__ has already captured its None defaults.
for _old, _new in LEGACY_LORA_FIELDS.items():
    setattr(TrainConfig, _old, property(lambda self, _n=_new: getattr(self.lora, _n),
                                        doc=f"Read-only alias of lora.{_new}."))


@dataclasses.dataclass
class TrainResult:
    """What train() returns: the model (eval mode) with its trained adapters, the tokenizer and the run's record."""
    model: torch.nn.Module  # the Llama with trained LoRA adapters (train mode off)
    tokenizer: D.TextTokenizer
    steps: int  # optimizer steps done (skipped steps included)
    losses: list  # train loss per step of this process (None for skipped steps)
    evals: list  # (step, eval_loss, eval_ppl)
    stopped: str | None  # None when the run reached its last step, else why it stopped


# -- setup --------------------------------------------------------------------------------------------------------
def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for cfg: device "auto" is cuda when available (this rank's GPU under torchrun), else cpu;
    dtype "auto" is bfloat16 on CUDA, float32 elsewhere."""
    device = distributed.local_device(cfg.device)
    if cfg.dtype == "auto":
        return device, default_dtype(device)
    return device, getattr(torch, cfg.dtype)


def load_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
    """Our Llama (frozen, quantized per cfg.quant) with fresh LoRA adapters per cfg.lora (A and B in fp32 unless
    cfg.lora.dtype says otherwise)."""
    from .loading import load_llama
    from .lora import apply_lora

    model = load_llama(cfg.model, quantize=None if cfg.quant == "none" else cfg.quant,
                       double_quant=cfg.double_quant, dtype=dtype, device=device)
    lc = cfg.lora
    counts = apply_lora(model, lc)
    plan = apply_policy(model, cfg.checkpoint_policy if cfg.gradient_checkpointing else "none",
                        cfg.memory_budget_gib or None)
    if int(os.environ.get("RANK", "0")) == 0:
        print(plan)
    for m in model.modules():
        if hasattr(m, "fuse_projections"):
            m.fuse_projections = cfg.fused
    return model, counts


def apply_policy(model, policy: str, budget_gib: float | None = None) -> str:
    """Set the model's activation checkpointing: `policy` (checkpointing.POLICIES) for every block, or, with
    budget_gib, a MemoryBudget that plans per-block policies at the first step. Returns a one-line description."""
    from .checkpointing import POLICIES, MemoryBudget

    if budget_gib:
        if not budget_gib > 0:
            raise ValueError(f"memory budget must be > 0 GiB, got {budget_gib}")
        model.model.checkpoint_policy = MemoryBudget(float(budget_gib))
        return f"checkpointing: planned per block for a {budget_gib:g} GiB GPU budget at the first step"
    if policy not in POLICIES:
        raise ValueError(f"checkpoint_policy must be one of {POLICIES}, got {policy!r}")
    model.model.checkpoint_policy = policy
    return f"checkpointing: {policy} for all {len(model.model.layers)} blocks"


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
    from .llama import Llama
    from .loading import read_config
    from .lora import check_targets

    if not cfg.model or not cfg.data:
        raise TrainConfigError("TrainConfig needs model and data")
    distributed.check_device(cfg.device)
    # a later rank may run this after rank 0 has begun writing the new run (metrics.jsonl): only rank 0 judges
    # whether the folder holds an earlier run; torchrun stops the other ranks when rank 0 fails
    later_rank = int(os.environ.get("RANK", "0")) != 0
    check_output(Path(cfg.output), cfg.resume or later_rank, cfg.overwrite)
    if cfg.resume:  # a damaged checkpoint fails now, not after the model has loaded
        from .adapter import read_adapter
        found = load_checkpoint(Path(cfg.output))
        if found is not None:
            read_adapter(found[0])
            check_metrics(Path(cfg.output) / METRICS, found[1]["step"], found[1].get("metrics_record"))
    convs = D.read_jsonl(cfg.data)
    if cfg.eval_data:
        D.read_jsonl(cfg.eval_data)
    else:
        D.split_holdout(convs, cfg.eval_fraction, cfg.seed)
    config = read_config(_model_folder(cfg.model))
    if cfg.lora.target_modules != "all-linear":
        with torch.device("meta"):
            skeleton = Llama(config)
        check_targets(skeleton, cfg.lora.target_modules)


def load_data(cfg: TrainConfig, tok: D.TextTokenizer) -> tuple[list, list, dict]:
    """(training rows, eval samples, counts)."""
    convs = D.read_jsonl(cfg.data)
    if cfg.eval_data:
        train_convs, eval_convs = convs, D.read_jsonl(cfg.eval_data)
    else:
        train_convs, eval_convs = D.split_holdout(convs, cfg.eval_fraction, cfg.seed)
    samples, counts = D.encode_all(tok, train_convs, cfg.seq_len)
    if not samples:
        raise D.DataFormatError(f"{cfg.data}: no training sample has a response token within seq_len={cfg.seq_len}")
    rows = D.pack(samples, cfg.seq_len) if cfg.pack else samples
    eval_samples, _ = D.encode_all(tok, eval_convs, cfg.seq_len)
    counts.update(rows=len(rows), eval_samples=len(eval_samples))
    return rows, eval_samples, counts


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup 0 -> 1 over `warmup` steps, then cosine 1 -> min_ratio at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- the loss -----------------------------------------------------------------------------------------------------
def batch_loss(model, ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
               document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(summed next-token cross entropy over label positions, number of label positions) for one micro-batch.

    ids, labels (B, T); the label of position t+1 is predicted at t. Only the N label positions reach the lm_head,
    in chunks of LOSS_CHUNK_ELEMS // vocab rows (kernels/fused_linear_ce.py: on the GPU the gradients are made
    chunk by chunk in forward, so no (N, vocab) logits exist; on the CPU each chunk is recomputed in backward).
    position_ids and document_ids (B, T) (data.collate_positions): packed rows with attention kept inside each sample.
    """
    from .kernels.fused_linear_ce import fused_linear_cross_entropy

    hidden = model.model(ids, position_ids=position_ids, document_ids=document_ids)  # (B, T, d)
    y = labels[:, 1:]
    sel = y != D.IGNORE_INDEX
    h = hidden[:, :-1][sel]  # (N, d)
    y = y[sel]  # (N,)
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    return fused_linear_cross_entropy(h, model.lm_head.weight, y, D.IGNORE_INDEX, LOSS_CHUNK_ELEMS), n


class LossModule(nn.Module):
    """`model` and batch_loss as one module: forward(ids, labels, position_ids, document_ids) -> (loss sum, labels).

    The unit that several processes wrap (distributed.wrap): DDP needs the step to go through a wrapper's forward,
    and under FSDP2 it is the root whose forward hook gathers the final norm and the lm_head weight that
    batch_loss reads directly.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, labels, position_ids=None, document_ids=None):
        """ids, labels (B, T); position_ids, document_ids (B, T) or None -> batch_loss(model, ...)."""
        return batch_loss(self.model, ids, labels, position_ids, document_ids)


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, samples: list, pad_id: int, batch_size: int, device, dtype,
             world: World | None = None) -> tuple[float, float]:
    """(mean loss per label token, perplexity) over `samples` (not packed).

    model: a Llama, or the loss module train() runs (LossModule, DDP- or FSDP-wrapped). With several processes
    each rank takes every world.size-th sample and the sums are added over ranks; every rank runs the same number
    of batches (an FSDP forward gathers weights with the others), a rank out of samples runs an ignored dummy one.
    """
    world = world or World(device=torch.device(device))
    from torch.nn.parallel import DistributedDataParallel
    run_loss = model if isinstance(model, (LossModule, DistributedDataParallel)) else LossModule(model)
    mine = samples[world.rank::world.size]
    rounds = -(-(-(-len(samples) // world.size)) // batch_size)
    was = run_loss.training
    run_loss.eval()
    tot, n = 0.0, 0
    try:
        for i in range(rounds):
            part = mine[i * batch_size:(i + 1) * batch_size]
            ids, labels = D.collate(part or samples[:1], pad_id)
            if not part:
                labels.fill_(D.IGNORE_INDEX)
            with _autocast(device, dtype):
                s, k = run_loss(ids.to(device), labels.to(device))
            tot, n = tot + float(s), n + k
    finally:
        run_loss.train(was)
    tot, n = world.sum([tot, n])
    loss = tot / max(n, 1)
    return loss, math.exp(min(loss, 700.0))


# -- checkpoints --------------------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def save_checkpoint(out: Path, step: int, model, opt_state: dict, trainer_state: dict,
                    lora: dict | None = None) -> Path:
    """Write checkpoints/step-N as a whole (temp dir + rename), then point checkpoint.json at it; drop older ones.

    opt_state: the optimizer's state in checkpoint form (optim_shards.gather_state); trainer_state: step, scheduler,
    rng, data_position, bad_streak, config, world_size; lora: gathered adapter tensors (module path -> (A, B)) when
    the model's own are sharded, else None.
    """
    from .adapter import save_adapter

    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=root))
    save_adapter(model, tmp, trainer_state["config"]["model"], tensors=lora)
    torch.save(opt_state, tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    fsync_tree(tmp)  # every file on disk before the directory gets its final name
    sums = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step saved by an earlier, killed process: the pointer may not name it yet
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    pointer = {"step": step, "path": f"checkpoints/{final.name}", "sha256": sums}
    if (out / METRICS).is_file():  # metrics.jsonl up to this step: resume verifies it and cuts the file there
        fsync_file(out / METRICS)  # on disk before the pointer records it, or a power loss strands the checkpoint
        pointer["metrics"] = {"bytes": (out / METRICS).stat().st_size, "sha256": file_sha256(out / METRICS)}
    atomic_write_text(out / POINTER, json.dumps(pointer) + "\n")
    for old in root.iterdir():
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(out: Path) -> tuple[Path, dict] | None:
    """(checkpoint directory, trainer_state dict) named by out/checkpoint.json, or None without a pointer file.

    Every file the pointer lists a sha256 for must be there with that hash (pointers written before checksums
    list none). trainer_state holds step, scheduler, rng, data_position, bad_streak, config
    (TrainConfig.to_dict(); older checkpoints: the loose form TrainConfig.from_dict reads) and world_size; it is
    read with torch.load(weights_only=True) (tensors and plain containers only, no arbitrary unpickling). The
    pointer's record of metrics.jsonl (bytes and sha256 of the file at the checkpoint) is added to it as
    "metrics_record". CheckpointError for a pointer, file or state that is missing, damaged or inconsistent.
    """
    p = out / POINTER
    if not p.exists():
        return None
    try:
        ptr = json.loads(p.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(ptr, dict) or not isinstance(ptr.get("path"), str) or not isinstance(ptr.get("step"), int):
        raise CheckpointError(f"{p} must be an object with a string 'path' and an integer 'step'")
    sums = ptr.get("sha256", {})
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise CheckpointError(f"{p}: 'sha256' must map file names to hex digests")
    root = (out / "checkpoints").resolve()
    ck = (out / ptr["path"]).resolve()
    if ck.parent != root:
        raise CheckpointError(f"{p} points at {ptr['path']!r}, which is not a folder in {out / 'checkpoints'}")
    if not ck.is_dir():
        raise CheckpointError(f"{p} points at {ck}, which does not exist (deleted?); remove {p} to start over")
    for name, want in sorted(sums.items()):
        f = ck / name
        if f.parent != ck or not f.is_file():
            raise CheckpointError(f"checkpoint {ck} lacks {name!r}, which {p} lists")
        if file_sha256(f) != want:
            raise CheckpointError(f"{f} does not match the sha256 recorded in {p}: the file was damaged or "
                                  f"changed after it was written")
    st = _torch_load(ck / "trainer_state.pt")
    need = {"step": int, "scheduler": dict, "rng": dict, "data_position": int, "bad_streak": int, "config": dict}
    bad = [k for k, t in need.items() if not isinstance(st.get(k) if isinstance(st, dict) else None, t)]
    if bad:
        raise CheckpointError(f"{ck / 'trainer_state.pt'}: field(s) {bad} missing or of the wrong type")
    if st["step"] != ptr["step"]:
        raise CheckpointError(f"{p} says step {ptr['step']} but {ck / 'trainer_state.pt'} holds step {st['step']}")
    rec = ptr.get("metrics")
    if rec is not None:
        if (not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int) or rec["bytes"] < 0
                or not isinstance(rec.get("sha256"), str)):
            raise CheckpointError(f"{p}: 'metrics' must hold an integer 'bytes' and a 'sha256'")
        st["metrics_record"] = rec
    return ck, st


def _torch_load(path: Path):
    """torch.load(weights_only=True) with every failure of a damaged file as a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling damage surfaces as many types
        raise CheckpointError(f"{path} is not a readable checkpoint file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None


def check_state_finite(state, where: str, path: str = "") -> None:
    """NonFiniteCheckpointError naming the first floating tensor in a nested dict / list that holds NaN or Inf."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and state.numel() and not bool(torch.isfinite(state).all()):
            raise NonFiniteCheckpointError(f"{where}: tensor {path or '<root>'} holds NaN/Inf values")
    elif isinstance(state, dict):
        for k, v in state.items():
            check_state_finite(v, where, f"{path}.{k}" if path else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            check_state_finite(v, where, f"{path}[{i}]")


def check_metrics(path: Path, last_step: int, record: dict | None) -> None:
    """CheckpointError unless metrics.jsonl starts with the bytes the checkpoint at last_step recorded (record:
    load_checkpoint's "metrics_record"; None, from checkpoints that predate it, checks nothing)."""
    if record is None:
        return
    n = record["bytes"]
    size = path.stat().st_size if path.is_file() else 0
    if size < n:
        raise CheckpointError(f"{path} holds {size} bytes but the checkpoint at step {last_step} recorded {n}: "
                              f"metrics were lost since; remove checkpoint.json to start over")
    with open(path, "rb") as f:
        if hashlib.sha256(f.read(n)).hexdigest() != record["sha256"]:
            raise CheckpointError(f"{path}: the lines up to step {last_step} differ from what the checkpoint "
                                  f"recorded (the file was damaged or edited)")


def _restore_metrics(path: Path, last_step: int, record: dict | None) -> None:
    """Cut metrics.jsonl back to the checkpoint: to the recorded length after check_metrics, or, for checkpoints
    without a record, to the lines of steps <= last_step."""
    if record is None:
        _truncate_metrics(path, last_step)
        return
    check_metrics(path, last_step, record)
    if path.stat().st_size > record["bytes"]:
        with open(path, "rb") as f:
            keep = f.read(record["bytes"])
        atomic_write(path, lambda p: Path(p).write_bytes(keep))


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep metrics.jsonl lines up to last_step (lines written after the checkpoint by a killed run go)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if rec.get("step", 0) <= last_step:
            keep.append(line)
    atomic_write_text(path, "".join(x + "\n" for x in keep))


# -- logging ------------------------------------------------------------------------------------------------------
def _mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: peak host RSS


def _progress(step: int, total: int, rec: dict, device) -> str:
    width = 20
    done = int(width * step / total)
    loss = "   nan" if rec["loss"] is None else f"{rec['loss']:.4f}"
    gn = "nan" if rec.get("grad_norm") is None else f"{rec['grad_norm']:.3f}"
    mem = "GPU" if device.type == "cuda" else "RSS"
    return (f"[{'#' * done}{'.' * (width - done)}] {step}/{total} loss {loss} lr {rec['lr']:.2e} gnorm {gn} "
            f"{rec['tok_s']:,.0f} tok/s {mem} {rec['mem_gib']:.2f} GiB")


# -- a run, step by step ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """What one training process holds: built by setup(), advanced by train_step(), saved by checkpoint()."""
    cfg: TrainConfig
    world: World
    out: Path
    device: torch.device
    dtype: torch.dtype
    tok: D.TextTokenizer
    rows: list  # training rows (every rank holds all of them and takes its share of each step)
    eval_samples: list
    counts: dict  # data statistics (data.encode_all) plus rows and eval_samples
    model: nn.Module  # the Llama with LoRA adapters (sharded in place under FSDP)
    loss_module: nn.Module  # what a micro-batch calls: LossModule(model), wrapped for DDP / FSDP
    params: object  # apply_lora's LoraParamCount
    trainable: list  # the LoRA parameters (DTensors under FSDP)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    stream: D.RowStream
    total: int  # optimizer steps of the whole run
    warmup: int
    step: int = 0  # optimizer steps done (skipped ones included)
    bad: int = 0  # consecutive skipped steps

    def say(self, *args, **kw) -> None:
        """print() on rank 0 only."""
        if self.world.main:
            print(*args, **kw)


@dataclasses.dataclass
class StepBatch:
    """One optimizer step's data as this rank sees it."""
    micro: list  # this rank's micro-batches: lists of at most batch_size rows
    n_labels: int  # label tokens of the whole step, all ranks (each micro-batch's loss sum is divided by it)
    tokens: int  # tokens of the whole step, all ranks


def setup(cfg: TrainConfig, world: World) -> Run:
    """Tokenizer, data, model (with the checkpoint's adapter when resuming), parallel wrapping, optimizer and
    schedule; then the checkpoint's optimizer / scheduler / data position, or a clean output folder."""
    from .adapter import load_adapter
    from .optim import PagedAdamW

    rows_per_step = cfg.batch_size * cfg.grad_accum
    if rows_per_step % world.size:
        raise TrainConfigError(f"batch_size * grad_accum = {rows_per_step} rows per step do not split evenly "
                               f"over {world.size} processes; make it a multiple of {world.size}")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    tok = D.TextTokenizer.from_folder(_model_folder(cfg.model), use_chat_template=cfg.chat_template)
    rows, eval_samples, counts = load_data(cfg, tok)
    model, params = load_model(cfg, device, dtype)
    found = load_checkpoint(out) if cfg.resume else None
    if found is not None:
        load_adapter(model, found[0], check_base=False)  # into the whole model, before it is sharded
    model.train()
    loss_module = distributed.wrap(LossModule(model), world)
    trainable = [p for p in loss_module.parameters() if p.requires_grad]
    opt = PagedAdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, optim_bits=cfg.optim_bits)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * len(rows) / rows_per_step))
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, round(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))
    run = Run(cfg=cfg, world=world, out=out, device=device, dtype=dtype, tok=tok, rows=rows,
              eval_samples=eval_samples, counts=counts, model=model, loss_module=loss_module, params=params,
              trainable=trainable, opt=opt, sched=sched, stream=D.RowStream(rows, cfg.seed), total=total,
              warmup=warmup)
    if found is not None:
        restore(run, *found)
    else:
        start_fresh(run)
    world.barrier()  # no rank reads the output folder while rank 0 cleans it
    return run


def restore(run: Run, ck: Path, st: dict) -> None:
    """Continue from checkpoint `ck` (its adapter is already in the model): optimizer state (re-cut when the
    process count changed), scheduler, data position, RNG (one process), and metrics.jsonl cut to its step."""
    from .optim_shards import load_state

    w = run.world
    opt_state = _torch_load(ck / "optimizer.pt")
    check_state_finite(opt_state, str(ck / "optimizer.pt"))
    try:
        load_state(run.opt, opt_state, w.rank, w.size)
    except (KeyError, TypeError, IndexError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ck / 'optimizer.pt'} does not fit this run's optimizer "
                              f"({type(e).__name__}: {e})") from None
    run.sched.load_state_dict(st["scheduler"])
    if w.size == 1:
        _set_rng_state(st["rng"], run.device)  # several processes seed dropout per step and rank instead
    run.step, run.bad, run.stream.position = st["step"], st["bad_streak"], st["data_position"]
    if w.main:
        _restore_metrics(run.out / METRICS, run.step, st.get("metrics_record"))
    old, new = _flat_config(TrainConfig.from_dict(st["config"])), _flat_config(run.cfg)
    changed = {k: (v, new[k]) for k, v in old.items() if k not in ("resume", "overwrite", "output", "parallel")
               and new[k] != v}
    if changed:
        run.say(f"warning: resuming with changed settings {changed}; the run will not match an uninterrupted one")
    ranks = st.get("world_size", 1)
    run.say(f"resumed from {ck} at step {run.step}/{run.total}" +
            (f" (written by {ranks} process(es), now {w.size})" if ranks != w.size else ""))


def _flat_config(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    d.update({f"lora.{k}": v for k, v in d.pop("lora").items()})
    return d


def start_fresh(run: Run) -> None:
    """A new run in run.out: rank 0 removes an earlier run's metrics, pointer and checkpoints, and with
    cfg.overwrite its adapter too (a new run stopping early would otherwise leave it beside its own metrics, as if
    it were the new result; without a checkpoint, --resume keeps an adapter it did not write)."""
    from .adapter import CONFIG_NAME, WEIGHTS_NAME

    if run.cfg.resume:
        run.say(f"no checkpoint in {run.out}; starting fresh")
    if run.world.main:
        names = (METRICS, POINTER) + ((WEIGHTS_NAME, CONFIG_NAME) if run.cfg.overwrite else ())
        for name in names:
            (run.out / name).unlink(missing_ok=True)
        shutil.rmtree(run.out / "checkpoints", ignore_errors=True)


def describe(run: Run) -> None:
    """The run's header lines (rank 0)."""
    cfg, w, counts = run.cfg, run.world, run.counts
    par = f"; {w.size} processes ({w.parallel})" if w.size > 1 else ""
    run.say(f"model {cfg.model} ({cfg.quant}, {run.dtype}, {run.device}{par}); {run.params}")
    run.say(f"data: {counts['samples']} samples -> {len(run.rows)} rows of <= {cfg.seq_len} tokens "
            f"({counts['truncated']} truncated, {counts['dropped_no_labels']} without labels dropped), "
            f"{counts['eval_samples']} held out; template: {run.tok.template_name}")
    run.say(f"{run.total} steps x {cfg.batch_size * cfg.grad_accum} rows, lr {cfg.lr:g} (warmup {run.warmup}, "
            f"cosine to {cfg.min_lr_ratio:g}x), PagedAdamW {cfg.optim_bits}-bit")


def next_batch(run: Run) -> StepBatch:
    """The step's batch_size * grad_accum rows from the stream (the same rows on every rank), this rank's share
    cut into micro-batches of at most batch_size rows."""
    cfg = run.cfg
    rows = run.stream.take(cfg.batch_size * cfg.grad_accum)
    n_labels = sum(sum(1 for y in r.labels[1:] if y != D.IGNORE_INDEX) for r in rows)
    tokens = sum(len(r) for r in rows)
    mine = distributed.split_rows(rows, run.world)
    micro = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    return StepBatch(micro=micro, n_labels=n_labels, tokens=tokens)


def forward_backward(run: Run, batch: StepBatch) -> tuple[float, bool]:
    """Forward and backward of this rank's micro-batches: (summed loss over its labels, all finite).

    Each micro-batch's loss sum is divided by the step's label count (all ranks), so the accumulated gradient is
    the mean over every label of the step; with several processes it is also multiplied by their number, which
    DDP's and FSDP's gradient averaging divides out. Every micro-batch runs its backward even after a non-finite
    loss: the backward holds collectives every rank must join (train_step then skips the step everywhere).
    """
    cfg, w = run.cfg, run.world
    loss_sum, finite = 0.0, True
    for i, rs in enumerate(batch.micro):
        ids, labels = D.collate(rs, run.tok.pad_token_id)
        pos = doc = None
        if cfg.pack and cfg.pack_isolate:
            pos, doc = (t.to(run.device) for t in D.collate_positions(rs))
        with distributed.grad_sync(run.loss_module, i == len(batch.micro) - 1):
            with _autocast(run.device, run.dtype):
                s, _ = run.loss_module(ids.to(run.device), labels.to(run.device), pos, doc)
            loss = s / max(batch.n_labels, 1)
            (loss * w.size if w.size > 1 else loss).backward()
        value = float(s.detach())
        finite = finite and math.isfinite(value)
        loss_sum += value
    return loss_sum, finite


def train_step(run: Run) -> dict:
    """One optimizer step on every rank; returns its metrics record (loss None when skipped).

    Loss and finiteness are summed over ranks first, so a NaN on one rank skips the step on all of them.
    """
    cfg, w = run.cfg, run.world
    t0 = time.perf_counter()
    if w.size > 1:  # dropout masks from (seed, step, rank): reproducible and resumable on any process count
        torch.manual_seed(cfg.seed * 1_000_003 + run.step * 1009 + w.rank)
    batch = next_batch(run)
    loss_sum, finite = forward_backward(run, batch)
    loss_sum, bad_ranks = w.sum([loss_sum if finite else 0.0, 0.0 if finite else 1.0])
    finite = bad_ranks == 0
    gnorm = None
    if finite:
        gnorm = distributed.clip_grad_norm(run.trainable, cfg.max_grad_norm)
        finite = math.isfinite(gnorm)
    if finite:
        run.opt.step()
        run.bad = 0
    else:
        run.bad += 1
    run.opt.zero_grad(set_to_none=True)
    lr = run.opt.param_groups[0]["lr"]
    run.sched.step()
    run.step += 1
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    dt = time.perf_counter() - t0
    rec = {"step": run.step, "loss": loss_sum / max(batch.n_labels, 1) if finite else None, "lr": lr,
           "grad_norm": gnorm if finite else None, "tokens": batch.tokens, "tok_s": batch.tokens / dt,
           "epoch": round(run.stream.epoch, 4), "time_s": round(dt, 4),
           "mem_gib": round(w.max(_mem_gib(run.device)), 3)}
    if not finite:
        rec["skipped"] = True
        run.say(f"step {run.step}: non-finite {'loss' if gnorm is None else 'grad norm'}"
                f"{' on ' + str(int(bad_ranks)) + ' rank(s)' if w.size > 1 and gnorm is None else ''}; step "
                f"skipped ({run.bad} in a row, stop at {cfg.max_bad_steps})")
    return rec


def maybe_evaluate(run: Run, rec: dict, evals: list) -> None:
    """Every eval_every steps and at the last: eval loss and perplexity over all ranks, into rec and evals."""
    cfg = run.cfg
    if not run.eval_samples or not ((cfg.eval_every > 0 and run.step % cfg.eval_every == 0) or
                                    run.step == run.total):
        return
    el, ppl = evaluate(run.loss_module, run.eval_samples, run.tok.pad_token_id, cfg.eval_batch_size, run.device,
                       run.dtype, run.world)
    rec.update(eval_loss=el, eval_ppl=ppl)
    evals.append((run.step, el, ppl))
    run.say(f"eval step {run.step}: loss {el:.4f} ppl {ppl:.3f}")


def checkpoint(run: Run) -> None:
    """Every rank gathers its adapter and optimizer shards (collectives), then rank 0 writes checkpoints/step-N
    whole. No collective runs while rank 0 writes, so a failing rank never leaves a checkpoint half-written."""
    from .optim_shards import gather_state

    w = run.world
    lora = distributed.gather_lora(run.model) if w.parallel == "fsdp" and w.size > 1 else None
    opt_state = gather_state(run.opt, w.rank, w.size)
    if w.main:
        state = {"step": run.step, "scheduler": run.sched.state_dict(), "rng": _rng_state(run.device),
                 "data_position": run.stream.position, "bad_streak": run.bad, "config": run.cfg.to_dict(),
                 "world_size": w.size}
        save_checkpoint(run.out, run.step, run.model, opt_state, state, lora)


def save_final_adapter(run: Run) -> None:
    """The trained adapter into run.out (rank 0 writes; under FSDP every rank gathers first)."""
    from .adapter import save_adapter

    w = run.world
    lora = distributed.gather_lora(run.model) if w.parallel == "fsdp" and w.size > 1 else None
    if w.main:
        save_adapter(run.model, run.out, run.cfg.model, tensors=lora)


# -- the loop -----------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig | None = None, **overrides) -> TrainResult:
    """Run (or resume) a QLoRA fine-tune described by `cfg` (fields may also be passed as keyword arguments).

    preflight(cfg) runs first, so a bad setting, data file or output folder fails before the model loads; an
    output folder holding an earlier run needs cfg.resume or cfg.overwrite.

    Under torchrun (WORLD_SIZE > 1) every process runs this with the same cfg: cfg.parallel picks FSDP2 or DDP,
    rank 0 prints and writes; the returned model is then this rank's (sharded under FSDP).
    """
    cfg = dataclasses.replace(cfg, **overrides) if cfg is not None else TrainConfig(**overrides)
    preflight(cfg)
    world = distributed.init_world(cfg.device, cfg.parallel)
    try:
        run = setup(cfg, world)
        describe(run)
        result = _loop(run)
        world.barrier()  # every rank sees the final files once train() returns
        return result
    finally:
        world.close()


def _loop(run: Run) -> TrainResult:
    cfg = run.cfg
    losses, evals, stopped = [], [], None
    metrics = open(run.out / METRICS, "a", encoding="utf-8") if run.world.main else None
    try:
        while run.step < run.total:
            rec = train_step(run)
            losses.append(rec["loss"])
            maybe_evaluate(run, rec, evals)
            if metrics is not None:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
            if run.step % cfg.log_every == 0 or run.step == run.total:
                run.say(_progress(run.step, run.total, rec, run.device), flush=True)
            if run.bad >= cfg.max_bad_steps:
                stopped = (f"stopped at step {run.step}: {run.bad} consecutive steps had a non-finite loss or grad "
                           f"norm; lower --lr, check the data, or use --dtype float32")
                run.say(stopped)
                break
            if (cfg.save_every > 0 and run.step % cfg.save_every == 0) or run.step == run.total:
                checkpoint(run)
    finally:
        if metrics is not None:
            metrics.close()
    if stopped is None:
        save_final_adapter(run)
    run.model.eval()
    return TrainResult(model=run.model, tokenizer=run.tok, steps=run.step, losses=losses, evals=evals,
                       stopped=stopped)


def _model_folder(model: str) -> Path:
    from .loading import resolve_folder
    return resolve_folder(model)


class _CallableModule(types.ModuleType):
    """`qlora_core.train` names both this module and its train() function (`qc.train(cfg)`): the module is made
    callable so either import order gives a name that trains and still holds TrainConfig, train, ..."""

    def __call__(self, cfg: TrainConfig | None = None, **overrides) -> TrainResult:
        return train(cfg, **overrides)


sys.modules[__name__].__class__ = _CallableModule
