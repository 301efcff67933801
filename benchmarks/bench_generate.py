"""Greedy generation speed on Llama-3.1-8B shapes: ours (qlora_core.generation) vs transformers + bitsandbytes.

    source benchmarks/device_setup.sh    # on the device: bitsandbytes from the carried .whl, offline settings
    python benchmarks/bench_generate.py                                        # batch 1 8 32 x prompt 128 1024
    python benchmarks/bench_generate.py --stacks ours --batches 1 --prompts 128  # quick
    python benchmarks/bench_generate.py --lora                                 # unmerged LoRA r=16 on both
    python benchmarks/bench_generate.py --batches 1 --prompts 128 --profile    # + where the device time goes

Both stacks: random weights built directly on the GPU (bench_train.ours_model / hf_model: NF4 + double quant
decoder linears, bf16 embeddings, norms and lm_head), random prompts of one length (no padding), greedy,
`--new` tokens per row with eos ignored. Ours: `generation.generate` (static KV cache, CUDA-graph decode step);
peer: `LlamaForCausalLM.generate` (dynamic cache, SDPA, bnb Linear4bit: its GEMV at batch 1, dequantize +
cuBLAS above), eos_token_id None.
Each stack runs in its own subprocess, which builds the 8B model once and runs every (prompt, batch) in it, so
one's allocations never touch the other's peak. Per shape: one untimed call (ours: the same call, which captures
the graph; its time is reported as cold_s; HF: a 4-token call), then `--repeats` timed calls, median reported.
Time to first token: from the call to the first token on the host (ours: the stream callback after the
prefill; HF: a streamer's second put). tok/s per row = new tokens / call time; decode tok/s per row =
(new - 1) / (call time - TTFT). Peak = torch.cuda.max_memory_allocated over the shape's calls (model included).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_train; ours_model adds the checkout itself
from bench_train import SHAPES, TARGETS, hf_model, ours_model, versions, worker_env  # noqa: E402

MODEL = "llama-3.1-8b"


def build(stack: str, lora: bool):
    """(model, run) where run(ids, new, on_first) generates `new` greedy tokens for ids (B, T) on the GPU and
    calls on_first() when the first new token reaches the host."""
    if stack == "ours":
        model = ours_model(MODEL)  # puts this checkout's qlora_core on sys.path (bench_train.use_checkout)
        from qlora_core.generation import generate
        if lora:
            from qlora_core.lora import apply_lora
            apply_lora(model, r=16, alpha=32, target_modules=TARGETS)
        model.eval()

        def run(ids, new, on_first, sync_every=16):
            seen = []

            def stream(tokens):
                if not seen:
                    on_first()
                seen.append(tokens)
            return generate(model, ids, new, stream=stream, sync_every=sync_every)
        return model, run

    model = hf_model(MODEL)
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS),
                                                 task_type="CAUSAL_LM"))
    model.eval()
    model.config.use_cache = True  # hf_config turns it off for training (generate gets use_cache=True too)
    model.generation_config.eos_token_id = None  # random weights: never stop early

    class FirstToken:  # transformers' streamer protocol: put(prompt), then put(tokens) per step, end()
        def __init__(self, on_first):
            self.puts, self.on_first = 0, on_first

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.on_first()

        def end(self):
            pass

    def run(ids, new, on_first, sync_every=None):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  do_sample=False, use_cache=True, streamer=FirstToken(on_first))
    return model, run


def timed(run, ids, new, sync_every) -> tuple[float, float, torch.Tensor]:
    """(call seconds, seconds to the first token, output) of one synchronized call."""
    first = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = run(ids, new, lambda: first.append(time.perf_counter()), sync_every)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    return t1 - t0, (first[0] if first else t1) - t0, out


def measure(stack: str, model, run, batch: int, prompt: int, new: int, repeats: int, sync_every: int) -> dict:
    if stack == "ours":
        from qlora_core.generation import release
        release(model)  # the previous shape's cache and graph
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(batch * 10_000 + prompt)
    ids = torch.randint(0, SHAPES[MODEL]["vocab_size"], (batch, prompt), device=dev, generator=g)
    torch.cuda.reset_peak_memory_stats()
    cold, _, _ = timed(run, ids, new if stack == "ours" else 4, sync_every)
    calls = [timed(run, ids, new, sync_every) for _ in range(repeats)]
    out = calls[-1][2]
    if tuple(out.shape) != (batch, prompt + new):
        raise RuntimeError(f"{stack} returned shape {tuple(out.shape)}, expected {(batch, prompt + new)}")
    total = statistics.median(c[0] for c in calls)
    ttft = statistics.median(c[1] for c in calls)
    return {"batch": batch, "prompt": prompt, "new": new, "call_s": total, "ttft_s": ttft,
            "tok_s_row": new / total, "tok_s_total": batch * new / total,
            "decode_tok_s_row": (new - 1) / max(total - ttft, 1e-9), "cold_s": cold,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def profile(run, batch: int, prompt: int, new: int, sync_every: int, top: int = 15) -> None:
    """One call (after the measured ones, so the graph exists) under torch.profiler: the kernels with the most
    device time, grouped by name; graph replays show their kernels too."""
    ids = torch.randint(0, SHAPES[MODEL]["vocab_size"], (batch, prompt), device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(ids, new, lambda: None, sync_every)
        torch.cuda.synchronize()
    print("# " + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top,
                                           max_name_column_width=60).replace("\n", "\n# "))


def worker(stack: str, batches: list[int], prompts: list[int], new: int, repeats: int, lora: bool,
           sync_every: int, prof: bool = False) -> None:
    t0 = time.perf_counter()
    model, run = build(stack, lora)
    print(f"# {stack}: built in {time.perf_counter() - t0:.1f} s, {torch.cuda.memory_allocated() / 2**30:.2f} GiB "
          f"on {torch.cuda.get_device_name()}", flush=True)
    for prompt in prompts:
        for b in batches:
            try:
                row = measure(stack, model, run, b, prompt, new, repeats, sync_every)
            except torch.OutOfMemoryError as e:
                row = {"batch": b, "prompt": prompt, "new": new, "error": f"OOM: {str(e)[:120]}"}
                torch.cuda.empty_cache()
            row.update(stack=stack, model=MODEL, lora=lora)
            print("ROW " + json.dumps(row), flush=True)
            if prof and b == batches[0] and prompt == prompts[0]:
                profile(run, b, prompt, new, sync_every)


def table(rows: list[dict], batches, prompts) -> None:
    by = {(r["stack"], r["prompt"], r["batch"]): r for r in rows}
    cols = ("prompt", "B", "ours tok/s/row", "total", "dec/row", "TTFT ms", "GiB", "cold s",
            "HF tok/s/row", "total", "TTFT ms", "GiB", "x HF", "TTFT x")
    print("\n" + " | ".join(cols))
    for p in prompts:
        for b in batches:
            o, h = by.get(("ours", p, b), {}), by.get(("hf", p, b), {})
            f = lambda r, k, fmt, s=1: format(r[k] * s, fmt) if k in r else r.get("error", "-")[:8]  # noqa: E731
            ratio = f"{o['tok_s_row'] / h['tok_s_row']:.2f}" if "tok_s_row" in o and "tok_s_row" in h else "-"
            tt = f"{h['ttft_s'] / o['ttft_s']:.2f}" if "ttft_s" in o and "ttft_s" in h else "-"
            print(" | ".join([str(p), str(b), f(o, "tok_s_row", ".1f"), f(o, "tok_s_total", ".0f"),
                              f(o, "decode_tok_s_row", ".1f"), f(o, "ttft_s", ".1f", 1e3), f(o, "peak_gib", ".2f"),
                              f(o, "cold_s", ".2f"), f(h, "tok_s_row", ".1f"), f(h, "tok_s_total", ".0f"),
                              f(h, "ttft_s", ".1f", 1e3), f(h, "peak_gib", ".2f"), ratio, tt]))
    print("(x HF: ours / HF tokens/s per row; TTFT x: HF / ours time to first token)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--prompts", nargs="+", type=int, default=[128, 1024], help="prompt lengths (tokens)")
    ap.add_argument("--new", type=int, default=128, help="new tokens per row (eos ignored)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per shape (median reported)")
    ap.add_argument("--stacks", nargs="+", default=["ours", "hf"], choices=["ours", "hf"])
    ap.add_argument("--lora", action="store_true", help="unmerged LoRA r=16 on all 7 projections (both stacks)")
    ap.add_argument("--sync-every", type=int, default=16, help="ours: host check every N tokens")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per stack subprocess")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one call at the first batch and prompt (kernel table, lines starting #)")
    ap.add_argument("--worker", metavar="STACK", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.batches, args.prompts, args.new, args.repeats, args.lora, args.sync_every,
               args.profile)
        return
    info = versions()
    print(f"# {info}")
    rows = []
    for stack in args.stacks:
        if stack == "hf" and (info["bitsandbytes"] is None or info["transformers"] is None):
            print(f"# hf stack skipped: transformers/bitsandbytes not installed ({info})")
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", stack, "--new", str(args.new),
               "--repeats", str(args.repeats), "--sync-every", str(args.sync_every),
               "--batches", *map(str, args.batches), "--prompts", *map(str, args.prompts)]
        cmd += (["--lora"] if args.lora else []) + (["--profile"] if args.profile else [])
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=worker_env(stack))
            out, err = p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = f"timeout after {args.timeout} s"
        print("\n".join(line for line in out.splitlines() if line.startswith("#")))
        got = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
        if len(got) < len(args.batches) * len(args.prompts):
            print(f"# {stack} incomplete after {time.perf_counter() - t0:.0f} s:\n{err[-3000:]}")
        rows += got
    table(rows, args.batches, args.prompts)
    print(json.dumps({"bench": "generate", "model": MODEL, "versions": info, "args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
