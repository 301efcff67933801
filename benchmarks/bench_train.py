"""Tokens/s and peak GPU memory of one full QLoRA training step: ours vs transformers + PEFT + bitsandbytes.

    python benchmarks/bench_train.py                       # 1B and 8B, batch 1 and 4, seq 2048
    python benchmarks/bench_train.py --models llama-3.2-1b --batches 1 --iters 3   # quick
    python benchmarks/bench_train.py --stacks ours --packed-docs 8   # cost of per-document attention in packed rows

A step is what `qlora_core.train` does per optimizer step: forward over (B, 2048) random tokens with every position
labelled, backward, grad-norm clipping, paged 8-bit AdamW, zero_grad. Both stacks: random weights built directly
on the GPU (never an 8B model on the CPU), decoder linears NF4 + double quant, bf16 everywhere else, LoRA r=16
alpha=32 dropout 0 on all 7 projections (fp32 A/B), gradient checkpointing per block.
- ours: qlora_core Llama + QuantLinear (Triton NF4 kernels) + apply_lora + PagedAdamW(optim_bits=8) +
  train.batch_loss (label-only, chunked lm_head/cross entropy);
- peer: transformers LlamaForCausalLM with bnb Linear4bit, PEFT get_peft_model, bnb PagedAdamW8bit,
  model(input_ids, labels=labels).loss (full fp32 logits). prepare_model_for_kbit_training is NOT called (it
  upcasts norms/embeddings to fp32, which only adds memory).
Each (stack, model) runs in its own subprocess so one's allocations and caches never touch another's peak.
Timing: 2 warm-up steps (Triton compile, optimizer pages), then `--iters` steps, each synchronized; the median is
reported. Peak memory = torch.cuda.max_memory_allocated over the timed steps, model and optimizer included.
The last line printed is one JSON object with every row.
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
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
ROPE = dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HF_REFERENCE = {  # the issue's H100 numbers for the HF stack: (tok/s, GiB)
    ("llama-3.1-8b", 4): (5706, 21.4), ("llama-3.1-8b", 1): (3255, 9.5), ("llama-3.2-1b", 4): (20510, 15.3)}


# -- ours ---------------------------------------------------------------------------------------------------------
def build_ours(name: str, packed_docs: int = 0):
    from qlora_core.llama import Llama, LlamaConfig
    from qlora_core.lora import apply_lora
    from qlora_core.optim import PagedAdamW
    from qlora_core.qlinear import QuantLinear

    cfg = LlamaConfig(**SHAPES[name], **ROPE, max_position_embeddings=131072)
    with torch.device("meta"):
        model = Llama(cfg, dtype=torch.bfloat16)
    # materialize one block at a time on the GPU: peak = quantized model + one dense block
    for mod in [model.model.embed_tokens, model.model.norm] + ([] if cfg.tie_word_embeddings else [model.lm_head]):
        mod.to_empty(device="cuda")
        with torch.no_grad():
            mod.weight.normal_(0, 0.02) if mod.weight.dim() == 2 else mod.weight.fill_(1.0)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for layer in model.model.layers:
        layer.to_empty(device="cuda")
        for n, p in layer.named_parameters():
            with torch.no_grad():
                p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
        for parent in (layer.self_attn, layer.mlp):
            for child, lin in list(parent.named_children()):
                setattr(parent, child, QuantLinear.from_linear(lin, "nf4", 64, True))
        torch.cuda.empty_cache()
    apply_lora(model, r=16, alpha=32, dropout=0.0, target_modules=TARGETS, dtype=torch.float32)
    model.gradient_checkpointing = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(params, lr=2e-4, weight_decay=0.0, optim_bits=8)

    from qlora_core.train import batch_loss

    def packing(B, T):
        """position_ids / document_ids of rows made of `packed_docs` equal documents (what TrainConfig.pack_isolate
        passes for packed rows), or (None, None)."""
        if not packed_docs:
            return None, None
        L = -(-T // packed_docs)
        pos = (torch.arange(T, device="cuda") % L).expand(B, T)
        return pos, (torch.arange(T, device="cuda") // L).expand(B, T)

    def step(ids, labels):
        pos, doc = packing(*ids.shape)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            s, n = batch_loss(model, ids, labels, pos, doc)
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# -- transformers + PEFT + bitsandbytes ----------------------------------------------------------------------------
def build_hf(name: str):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[name], **ROPE, max_position_embeddings=131072)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", blocksize=64).to("cuda")
                setattr(parent, child, q)
        torch.cuda.empty_cache()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS),
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4, weight_decay=0.0)

    def step(ids, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# -- measuring ----------------------------------------------------------------------------------------------------
def measure(step, batch: int, seq: int, vocab: int, iters: int, warmup: int = 2) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    # fresh tokens per step (rotating inputs), every position labelled
    batches = [torch.randint(0, vocab, (batch, seq), device="cuda", generator=g) for _ in range(warmup + iters)]
    for ids in batches[:warmup]:
        step(ids, ids)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for ids in batches[warmup:]:
        t0 = time.perf_counter()
        step(ids, ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"batch": batch, "seq": seq, "step_s": med, "tok_s": batch * seq / med,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def profile(step, batch: int, seq: int, vocab: int, top: int = 18) -> None:
    """One step under torch.profiler: the kernels with the most device time, grouped by name."""
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(ids, ids)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=70))


def worker(stack: str, name: str, batches: list[int], seq: int, iters: int, prof: bool = False,
           packed_docs: int = 0) -> None:
    step = build_ours(name, packed_docs) if stack == "ours" else build_hf(name)
    if prof:
        measure(step, batches[0], seq, SHAPES[name]["vocab_size"], 1)
        profile(step, batches[0], seq, SHAPES[name]["vocab_size"])
        return
    for b in batches:
        try:
            row = measure(step, b, seq, SHAPES[name]["vocab_size"], iters)
        except torch.OutOfMemoryError as e:
            row = {"batch": b, "seq": seq, "error": f"OOM: {str(e)[:120]}"}
            torch.cuda.empty_cache()
        row.update(stack=stack, model=name)
        print("ROW " + json.dumps(row), flush=True)


def versions() -> dict:
    v = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for mod in ("triton", "bitsandbytes", "transformers", "peft"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = None
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=5, help="timed steps per shape (median reported)")
    ap.add_argument("--stacks", nargs="+", default=["ours", "hf"], choices=["ours", "hf"])
    ap.add_argument("--timeout", type=int, default=300, help="seconds per (stack, model) subprocess")
    ap.add_argument("--profile", nargs=2, metavar=("STACK", "MODEL"),
                    help="profile one step of STACK on MODEL at the first --batches value (no table)")
    ap.add_argument("--packed-docs", type=int, default=0,
                    help="ours: rows of N packed documents with per-document attention (TrainConfig.pack_isolate)")
    ap.add_argument("--worker", nargs=2, metavar=("STACK", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker or args.profile:
        worker(*(args.worker or args.profile), args.batches, args.seq, args.iters, prof=bool(args.profile),
               packed_docs=args.packed_docs)
        return
    info = versions()
    print(f"# {info}")
    rows = []
    for name in args.models:
        for stack in args.stacks:
            if stack == "hf" and (info["bitsandbytes"] is None or info["transformers"] is None or info["peft"] is None):
                print(f"# hf stack skipped: transformers/peft/bitsandbytes not installed ({info})")
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", stack, name, "--seq", str(args.seq),
                   "--iters", str(args.iters), "--packed-docs", str(args.packed_docs),
                   "--batches", *map(str, args.batches)]
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                out, err = p.stdout, p.stderr
            except subprocess.TimeoutExpired as e:
                out, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
            got = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
            if len(got) < len(args.batches):
                print(f"# {stack} {name} failed after {time.perf_counter() - t0:.0f} s:\n{err[-3000:]}")
            rows += got
    by = {(r["stack"], r["model"], r["batch"]): r for r in rows}
    print(f"\n{'model':<14}{'B x T':>9}{'ours tok/s':>12}{'ours GiB':>10}{'HF tok/s':>10}{'HF GiB':>8}"
          f"{'speed x':>9}{'mem x':>7}{'issue HF tok/s':>16}{'GiB':>6}")
    for name in args.models:
        for b in args.batches:
            o, h = by.get(("ours", name, b), {}), by.get(("hf", name, b), {})
            ref = HF_REFERENCE.get((name, b), (None, None))
            f = lambda r, k, fmt: format(r[k], fmt) if k in r else r.get("error", "-")[:8]  # noqa: E731
            sp = f"{o['tok_s'] / h['tok_s']:.2f}" if "tok_s" in o and "tok_s" in h else "-"
            mx = f"{o['peak_gib'] / h['peak_gib']:.2f}" if "peak_gib" in o and "peak_gib" in h else "-"
            print(f"{name:<14}{f'{b}x{args.seq}':>9}{f(o, 'tok_s', ',.0f'):>12}{f(o, 'peak_gib', '.2f'):>10}"
                  f"{f(h, 'tok_s', ',.0f'):>10}{f(h, 'peak_gib', '.2f'):>8}{sp:>9}{mx:>7}"
                  f"{(f'{ref[0]:,}' if ref[0] else '-'):>16}{(ref[1] or '-'):>6}")
    print(json.dumps({"bench": "train_step", "versions": info, "rows": rows}))


if __name__ == "__main__":
    main()
