"""`train(cfg)`: the QLoRA training loop, written to be read top to bottom.

    from qlora_core import train, TrainConfig
    result = train(TrainConfig(model="path/to/hf-folder", data="train.jsonl", output="runs/a", max_steps=200))

One step = grad_accum micro-batches of batch_size rows (data.py: chat-formatted, response-only labels, packed).
The loss is the mean over every label token of the whole step (each micro-batch's summed loss is divided by the
step's label count before backward, so accumulation gives the same gradient as one big batch). Then: clip the
global grad norm, PagedAdamW (8-bit states by default), cosine schedule with linear warmup.

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
"""
from __future__ import annotations

import contextlib
import dataclasses
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

import torch
import torch.nn.functional as F

from . import data as D
from .defaults import (DOUBLE_QUANT, LORA_ALPHA, LORA_DROPOUT, LORA_R, LORA_TARGETS, OPTIM_BITS, QUANT_TYPE,
                       WEIGHT_DECAY, default_dtype)
from .durable import atomic_write_text, fsync_dir, fsync_tree

LOSS_CHUNK_ELEMS = 1 << 27  # logits per loss chunk (fp32: 512 MiB); bounds the lm_head/CE peak at any vocab
POINTER = "checkpoint.json"
METRICS = "metrics.jsonl"


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs; `qlora train` flags map 1:1 onto these fields (--max-steps -> max_steps)."""
    model: str = ""  # HF model folder or hub repo id
    data: str = ""  # JSONL file: messages, instruction/response, prompt/completion or text rows (docs/data.md)
    output: str = "qlora-out"  # directory for adapter files, metrics.jsonl and checkpoints
    eval_data: str | None = None  # held-out JSONL file; default: eval_fraction of --data
    eval_fraction: float = 0.05  # fraction of records held out for eval when no eval_data (0 = no eval)
    max_steps: int = -1  # optimizer steps; -1 = derived from epochs
    epochs: float = 1.0  # passes over the training rows (used when max_steps is -1)
    batch_size: int = 4  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 512  # tokens per row (samples are truncated to it, packed up to it)
    lr: float = 2e-4  # peak learning rate (after warmup)
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr (end of the cosine)
    warmup_steps: int = -1  # linear warmup steps; -1 = 5% of the steps
    weight_decay: float = WEIGHT_DECAY  # AdamW decoupled weight decay on the LoRA matrices
    max_grad_norm: float = 1.0  # clip the global grad norm to this (0 = no clipping)
    lora_r: int = LORA_R  # LoRA rank
    lora_alpha: float = LORA_ALPHA  # LoRA scaling numerator (scaling = alpha / r)
    lora_dropout: float = LORA_DROPOUT  # dropout probability on the LoRA input
    target_modules: str = ",".join(LORA_TARGETS)  # comma list or all-linear
    quant: str = QUANT_TYPE  # base weights: nf4, fp4 or none (dense)
    double_quant: bool = DOUBLE_QUANT  # quantize the absmax too (bnb compress_statistics), ~0.37 bits/param saved
    dtype: str = "auto"  # model dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1, ...
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

    def __post_init__(self):
        if self.quant not in ("nf4", "fp4", "none"):
            raise ValueError(f"quant must be nf4, fp4 or none, got {self.quant!r}")
        if self.optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {self.optim_bits}")
        for name in ("batch_size", "grad_accum", "seq_len", "lora_r", "max_bad_steps", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be positive or -1 (from epochs), got {self.max_steps}")
        if self.max_steps == -1 and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0 when max_steps is -1, got {self.epochs}")
        if self.checkpoint_policy not in ("none", "save_attn", "full", "offload"):
            raise ValueError(f"checkpoint_policy must be none, save_attn, full or offload, got {self.checkpoint_policy!r}")
        if self.memory_budget_gib < 0:
            raise ValueError(f"memory_budget_gib must be >= 0, got {self.memory_budget_gib}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")

    def targets(self):
        """target_modules as apply_lora takes it: "all-linear" as is, else a tuple of the comma-separated names."""
        t = self.target_modules.strip()
        return t if t == "all-linear" else tuple(s.strip() for s in t.split(",") if s.strip())


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
    """(device, dtype) for cfg: device "auto" is cuda when available, else cpu; dtype "auto" is bfloat16 on CUDA,
    float32 elsewhere."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if cfg.dtype == "auto":
        return device, default_dtype(device)
    return device, getattr(torch, cfg.dtype)


def load_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
    """Our Llama (frozen, quantized per cfg.quant) with fresh LoRA adapters on cfg.target_modules."""
    from .loading import load_llama
    from .lora import apply_lora

    model = load_llama(cfg.model, quantize=None if cfg.quant == "none" else cfg.quant,
                       double_quant=cfg.double_quant, dtype=dtype, device=device)
    counts = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=cfg.targets(), dtype=torch.float32)
    print(apply_policy(model, cfg.checkpoint_policy if cfg.gradient_checkpointing else "none",
                       cfg.memory_budget_gib or None))
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


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, samples: list, pad_id: int, batch_size: int, device, dtype) -> tuple[float, float]:
    """(mean loss per label token, perplexity) over `samples` (not packed)."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    try:
        for i in range(0, len(samples), batch_size):
            ids, labels = D.collate(samples[i:i + batch_size], pad_id)
            with _autocast(device, dtype):
                s, k = batch_loss(model, ids.to(device), labels.to(device))
            tot, n = tot + float(s), n + k
    finally:
        model.train(was)
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


def save_checkpoint(out: Path, step: int, model, opt, sched, position: int, bad: int, cfg: TrainConfig,
                    device) -> Path:
    """Write checkpoints/step-N as a whole (temp dir + rename), then point checkpoint.json at it; drop older ones."""
    from .adapter import save_adapter

    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=root))
    save_adapter(model, tmp, cfg.model)
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, "scheduler": sched.state_dict(), "rng": _rng_state(device), "data_position": position,
                "bad_streak": bad, "config": dataclasses.asdict(cfg)}, tmp / "trainer_state.pt")
    fsync_tree(tmp)  # every file on disk before the directory gets its final name
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step saved by an earlier, killed process: the pointer may not name it yet
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(out / POINTER, json.dumps({"step": step, "path": f"checkpoints/{final.name}"}) + "\n")
    for old in root.iterdir():
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out: Path) -> tuple[Path, dict] | None:
    """(checkpoint directory, trainer_state dict) named by out/checkpoint.json, or None without a pointer file.

    trainer_state holds step, scheduler, rng, data_position, bad_streak and config; it is read with
    torch.load(weights_only=True) (tensors and plain containers only, no arbitrary unpickling).
    FileNotFoundError when the named directory is gone.
    """
    p = out / POINTER
    if not p.exists():
        return None
    ck = out / json.loads(p.read_text())["path"]
    return ck, torch.load(ck / "trainer_state.pt", weights_only=True)


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


# -- the loop -----------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig | None = None, **overrides) -> TrainResult:
    """Run (or resume) a QLoRA fine-tune described by `cfg` (fields may also be passed as keyword arguments)."""
    from .adapter import load_adapter, save_adapter
    from .optim import PagedAdamW

    cfg = dataclasses.replace(cfg, **overrides) if cfg is not None else TrainConfig(**overrides)
    if not cfg.model or not cfg.data:
        raise ValueError("TrainConfig needs model and data")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    tok = D.TextTokenizer.from_folder(_model_folder(cfg.model), use_chat_template=cfg.chat_template)
    rows, eval_samples, counts = load_data(cfg, tok)
    model, params = load_model(cfg, device, dtype)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, optim_bits=cfg.optim_bits)
    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * len(rows) / per_step))
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, round(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))
    stream = D.RowStream(rows, cfg.seed)
    step, bad = 0, 0

    found = load_checkpoint(out) if cfg.resume else None
    if found is not None:
        ck, st = found
        load_adapter(model, ck, check_base=False)
        opt.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=True))
        sched.load_state_dict(st["scheduler"])
        _set_rng_state(st["rng"], device)
        step, bad, stream.position = st["step"], st["bad_streak"], st["data_position"]
        _truncate_metrics(out / METRICS, step)
        changed = {k: (v, getattr(cfg, k)) for k, v in st["config"].items()
                   if k not in ("resume", "output") and getattr(cfg, k, v) != v}
        if changed:
            print(f"warning: resuming with changed settings {changed}; the run will not match an uninterrupted one")
        print(f"resumed from {ck} at step {step}/{total}")
    else:
        if cfg.resume:
            print(f"no checkpoint in {out}; starting fresh")
        (out / METRICS).unlink(missing_ok=True)
        (out / POINTER).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)

    print(f"model {cfg.model} ({cfg.quant}, {dtype}, {device}); {params}")
    print(f"data: {counts['samples']} samples -> {len(rows)} rows of <= {cfg.seq_len} tokens "
          f"({counts['truncated']} truncated, {counts['dropped_no_labels']} without labels dropped), "
          f"{counts['eval_samples']} held out; template: {tok.template_name}")
    print(f"{total} steps x {per_step} rows, lr {cfg.lr:g} (warmup {warmup}, cosine to {cfg.min_lr_ratio:g}x), "
          f"PagedAdamW {cfg.optim_bits}-bit")

    losses, evals, stopped = [], [], None
    metrics = open(out / METRICS, "a", encoding="utf-8")
    try:
        while step < total:
            t0 = time.perf_counter()
            micro = [stream.take(cfg.batch_size) for _ in range(cfg.grad_accum)]
            n_labels = sum(sum(1 for y in r.labels[1:] if y != D.IGNORE_INDEX) for rs in micro for r in rs)
            tokens = sum(len(r) for rs in micro for r in rs)
            loss_sum, finite = 0.0, True
            for rs in micro:
                ids, labels = D.collate(rs, tok.pad_token_id)
                pos = doc = None
                if cfg.pack and cfg.pack_isolate:
                    pos, doc = (t.to(device) for t in D.collate_positions(rs))
                with _autocast(device, dtype):
                    s, _ = batch_loss(model, ids.to(device), labels.to(device), pos, doc)
                if not torch.isfinite(s).item():
                    finite = False
                    break
                (s / max(n_labels, 1)).backward()
                loss_sum += float(s.detach())
            gnorm = None
            if finite:
                clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                gnorm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
                finite = math.isfinite(gnorm)
            if finite:
                opt.step()
                bad = 0
            else:
                bad += 1
            opt.zero_grad(set_to_none=True)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            loss = loss_sum / max(n_labels, 1) if finite else None
            losses.append(loss)
            rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm if finite else None,
                   "tokens": tokens, "tok_s": tokens / dt, "epoch": round(stream.epoch, 4),
                   "time_s": round(dt, 4), "mem_gib": round(_mem_gib(device), 3)}
            if not finite:
                rec["skipped"] = True
                print(f"step {step}: non-finite {'loss' if gnorm is None else 'grad norm'}; step skipped "
                      f"({bad} in a row, stop at {cfg.max_bad_steps})")
            if eval_samples and ((cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == total):
                el, ppl = evaluate(model, eval_samples, tok.pad_token_id, cfg.eval_batch_size, device, dtype)
                rec.update(eval_loss=el, eval_ppl=ppl)
                evals.append((step, el, ppl))
                print(f"eval step {step}: loss {el:.4f} ppl {ppl:.3f}")
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            if step % cfg.log_every == 0 or step == total:
                print(_progress(step, total, rec, device), flush=True)
            if bad >= cfg.max_bad_steps:
                stopped = (f"stopped at step {step}: {bad} consecutive steps had a non-finite loss or grad norm; "
                           f"lower --lr, check the data, or use --dtype float32")
                print(stopped)
                break
            if (cfg.save_every > 0 and step % cfg.save_every == 0) or step == total:
                save_checkpoint(out, step, model, opt, sched, stream.position, bad, cfg, device)
    finally:
        metrics.close()
    if stopped is None:
        save_adapter(model, out, cfg.model)
    model.eval()
    return TrainResult(model=model, tokenizer=tok, steps=step, losses=losses, evals=evals, stopped=stopped)


def _model_folder(model: str) -> Path:
    from .loading import resolve_folder
    return resolve_folder(model)


class _CallableModule(types.ModuleType):
    """`qlora_core.train` names both this module and its train() function (`qc.train(cfg)`): the module is made
    callable so either import order gives a name that trains and still holds TrainConfig, train, ..."""

    def __call__(self, cfg: TrainConfig | None = None, **overrides) -> TrainResult:
        return train(cfg, **overrides)


sys.modules[__name__].__class__ = _CallableModule
