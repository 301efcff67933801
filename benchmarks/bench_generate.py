"""Greedy generation speed on Llama-3.1-8B shapes: ours (qlora_core.generation) vs transformers + bitsandbytes.

    source benchmarks/device_setup.sh    # on the device: bitsandbytes from the carried .whl, offline settings
    python benchmarks/bench_generate.py                                        # batch 1 8 32 x prompt 128 1024
    python benchmarks/bench_generate.py --stacks ours --batches 1 --prompts 128  # quick
    python benchmarks/bench_generate.py --lora                                 # unmerged LoRA r=16 on both
    python benchmarks/bench_generate.py --batches 1 --prompts 128 --profile    # + where the device time goes
    python benchmarks/bench_generate.py --stacks ours hf hf-static --batches 1 8 --prompts 128   # + static cache

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
Checks (docs/benchmarks.md): both stacks hold the same weights (_checks.init_param), so per shape the first
`--check` greedy tokens of every row are compared with ours (fraction of rows equal, first position where one
parts); `--stacks ... hf-static` adds transformers with a static cache and its auto torch.compile of the decode
step; ours is also checked against its weights dequantized to bf16 and decoded by `generate_reference` with the
reference ops (>= 95% of rows equal or parting at a near tie, else FAILED and a non-zero exit; `--no-ref`).
The last line printed is one JSON object with every row (tokens left out) and the checks.
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
from _checks import reference_verdict, token_agreement  # noqa: E402

MODEL = "llama-3.1-8b"
STACKS = ("ours", "hf", "hf-static")
PEERS = ("hf", "hf-static")


def build(stack: str, lora: bool):  # noqa: C901
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
    if stack == "hf-static":
        # transformers 5: a static (compileable) cache makes generate torch.compile the decode forward itself
        # (GenerationMixin._valid_auto_compile_criteria; generation_config.compile_config, default
        # mode "reduce-overhead": CUDA graphs); the prefill runs eagerly. No hf_quantizer here (the bnb linears
        # were swapped in by hand), so nothing vetoes the compile.
        model.generation_config.cache_implementation = "static"

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


def prompt_ids(batch: int, prompt: int, device) -> torch.Tensor:
    """(batch, prompt) random ids of one shape: the same for every stack (same seed, same device)."""
    g = torch.Generator(device=device).manual_seed(batch * 10_000 + prompt)
    return torch.randint(0, SHAPES[MODEL]["vocab_size"], (batch, prompt), device=device, generator=g)


def measure(stack: str, model, run, batch: int, prompt: int, new: int, repeats: int, sync_every: int,
            check: int) -> dict:
    """One shape: an untimed call, `repeats` timed ones; the row (timings, peak memory, the first `check` greedy
    tokens of every row of the last call)."""
    if stack == "ours":
        from qlora_core.generation import release
        release(model)  # the previous shape's cache and graph
    ids = prompt_ids(batch, prompt, next(model.parameters()).device)
    torch.cuda.reset_peak_memory_stats()
    # ours and hf-static: the same call first (graph capture / compile for this cache length); hf: 4 tokens
    cold, _, _ = timed(run, ids, 4 if stack == "hf" else new, sync_every)
    calls = [timed(run, ids, new, sync_every) for _ in range(repeats)]
    out = calls[-1][2]
    if tuple(out.shape) != (batch, prompt + new):
        raise RuntimeError(f"{stack} returned shape {tuple(out.shape)}, expected {(batch, prompt + new)}")
    total = statistics.median(c[0] for c in calls)
    ttft = statistics.median(c[1] for c in calls)
    return {"batch": batch, "prompt": prompt, "new": new, "call_s": total, "ttft_s": ttft,
            "tokens": out[:, prompt:prompt + check].tolist(),  # (B, check) greedy ids: main compares the stacks
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


def failure(e: BaseException) -> str:
    """A row's error: the exception class and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


def dense_copy_swap(model) -> None:
    """Replace every QuantLinear of our model, in place, by an nn.Linear holding its weight dequantized to bf16 by
    the reference (ops.quant4.dequantize_as): the same weights, dense, for the reference check."""
    from qlora_core.ops.quant4 import dequantize_as
    from qlora_core.qlinear import QuantLinear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                      device="meta")
                lin.weight = torch.nn.Parameter(dequantize_as(child.weight, torch.bfloat16), requires_grad=False)
                if child.bias is not None:
                    lin.bias = torch.nn.Parameter(child.bias.to(torch.bfloat16), requires_grad=False)
                setattr(parent, name, lin)
    for layer in model.model.layers:  # lora.project's module-by-module path: no grouped GEMM in the reference
        layer.self_attn.fuse_projections = layer.mlp.fuse_projections = False
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """ids (B, T) -> fp32 logits (B, V) of the last position (lm_head on that position only)."""
    return model.lm_head(model.model(ids)[:, -1]).float()


@torch.no_grad()
def reference_rows(model, shapes: list[tuple[int, int]], ours: dict, first: dict) -> list[dict]:
    """The reference check, after every timed call: ours' greedy tokens (ours[(prompt, batch)], (B, N)) against
    the same model dequantized to bf16 (dense_copy_swap) decoded by generate_reference under the reference
    backend (eager PyTorch ops), plus the largest first-step logit difference (first[(prompt, batch)]: ours'
    last-position logits, taken before the swap). One REF row per shape."""
    from qlora_core import backend
    from qlora_core.generation import generate_reference, release

    release(model)
    dense_copy_swap(model)
    dev = model.lm_head.weight.device
    rows = []
    for prompt, b in shapes:
        t0 = time.perf_counter()
        row = {"stack": "ref", "prompt": prompt, "batch": b}
        try:
            ids, mine = prompt_ids(b, prompt, dev), ours[prompt, b].to(dev)
            n = mine.shape[1]
            with backend.forced("reference"):
                ref = generate_reference(model, ids, n)[:, prompt:]  # (B, N)
                row["max_dlogit_first"] = float((last_logits(model, ids) - first[prompt, b]).abs().max())
                h = model.model(torch.cat([ids, mine], dim=1)[:, :-1])[:, prompt - 1:]  # (B, N, d): along ours
                logits = model.lm_head(h).float().cpu()
            row.update(reference_verdict(logits, mine.cpu(), ref.cpu()))
        except Exception as e:  # noqa: BLE001  (the timed rows stand; this row says why it has no check)
            row["error"] = failure(e)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        row["check_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return rows


def worker(stack: str, batches: list[int], prompts: list[int], new: int, repeats: int, lora: bool,
           sync_every: int, prof: bool = False, check: int = 32, ref: bool = True) -> None:
    """Build one stack and print a ROW line per shape (a failure is a row with "error"); ours then prints the
    reference check's REF lines."""
    t0 = time.perf_counter()
    try:
        model, run = build(stack, lora)
    except Exception as e:  # noqa: BLE001  (hf-static: the row says how the stronger peer failed)
        for prompt in prompts:
            for b in batches:
                print("ROW " + json.dumps({"batch": b, "prompt": prompt, "new": new, "stack": stack, "model": MODEL,
                                           "lora": lora, "error": failure(e)}), flush=True)
        raise
    print(f"# {stack}: built in {time.perf_counter() - t0:.1f} s, {torch.cuda.memory_allocated() / 2**30:.2f} GiB "
          f"on {torch.cuda.get_device_name()}", flush=True)
    tokens, first = {}, {}
    for prompt in prompts:
        for b in batches:
            try:
                row = measure(stack, model, run, b, prompt, new, repeats, sync_every, check)
            except Exception as e:  # noqa: BLE001  (an OOM or a compile failure is a row too)
                row = {"batch": b, "prompt": prompt, "new": new, "error": failure(e)}
                torch.cuda.empty_cache()
            row.update(stack=stack, model=MODEL, lora=lora)
            if stack == "hf-static":  # did generate's auto-compile run (PreTrainedModel.get_compiled_call)?
                row["compiled"] = any(hasattr(m, "_compiled_call") for m in model.modules())
            print("ROW " + json.dumps(row), flush=True)
            if stack == "ours" and ref and "tokens" in row:
                tokens[prompt, b] = torch.tensor(row["tokens"])
                with torch.no_grad():  # the quantized model's first-step logits: the swap below drops it
                    first[prompt, b] = last_logits(model, prompt_ids(b, prompt, model.lm_head.weight.device))
            if prof and b == batches[0] and prompt == prompts[0]:
                profile(run, b, prompt, new, sync_every)
    if tokens:
        for row in reference_rows(model, list(tokens), tokens, first):
            print("REF " + json.dumps(row), flush=True)


def checks(rows: list[dict], refs: list[dict]) -> list[dict]:
    """Per shape: ours' greedy tokens vs each peer's (token_agreement) and the reference check's row."""
    by = {(r["stack"], r["prompt"], r["batch"]): r for r in rows}
    out = []
    for (stack, prompt, b), r in by.items():
        o = by.get(("ours", prompt, b), {})
        if stack in PEERS and "tokens" in r and "tokens" in o:
            out.append(dict(vs=stack, prompt=prompt, batch=b,
                            **token_agreement(torch.tensor(o["tokens"]), torch.tensor(r["tokens"]))))
    return out + [dict(r, vs="ref") for r in refs]


def table(rows: list[dict], found: list[dict], batches, prompts) -> None:
    """One line per shape: ours, then each peer (tok/s, TTFT, GiB, ours/peer, rows with equal greedy tokens, the
    first position where they part), then the reference check."""
    by = {(r["stack"], r["prompt"], r["batch"]): r for r in rows}
    chk = {(c["vs"], c["prompt"], c["batch"]): c for c in found}
    peers = [p for p in PEERS if any(r["stack"] == p for r in rows)]
    cols = ["prompt", "B", "ours tok/s/row", "total", "dec/row", "TTFT ms", "GiB", "cold s"]
    for p in peers:
        cols += [f"{p} tok/s/row", "TTFT ms", "GiB", f"x {p}", "= rows", "1st diff"]
    cols += ["ref = rows", "ref ok rows", "ref 1st diff", "max dlogit", "ref check"]
    print("\n" + " | ".join(cols))
    f = lambda r, k, fmt, s=1: format(r[k] * s, fmt) if r.get(k) is not None else r.get("error", "-")[:8]  # noqa
    for prompt in prompts:
        for b in batches:
            o = by.get(("ours", prompt, b), {})
            line = [str(prompt), str(b), f(o, "tok_s_row", ".1f"), f(o, "tok_s_total", ".0f"),
                    f(o, "decode_tok_s_row", ".1f"), f(o, "ttft_s", ".1f", 1e3), f(o, "peak_gib", ".2f"),
                    f(o, "cold_s", ".2f")]
            for p in peers:
                h, c = by.get((p, prompt, b), {}), chk.get((p, prompt, b), {})
                ratio = f"{o['tok_s_row'] / h['tok_s_row']:.2f}" if "tok_s_row" in o and "tok_s_row" in h else "-"
                line += [f(h, "tok_s_row", ".1f"), f(h, "ttft_s", ".1f", 1e3), f(h, "peak_gib", ".2f"), ratio,
                         f(c, "rows_equal", ".0%"), str(c.get("first_diff", "-"))]
            c = chk.get(("ref", prompt, b), {})
            verdict = "-" if "rows_ok" not in c else ("FAILED" if c["failed"] else "ok")
            line += [f(c, "rows_equal", ".0%"), f(c, "rows_ok", ".0%"), str(c.get("first_diff", "-")),
                     f(c, "max_dlogit_first", ".3f"), verdict]
            print(" | ".join(line))
    print("(x peer: ours / peer tokens/s per row; = rows: rows whose first --check greedy tokens equal ours; 1st "
          "diff: the earliest position where a row parts (None: none); ref: ours vs the same weights dequantized "
          "to bf16, eager reference ops; ref ok rows: equal, or parting where the reference's logits of the two "
          "tokens are within tie_tol; max dlogit: first step's largest |logit difference|)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--prompts", nargs="+", type=int, default=[128, 1024], help="prompt lengths (tokens)")
    ap.add_argument("--new", type=int, default=128, help="new tokens per row (eos ignored)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per shape (median reported)")
    ap.add_argument("--stacks", nargs="+", default=["ours", "hf"], choices=STACKS,
                    help="hf-static: transformers' static cache + its auto torch.compile of the decode step "
                    "(compiles once per shape: ~1 min each)")
    ap.add_argument("--lora", action="store_true", help="unmerged LoRA r=16 on all 7 projections (both stacks)")
    ap.add_argument("--sync-every", type=int, default=16, help="ours: host check every N tokens")
    ap.add_argument("--check", type=int, default=32, help="greedy tokens per row compared between stacks and with "
                    "the reference (<= --new)")
    ap.add_argument("--no-ref", action="store_true", help="skip the reference check (ours vs its weights "
                    "dequantized to bf16, eager reference ops; a few seconds per shape and 16 GiB more at 8B)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per stack subprocess")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one call at the first batch and prompt (kernel table, lines starting #)")
    ap.add_argument("--worker", metavar="STACK", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.check = min(args.check, args.new)
    return args


def run_stack(stack: str, args) -> tuple[list[dict], list[dict]]:
    """One stack's subprocess: its ROW dicts and (ours) REF dicts; prints its # lines and, when rows are
    missing, its stderr tail."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", stack, "--new", str(args.new),
           "--repeats", str(args.repeats), "--sync-every", str(args.sync_every), "--check", str(args.check),
           "--batches", *map(str, args.batches), "--prompts", *map(str, args.prompts)]
    cmd += (["--lora"] if args.lora else []) + (["--profile"] if args.profile else [])
    cmd += ["--no-ref"] if args.no_ref else []
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=worker_env(stack))
        out, err = p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = f"timeout after {args.timeout} s"
    print("\n".join(line for line in out.splitlines() if line.startswith("#")))
    got = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    refs = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("REF ")]
    if len(got) < len(args.batches) * len(args.prompts) or any("error" in r for r in got):
        print(f"# {stack} incomplete or failing after {time.perf_counter() - t0:.0f} s:\n{err[-3000:]}")
    return got, refs


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.batches, args.prompts, args.new, args.repeats, args.lora, args.sync_every,
               args.profile, args.check, not args.no_ref)
        return
    info = versions()
    print(f"# {info}")
    rows, refs = [], []
    for stack in args.stacks:
        if stack in PEERS and (info["bitsandbytes"] is None or info["transformers"] is None):
            print(f"# {stack} stack skipped: transformers/bitsandbytes not installed ({info})")
            continue
        got, ref = run_stack(stack, args)
        rows, refs = rows + got, refs + ref
    found = checks(rows, refs)
    table(rows, found, args.batches, args.prompts)
    bad = [c for c in found if c.get("failed")]
    for c in bad:
        print(f"FAILED reference check: prompt {c['prompt']} batch {c['batch']}: {c['failed']}")
    for r in rows:
        r.pop("tokens", None)  # compared above (checks); (B, N) ids would swamp the JSON line
    print(json.dumps({"bench": "generate", "model": MODEL, "versions": info, "args": vars(args), "rows": rows,
                      "checks": found}))
    if bad:
        sys.exit(f"bench_generate.py: {len(bad)} shape(s) FAILED the reference check")


if __name__ == "__main__":
    main()
