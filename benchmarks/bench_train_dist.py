"""Tokens/s and peak memory per GPU of one QLoRA training step on N GPUs (torchrun; FSDP2 or DDP), against one GPU.

    python benchmarks/bench_train_dist.py --nproc 1 2 4                        # 8B 4x2048 and 70B 1x2048 per GPU
    python benchmarks/bench_train_dist.py --models llama-3.1-8b:4 --nproc 1 2 --parallel ddp
    python benchmarks/bench_train_dist.py --models tiny:2 --nproc 1 2 --device cpu --seq 64 --iters 2  # smoke test

A step is what `qlora_core.train` runs per optimizer step (its own functions: LossModule, distributed.wrap,
grad_sync, clip_grad_norm, PagedAdamW 8-bit): every GPU takes B rows of `--seq` random tokens, all labelled, so the
global batch is N * B rows; forward, backward (loss scaled by N, as train.forward_backward does), grad-norm clip,
optimizer step, zero_grad. The model: random weights built on the GPU one decoder block at a time (meta -> GPU ->
NF4 + double quant -> LoRA r=16 alpha=32 on all 7 projections, fp32 A/B -> flat 4-bit weights -> fully_shard), so no
rank ever holds the whole 4-bit model, as the 70B shape needs; bf16 embeddings, norms and lm_head; gradient
checkpointing per block. N=1 runs the single-process path (no wrapper), the baseline of the speed-up column.
Timing: 2 warm-up steps, then `--iters` steps, each synchronized on every rank; the median over steps of the
slowest rank is reported. Peak = max over ranks of torch.cuda.max_memory_allocated over the timed steps.
Each (model, N) is one torchrun job. The last line printed is one JSON object with every row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SHAPES = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "llama-3.1-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
}
ROPE = dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Issue 14's targets: peak GiB per GPU (70B, 2 GPUs, 1x2048 each) and speed-up over one GPU (8B 4x2048)
TARGET_PEAK = {("llama-3.1-70b", 2): 24.0}
TARGET_SPEEDUP = {("llama-3.1-8b", 2): 1.85, ("llama-3.1-8b", 4): 3.6}


# -- one rank -----------------------------------------------------------------------------------------------------
def _init(t: torch.Tensor) -> None:
    with torch.no_grad():
        t.normal_(0, 0.02) if t.dim() == 2 else t.fill_(1.0)


def build(name: str, world, device: torch.device):
    """(loss module as train() runs it, the model, trainable params): built block by block, sharded as it goes."""
    from qlora_core import distributed
    from qlora_core.llama import Llama
    from qlora_core.model_config import LlamaConfig
    from qlora_core.lora import apply_lora
    from qlora_core.qlinear import QuantLinear
    from qlora_core.train_loop import LossModule

    cfg = LlamaConfig(**SHAPES[name], **ROPE, max_position_embeddings=131072)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)  # every rank draws the same weights and LoRA init
    with torch.device("meta"):
        model = Llama(cfg, dtype=dtype)
    fsdp = world.size > 1 and world.parallel == "fsdp"
    mesh = distributed.fsdp_mesh(world) if fsdp else None
    for layer in model.model.layers:
        layer.to_empty(device=device)
        for p in layer.parameters():
            _init(p)
        for parent in (layer.self_attn, layer.mlp):
            for child, lin in list(parent.named_children()):
                setattr(parent, child, QuantLinear.from_linear(lin, "nf4", 64, True))
        apply_lora(layer, r=16, alpha=32, dropout=0.0, target_modules=TARGETS, dtype=torch.float32)
        if fsdp:
            distributed.shard_block(layer, mesh)  # this rank keeps 1/N of the block from here on
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for mod in (model.model.embed_tokens, model.model.norm, model.lm_head):
        mod.to_empty(device=device)
        _init(mod.weight)
    model.gradient_checkpointing = True
    model.train()
    loss_module = LossModule(model)
    if fsdp:
        distributed.shard_root(loss_module, mesh)
    else:
        loss_module = distributed.wrap(loss_module, world)  # DDP, or as is on one process
    params = [p for p in loss_module.parameters() if p.requires_grad]
    return loss_module, model, params


def make_step(loss_module, params, world, device):
    from qlora_core import distributed
    from qlora_core.optim import PagedAdamW
    from qlora_core.train_loop import _autocast
    opt = PagedAdamW(params, lr=2e-4, weight_decay=0.0, optim_bits=8)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step(ids):
        n_labels = (ids.shape[1] - 1) * ids.shape[0] * world.size  # every position labelled, all ranks
        with distributed.grad_sync(loss_module, True):
            with _autocast(device, dtype):
                s, _ = loss_module(ids, ids)
            (s / n_labels * world.size).backward()
        distributed.clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(name: str, batch: int, seq: int, iters: int, device: str, parallel: str, warmup: int = 2) -> None:
    from qlora_core import distributed
    world = distributed.init_world(device, parallel)
    dev = world.device
    try:
        loss_module, model, params = build(name, world, dev)
        step = make_step(loss_module, params, world, dev)
        g = torch.Generator(device=dev).manual_seed(1 + world.rank)  # each rank its own rows
        vocab = SHAPES[name]["vocab_size"]
        data = [torch.randint(0, vocab, (batch, seq), device=dev, generator=g) for _ in range(warmup + iters)]
        for ids in data[:warmup]:
            step(ids)
        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for ids in data[warmup:]:
            world.barrier()
            t0 = time.perf_counter()
            step(ids)
            _sync(dev)
            times.append(world.max(time.perf_counter() - t0))  # the slowest rank sets the pace
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
        peak = world.max(peak)
        med = statistics.median(times)
        if world.main:
            row = {"model": name, "nproc": world.size, "parallel": world.parallel if world.size > 1 else "none",
                   "batch_per_gpu": batch, "seq": seq, "step_s": med, "tok_s": world.size * batch * seq / med,
                   "peak_gib_per_gpu": peak}
            print("ROW " + json.dumps(row), flush=True)
    finally:
        world.close()


# -- the driver ---------------------------------------------------------------------------------------------------
def versions() -> dict:
    v = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
         "gpus": torch.cuda.device_count()}
    try:
        v["triton"] = __import__("triton").__version__
    except ImportError:
        v["triton"] = None
    return v


def run_job(name: str, batch: int, nproc: int, args) -> dict:
    """One torchrun job of `nproc` workers; its ROW, or an error row."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.abspath(__file__), "--worker", name, str(batch), "--seq", str(args.seq), "--iters",
           str(args.iters), "--device", args.device, "--parallel", args.parallel]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        out, err = p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        out, err = "", "timeout"
    rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    if rows:
        return rows[0]
    oom = "OutOfMemoryError" in err
    print(f"# {name} x{nproc} failed after {time.perf_counter() - t0:.0f} s:\n{err[-3000:]}", flush=True)
    return {"model": name, "nproc": nproc, "batch_per_gpu": batch, "seq": args.seq,
            "error": "OOM" if oom else err.strip().splitlines()[-1][:200] if err.strip() else "failed"}


def table(rows: list[dict]) -> None:
    base = {r["model"]: r for r in rows if r.get("nproc") == 1 and "tok_s" in r}
    print(f"\n{'model':<15}{'N':>3}{'B x T / GPU':>13}{'tok/s':>10}{'x one GPU':>11}{'target':>8}"
          f"{'GiB / GPU':>11}{'target':>8}")
    for r in rows:
        key = (r["model"], r["nproc"])
        if "tok_s" not in r:
            print(f"{r['model']:<15}{r['nproc']:>3}{r['batch_per_gpu']:>8}x{r['seq']:<4} {r['error']}")
            continue
        b = base.get(r["model"])
        sp = f"{r['tok_s'] / b['tok_s']:.2f}" if b else "-"
        print(f"{r['model']:<15}{r['nproc']:>3}{r['batch_per_gpu']:>8}x{r['seq']:<4}{r['tok_s']:>10,.0f}{sp:>11}"
              f"{TARGET_SPEEDUP.get(key, '-'):>8}{r['peak_gib_per_gpu']:>11.2f}{TARGET_PEAK.get(key, '-'):>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama-3.1-8b:4", "llama-3.1-70b:1"],
                    help="MODEL:ROWS_PER_GPU, MODEL one of " + ", ".join(SHAPES))
    ap.add_argument("--nproc", nargs="+", type=int, default=[1, 2],
                    help="process (GPU) counts; 1 is the single-process baseline")
    ap.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=5, help="timed steps per job (median reported)")
    ap.add_argument("--device", default="auto", help="auto (this rank's GPU), or cpu for a gloo smoke test")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per torchrun job")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "ROWS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.seq, args.iters, args.device, args.parallel)
        return
    info = versions()
    print(f"# {info}")
    rows = []
    for spec in args.models:
        name, _, b = spec.partition(":")
        if name not in SHAPES:
            raise SystemExit(f"--models: unknown model {name!r}; one of {sorted(SHAPES)}")
        for n in args.nproc:
            rows.append(run_job(name, int(b or 1), n, args))
            print("ROW " + json.dumps(rows[-1]), flush=True)
    table(rows)
    print(json.dumps({"bench": "train_dist", "parallel": args.parallel, "versions": info, "rows": rows}))


if __name__ == "__main__":
    main()
