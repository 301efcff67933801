"""`train(cfg)`: the QLoRA training loop, written to be read top to bottom.

    from qlora_core import train, TrainConfig
    result = train(TrainConfig(model="path/to/hf-folder", data="train.jsonl", output="runs/a", max_steps=200))

One step = grad_accum micro-batches of batch_size rows (data.py: chat-formatted, response-only labels, packed).
The loss is the mean over every label token of the whole step (each micro-batch's summed loss is divided by the
step's label count before backward, so accumulation gives the same gradient as one big batch). Then: clip the
global grad norm, PagedAdamW (8-bit states by default), cosine schedule with linear warmup.
train() reads as its steps: preflight (train_config.py), setup (data, model, wrapping, optimizer, resume), then
per step next_batch, forward_backward, train_step (reduce, clip, update), maybe_evaluate, checkpoint
(train_checkpoint.py).

Several processes (torchrun, distributed.py): each rank takes a contiguous 1/N of every step's rows (the global
batch stays batch_size * grad_accum rows), runs them in micro-batches of at most batch_size, and FSDP2 (default)
or DDP averages the gradients; losses, skip decisions and eval sums are reduced over ranks; only rank 0 prints and
writes metrics.jsonl, checkpoints and adapters. Dropout masks come from (seed, step, rank, micro-batch) on any
process count (`dropout_seed`), and optimizer state is saved per shard (optim_shards.py), so a run resumes on any
process count and draws the masks an uninterrupted run on that count draws.

Memory choices (the point of QLoRA):
- decoder linears are frozen NF4 (QuantLinear); only LoRA A/B train; each block is recomputed in backward
  (gradient checkpointing), so activations are one block's plus one (B, T, d) tensor per block;
- logits are never materialized for the whole batch: the lm_head and cross entropy run only on positions that
  carry a label, in chunks of LOSS_CHUNK_ELEMS logits, each chunk recomputed in backward (at Llama-3's 128k vocab
  a full (4, 2048) batch of fp32 logits would be 4.2 GB).

Robustness: a non-finite loss or grad norm skips the step (no update; the data is consumed) and, after
max_bad_steps in a row, stops the run with a message instead of silently training on garbage. Checkpoints are
written whole and verified on resume (train_checkpoint.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import data as D
from . import distributed
from .activation_checkpoint import apply_policy
from .adapter import load_adapter, save_adapter
from .distributed import World
from .loading import load_llama, resolve_folder
from .lora import apply_lora
from .ops.linear_ce import fused_linear_cross_entropy
from .optim import PagedAdamW
from .train_checkpoint import METRICS, checkpoint, load_checkpoint, restore, start_fresh
from .train_config import TrainConfig, TrainConfigError, preflight, resolve_device

LOSS_CHUNK_ELEMS = 1 << 27  # logits per loss chunk (fp32: 512 MiB); bounds the lm_head/CE peak at any vocab


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
def load_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
    """Our Llama (frozen, quantized per cfg.quant) with fresh LoRA adapters per cfg.lora (A and B in fp32 unless
    cfg.lora.dtype says otherwise)."""
    model = load_llama(cfg.model, quantize=None if cfg.quant == "none" else cfg.quant,
                       double_quant=cfg.double_quant, dtype=dtype, device=device)
    lc = cfg.lora
    counts = apply_lora(model, lc)
    plan = apply_policy(model, cfg.checkpoint_policy if cfg.gradient_checkpointing else "none",
                        cfg.memory_budget_gib or None, cfg.host_memory_budget_gib or None, cfg.mlp_chunk_tokens,
                        cfg.offload_every)
    if int(os.environ.get("RANK", "0")) == 0:
        print(plan)
    for m in model.modules():
        if hasattr(m, "fuse_projections"):
            m.fuse_projections = cfg.fused
    return model, counts


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
    in chunks of LOSS_CHUNK_ELEMS // vocab rows (ops/linear_ce.py: on the GPU the gradients are made
    chunk by chunk in forward, so no (N, vocab) logits exist; on the CPU each chunk is recomputed in backward).
    position_ids and document_ids (B, T) (data.collate_positions): packed rows with attention kept inside each sample.
    """
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


# -- logging ------------------------------------------------------------------------------------------------------
def _mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # Unix only; the CPU path alone needs it
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
    """What one training process holds: built by setup(), advanced by train_step(), saved by
    train_checkpoint.checkpoint()."""
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
    rows_per_step = cfg.batch_size * cfg.grad_accum
    if rows_per_step % world.size:
        raise TrainConfigError(f"batch_size * grad_accum = {rows_per_step} rows per step do not split evenly "
                               f"over {world.size} processes; make it a multiple of {world.size}")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    tok = D.TextTokenizer.from_folder(resolve_folder(cfg.model), use_chat_template=cfg.chat_template)
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
        _say_resumed(run, *found)
    else:
        start_fresh(run)
    world.barrier()  # no rank reads the output folder while rank 0 cleans it
    return run


def _say_resumed(run: Run, ck: Path, st: dict) -> None:
    """The resume line (rank 0), after a warning naming every setting that differs from the checkpoint's run."""
    old, new = _flat_config(TrainConfig.from_dict(st["config"])), _flat_config(run.cfg)
    changed = {k: (v, new[k]) for k, v in old.items() if k not in ("resume", "overwrite", "output", "parallel")
               and new[k] != v}
    if changed:
        run.say(f"warning: resuming with changed settings {changed}; the run will not match an uninterrupted one")
    ranks = st.get("world_size", 1)
    run.say(f"resumed from {ck} at step {run.step}/{run.total}" +
            (f" (written by {ranks} process(es), now {run.world.size})" if ranks != run.world.size else ""))


def _flat_config(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    d.update({f"lora.{k}": v for k, v in d.pop("lora").items()})
    return d


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


def dropout_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The global RNG seed of micro-batch `micro` of step `step` on rank `rank` (all ints >= 0): every draw of
    the forward (LoRA dropout masks, grouped or module by module) comes from it, so ranks and micro-batches draw
    different masks, and a resumed run (on any process count) draws what an uninterrupted run on that count draws.
    A hash, not an affine mix, so no two (step, rank, micro) share a seed whatever their sizes (< 2**63)."""
    key = f"{seed}/{step}/{rank}/{micro}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


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
        torch.manual_seed(dropout_seed(cfg.seed, run.step, w.rank, i))  # this micro-batch's dropout masks
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


def save_final_adapter(run: Run) -> None:
    """The trained adapter into run.out (rank 0 writes; under FSDP every rank gathers first)."""
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
