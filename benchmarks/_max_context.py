"""bench_train.py's long-context modes: `--max-context` (the longest T whose batch-1 step completes under a GPU
budget) and `--context-table` (tok/s at fixed long T).

The search is pure (next_probe, estimate_s, run_ladder: tests/test_bench_train.py runs them on fake memory and a
fake clock); the probe and the cap touch the GPU. A probe is one training step at batch 1 and length T:
- ascending from Ladder.start by doubling until a step fails (OOM, or over the budget) or would not finish in the
  worker's time, then bisection between the longest success and the shortest failure down to Ladder.granularity;
- a probe whose estimated time exceeds what the worker has left is not started (outcome "slow"): attention is
  quadratic, so t(T2) <= t(T1) * (T2 / T1)^2 bounds a longer step from the longest completed one (compile and
  autotune at a new T included, since that probe's wall time had them too; after the warm re-measure at the start
  T, the warm-up's compile time is added: a new T compiles again);
- each probe prints a ROW line at once and appends it to --log (a killed run keeps the probes it finished).
The budget (GpuCap): torch.cuda.set_per_process_memory_fraction caps the caching allocator at the budget less
what the device already used before the first allocation (the CUDA context), and after each step the peak of
max_memory_reserved and of device used (cudaMemGetInfo, polled: also memory outside torch's allocator, e.g. bnb's
paged optimizer) must stay within the budget, so a stack whose memory lives elsewhere cannot pass. On the CPU
(--smoke) no cap exists: a pure-Python stand-in charges SMOKE_BYTES_PER_TOKEN per token.
One step at lr 1e-3 says nothing about training (the loss of a long batch may rise after one update: 12.56 ->
14.24 at 131k), so probe and table rows record the losses and carry no train check.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import time

import torch

from _checks import grad_summary, learnable_stream

GIB = 2**30
ALIGN = 2048  # every T probed on the GPU is a multiple of this (kernel tiles, the planner's chunk sizes)
SMOKE_BYTES_PER_TOKEN = 2**20  # --smoke's stand-in for device memory: 1 MiB per token
OK, FAILED = "ok", ("oom", "over", "slow")  # probe outcomes; "error" (anything else) ends the search
# ours without --policy / --budget plans per T for this share of the budget: the planner counts bytes
# (max_memory_allocated's measure) while the cap holds reserved bytes, which fragmentation puts above them
PLAN_SHARE = 0.9
CONTEXT_TABLE = (16384, 32768, 65536, 131072)


@dataclasses.dataclass(frozen=True)
class Ladder:
    """How --max-context searches T."""
    start: int = 16384         # first T (doubled while steps fit)
    granularity: int = 8192    # bisection stops once the longest success and shortest failure are this close
    ceiling: int = 262144      # never probe beyond this T
    align: int = ALIGN         # every T a multiple of this

    def __post_init__(self):
        if min(self.start, self.granularity) < self.align or self.start % self.align or \
                self.granularity % self.align or self.ceiling < self.start:
            raise ValueError(f"--mc-start {self.start} and --mc-step {self.granularity} must be positive multiples "
                             f"of {self.align}, --mc-ceiling {self.ceiling} >= the start")


def bounds(history: list[dict]) -> tuple[int, int | None]:
    """(longest T that completed, 0 if none; shortest T that failed or was too slow, None if none)."""
    lo = max((h["T"] for h in history if h["outcome"] == OK), default=0)
    hi = min((h["T"] for h in history if h["outcome"] in FAILED), default=None)
    return lo, hi


def next_probe(history: list[dict], ladder: Ladder) -> int | None:
    """The next T to probe given the probes so far ({"T", "outcome"} each), or None when the search is done:
    Ladder.start first, then doubling past the longest success while nothing failed (capped at the ceiling),
    then the aligned midpoint between the longest success and the shortest failure until they are
    `granularity` apart. An "error" probe (not a memory failure) ends the search."""
    if not history:
        return ladder.start
    if any(h["outcome"] not in (OK, *FAILED) for h in history):
        return None
    lo, hi = bounds(history)
    if hi is None:
        return min(2 * lo, ladder.ceiling) if lo < ladder.ceiling else None
    if hi - lo <= ladder.granularity:
        return None
    mid = lo + max((hi - lo) // 2 // ladder.granularity, 1) * ladder.granularity
    return mid if mid < hi else None


def estimate_s(history: list[dict], T: int) -> float | None:
    """Upper bound on a probe's seconds at T from the longest completed probe (T1, wall t1): t1 * (T / T1)^2
    above T1 (a step's cost grows at most quadratically: attention), t1 at or below it; None before any success."""
    done = [h for h in history if h["outcome"] == OK]
    if not done:
        return None
    last = max(done, key=lambda h: h["T"])
    return last["wall_s"] * max(1.0, (T / last["T"]) ** 2)


def run_ladder(probe, ladder: Ladder, seconds_left, emit=lambda row: None, history=(), warmup=None) -> list[dict]:
    """Search T: probe(T) -> row with "T", "outcome" and "wall_s"; seconds_left() -> seconds this worker has;
    emit(row) is called for every probe, the ones not started included. `history`: probes already made (a
    failed warm-up). `warmup`: the warm-up's row when it passed (the first step at ladder.start). Returns every
    row in order.

    A T not probed yet pays its compile / autotune again (a new shape); a warm step's time scaled by
    estimate_s does not hold it. So while the longest completed probe was not the first at its T, the estimate
    adds what the warm-up took beyond the re-measured step at its T (otherwise a 3 s step would be started with
    15 s left and compile for 40 s past the worker's timeout)."""
    history = list(history)

    def estimate(T: int) -> float | None:
        est = estimate_s(history, T)
        done = [h for h in history if h["outcome"] == OK]
        if est is None or warmup is None or any(h["T"] == T for h in history):
            return est
        again = next((h for h in done if h["T"] == warmup["T"]), None)
        if again is None or max(done, key=lambda h: h["T"]).get("first_at_T", True):
            return est  # the longest completed probe's wall time held its own compile: scaled with it
        return est + max(0.0, warmup["wall_s"] - again["wall_s"])

    while (T := next_probe(history, ladder)) is not None:
        est, left = estimate(T), seconds_left()
        if est is not None and est > left:
            row = {"T": T, "outcome": "slow", "estimate_s": est, "left_s": left, "wall_s": 0.0}
        else:
            row = probe(T)
        history.append(row)
        emit(row)
    return history


def summary(history: list[dict]) -> dict:
    """The longest completed probe's row (None if none) and what stopped the search above it. At the start T
    the warm re-measure, not the warm-up (whose time holds compile and autotune): the last such row."""
    lo, hi = bounds(history)
    best = next((h for h in reversed(history) if h["outcome"] == OK and h["T"] == lo), None)
    stop = next((h for h in history if h["T"] == hi and h["outcome"] in FAILED), None) if hi else None
    return {"max_T": lo, "best": best, "stop": None if stop is None else f"{stop['outcome']} at {hi}"}


# -- the budget ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GpuCap:
    """A GPU memory budget for one worker (CUDA: applied to torch's allocator and checked after each step; CPU:
    the SMOKE_BYTES_PER_TOKEN stand-in)."""
    gib: float
    device: str
    context_gib: float = 0.0  # device memory in use before the first allocation (CUDA context)

    def apply(self) -> dict:
        """Cap the caching allocator at gib less the CUDA context; call before the first allocation."""
        if self.device != "cuda":
            return {"cap": f"CPU stand-in: {SMOKE_BYTES_PER_TOKEN} bytes per token"}
        free, total = torch.cuda.mem_get_info()
        self.context_gib = (total - free) / GIB
        fraction = max(self.gib - self.context_gib, 0.0) * GIB / total
        torch.cuda.set_per_process_memory_fraction(min(fraction, 1.0))
        return {"cap_fraction": fraction, "context_gib": self.context_gib, "total_gib": total / GIB}

    def over(self, row: dict) -> str | None:
        """Why a completed step broke the budget, or None."""
        if self.device != "cuda":
            used = row["T"] * SMOKE_BYTES_PER_TOKEN / GIB
            return f"stand-in {used:.3f} GiB > {self.gib:g} GiB" if used > self.gib else None
        used = max(row["reserved_gib"], row["device_used_gib"])
        return f"{used:.2f} GiB (reserved or device used) > {self.gib:g} GiB" if used > self.gib else None


# -- one probe ----------------------------------------------------------------------------------------------------
def closure_var(fn, name: str):
    """The value a closure (a stack's step) holds under `name`, or None: the step's params and model, without
    changing how the stacks build it."""
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    return fn.__closure__[names.index(name)].cell_contents if name in names else None


def is_oom(e: BaseException) -> bool:
    """torch's OutOfMemoryError (the allocator, its per-process cap) or a library's CUDA allocation failure."""
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def release(step, device: str) -> str | None:
    """After a failed probe: drop the partial LoRA grads (the optimizer did not step, its state stays), collect
    the failed step's tensors and hand the cached blocks back, then reset the peak counters. Returns why the CUDA
    cleanup failed, or None: after a non-memory CUDA error (a sticky one: illegal address, launch failure) the
    context is broken and synchronize raises; the failed probe's row must still be emitted rather than lost with
    the worker (its "error" outcome ends the search anyway)."""
    for p in closure_var(step, "params") or []:
        p.grad = None
    gc.collect()
    if device == "cuda":
        try:
            torch.cuda.synchronize()  # side streams (host offload copies) may still hold blocks of the failed step
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            getattr(torch.cuda, "reset_peak_host_memory_stats", lambda: None)()
        except Exception as e:  # noqa: BLE001  (reported in the row; the search ends on it)
            return f"{type(e).__name__}: {str(e)[:160]}"
    return None


def plan_of(step, T: int) -> str | None:
    """Ours under a MemoryBudget: the plan it made for (1, T) (re-planned per T: the plans are keyed by shape)."""
    model = closure_var(step, "model")
    budget = getattr(getattr(model, "model", None), "checkpoint_policy", None)
    p = getattr(budget, "plans", {}).get((T, T))
    return None if p is None else f"{p.describe()} (est. {p.gpu_bytes / GIB:.1f} GiB{'' if p.fits else ', over'})"


def step_once(step, ids: torch.Tensor, device: str, mem) -> dict:
    """One synchronized training step on ids (1, T) with memory peaks; raises what the step raises."""
    cuda = device == "cuda"
    if cuda:  # the cache of earlier probes out: this probe's reserved and device-used peaks are its own
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        getattr(torch.cuda, "reset_peak_host_memory_stats", lambda: None)()
    mem.reset()
    t0 = time.perf_counter()
    loss, norms = step(ids, ids)
    if cuda:
        torch.cuda.synchronize()
    row = {"step_s": time.perf_counter() - t0, "loss_before": float(loss), **grad_summary(norms)}
    mem.poll()
    row["rss_peak_gib"] = mem.rss_peak / GIB
    return row


def probe(step, T: int, vocab: int, device: str, cap: GpuCap, mem, pinned_stats, first_at_T: bool) -> dict:
    """One training step at (1, T) under `cap`: the row (outcome ok / oom / over / error, step time, tok/s,
    memory peaks, the loss of the batch before and after the update, ours' plan). Cleans up after a failure."""
    ids = learnable_stream(1, 1, T, vocab, seed=T)[0].to(device)
    row, t0 = {"T": T, "first_at_T": first_at_T}, time.perf_counter()
    try:
        row.update(step_once(step, ids, device, mem))
        row["outcome"] = OK
    except Exception as e:  # noqa: BLE001  (memory failures are the measurement; anything else ends the search)
        row.update(outcome="oom" if is_oom(e) else "error", error=f"{type(e).__name__}: {str(e)[:200]}")
    if device == "cuda":
        row.update(gpu_gib=torch.cuda.max_memory_allocated() / GIB,
                   reserved_gib=torch.cuda.max_memory_reserved() / GIB, device_used_gib=mem.dev_peak / GIB,
                   **pinned_stats())
    row["plan"] = plan_of(step, T)
    if row["outcome"] == OK:
        row["tok_s"] = T / row["step_s"]
        row["over"] = cap.over(row)
        row["outcome"] = "over" if row["over"] else OK
        row["loss_after"] = loss_after(step, ids, row)
    elif (why := release(step, device)) is not None:
        row.update(outcome="error", release_error=why)  # a broken context: no later probe can be trusted
    row["wall_s"] = time.perf_counter() - t0
    return row


def loss_after(step, ids: torch.Tensor, row: dict) -> float | None:
    """The loss of the probe's batch after its update (a forward alone); None and row["eval_error"] when that
    forward fails (a peer's full-vocabulary logits at long T need more memory than its training step)."""
    try:
        return float(step(ids, ids, train=False)[0])
    except Exception as e:  # noqa: BLE001  (the probe's verdict stands without it)
        row["eval_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    return None


def line(row: dict) -> str:
    """One human line per probe or table row (also written to --log as it happens)."""
    if "outcome" not in row:  # a --context-table row (measure's)
        return f"T={row['seq']}: " + (row.get("error") or f"{row['tok_s']:,.0f} tok/s, step {row['step_s']:.2f} s, "
                                      f"warm-up {row['warmup_s'][0]:.1f} s")
    if row["outcome"] == "slow":
        return f"T={row['T']}: not started (estimated {row['estimate_s']:.0f} s > {row['left_s']:.0f} s left)"
    parts = [f"T={row['T']}", row["outcome"], f"wall {row['wall_s']:.1f} s"]
    if "tok_s" in row:
        parts += [f"step {row['step_s']:.2f} s", f"{row['tok_s']:,.0f} tok/s"]
    for k in ("gpu_gib", "reserved_gib", "device_used_gib", "pinned_gib", "rss_peak_gib"):
        if row.get(k) is not None:
            parts.append(f"{k[:-4]} {row[k]:.2f} GiB")
    if "loss_before" in row:
        after = row.get("loss_after")
        parts.append(f"loss {row['loss_before']:.3f} > {'-' if after is None else f'{after:.3f}'}")
    parts += ["first step at this T" if row.get("first_at_T") else "not the first step at this T"]
    return ", ".join(parts + [row[k] for k in ("error", "over", "plan") if row.get(k)])


def emitter(tag: dict, live_log: str | None):
    """emit(row): print `ROW {json}` (row + tag) at once and append it, with its human line, to live_log."""
    def emit(row: dict) -> None:
        full = dict(row, **tag)
        where = f"{tag['budget_gib']:g} GiB" if tag.get("budget_gib") else "table"
        text = f"# {tag['stack']} {tag['model']} {where}: {line(row)}\nROW {json.dumps(full)}"
        print(text, flush=True)
        if live_log:
            with open(live_log, "a") as f:
                f.write("LIVE " + text.replace("\nROW", "\nLIVE ROW") + "\n")
    return emit


# -- the workers --------------------------------------------------------------------------------------------------
def max_context_worker(step, vocab: int, a, cap: GpuCap, emit, sampler_cls, pinned_stats) -> list[dict]:
    """The search of one (stack, budget) worker on a built stack: a warm-up step at the start T (compile,
    autotune and optimizer pages, so the first probe's wall time, which scales the estimates, is a step's), then
    run_ladder until a.stop_at (epoch seconds). Returns every probe row (the warm-up's too)."""
    align = ALIGN if a.device == "cuda" else 64
    ladder = Ladder(a.mc_start, a.mc_step, a.mc_ceiling, align)
    seen = set()

    def run(T: int) -> dict:
        row = probe(step, T, vocab, a.device, cap, mem, pinned_stats, first_at_T=T not in seen)
        seen.add(T)
        return row

    with sampler_cls(a.device == "cuda") as mem:
        first = dict(run(ladder.start), warmup=True)
        emit(first)
        # a warm-up that failed is the first probe's answer; one that passed is re-measured as a probe
        passed = first["outcome"] == OK
        return [first] + run_ladder(run, ladder, lambda: a.stop_at - time.time(), emit,
                                    [] if passed else [first], warmup=first if passed else None)


def table_worker(step, vocab: int, a, emit, measure) -> list[dict]:
    """tok/s at each --context-table T, ascending (the longest last: its OOM or timeout loses nothing before it):
    one warm-up and one timed step each (measure, no train check); stops at the first OOM and skips a T whose
    estimate (the last completed T's wall time, scaled as estimate_s) exceeds the time left."""
    rows, last = [], None
    for T in sorted(a.context_table):
        left = a.stop_at - time.time()
        est = None if last is None else last[1] * max(1.0, (T / last[0]) ** 2)
        if est is not None and est > left:
            row = {"batch": 1, "seq": T, "error": f"not started: estimated {est:.0f} s > {left:.0f} s left"}
        else:
            t0 = time.perf_counter()
            try:
                row = measure(step, 1, T, vocab, 1, a.device, warmup=1, check=False)
            except Exception as e:  # noqa: BLE001  (an OOM is this T's answer; anything else too, for the table)
                row = {"batch": 1, "seq": T, "error": f"{'OOM' if is_oom(e) else type(e).__name__}: {str(e)[:160]}"}
            if "error" not in row:  # a step's time scales; a T that failed at once says nothing of the next
                last = (T, time.perf_counter() - t0)
            elif (why := release(step, a.device)) is not None:
                row["release_error"] = why  # the CUDA context is broken: no later T can run
        row["plan"] = plan_of(step, T)
        rows.append(row)
        emit(row)
        if row.get("error", "").startswith("OOM") or "release_error" in row:
            break
    return rows


# -- the tables (the driver prints them) --------------------------------------------------------------------------
def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def max_context_rows(rows: list[dict], labels: dict) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the max-context table: per (model, budget, stack) the longest T that completed, what
    stopped the search above it, tok/s and host memory at that T, its losses, and ours' max T over Unsloth's."""
    head = ["model", "budget GiB", "stack", "max T", "stopped by", "tok/s at T", "step s", "GPU GiB", "dev used",
            "pinned GiB", "RSS GiB", "loss before>after", "ours/Unsloth T"]
    probes = [r for r in rows if r.get("kind") == "probe"]
    keys = list(dict.fromkeys((r["model"], r["budget_gib"], r["stack"]) for r in probes))
    found = {k: summary([r for r in probes if (r["model"], r["budget_gib"], r["stack"]) == k]) for k in keys}
    body = []
    for (model, budget, stack), s in found.items():
        b = s["best"] or {}
        killed = next((r for r in probes if (r["model"], r["budget_gib"], r["stack"]) == (model, budget, stack)
                       and r["outcome"] == "killed"), None)
        failed = next((r for r in probes if (r["model"], r["budget_gib"], r["stack"]) == (model, budget, stack)
                       and r["outcome"] not in (OK, *FAILED, "killed")), None)  # an error ends the search too
        stop = s["stop"] or (f"{failed['outcome']} at {failed['T']}: {failed.get('error', '')}"[:40] if failed
                             else f"worker: {killed['error']}"[:40] if killed else "ceiling")
        un = found.get((model, budget, "unsloth"))
        vs = f"{s['max_T'] / un['max_T']:.2f}x" if stack == "ours" and un and un["max_T"] else "-"
        after = b.get("loss_after")
        loss = f"{b['loss_before']:.2f}>{fmt(after, '.2f')}" if b else "-"
        body.append([model, f"{budget:g}", labels[stack], f"{s['max_T']:,}" if s["max_T"] else "none",
                     stop, fmt(b.get("tok_s"), ",.0f"), fmt(b.get("step_s"), ".2f"),
                     fmt(b.get("gpu_gib"), ".2f"), fmt(b.get("device_used_gib"), ".2f"),
                     fmt(b.get("pinned_gib"), ".2f"),
                     fmt(b.get("rss_peak_gib"), ".2f"), loss, vs])
    return head, body


def context_rows(rows: list[dict], labels: dict, stacks: list[str]) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the --context-table table: per (model, T) each stack's tok/s, GPU and pinned GiB, then
    ours/Unsloth tok/s."""
    table = [r for r in rows if r.get("kind") == "table"]
    got = {(r["model"], r["seq"], r["stack"]): r for r in table}
    stacks = [s for s in stacks if any(r["stack"] == s for r in table)]
    head = ["model", "T"] + [f"{labels[s]} {c}" for s in stacks for c in ("tok/s", "GPU GiB", "pinned GiB")]
    head += ["ours/Unsloth tok/s"] if {"ours", "unsloth"} <= set(stacks) else []
    body = []
    for model, T in dict.fromkeys((r["model"], r["seq"]) for r in table):
        line_ = [model, f"{T:,}"]
        for s in stacks:
            r = got.get((model, T, s), {})
            cells = [fmt(r.get(k), spec) for k, spec in (("tok_s", ",.0f"), ("gpu_gib", ".2f"), ("pinned_gib", ".2f"))]
            line_ += ["OOM", "-", "-"] if r.get("error", "").startswith("OOM") else cells
        if {"ours", "unsloth"} <= set(stacks):
            o, u = got.get((model, T, "ours"), {}), got.get((model, T, "unsloth"), {})
            line_.append(f"{o['tok_s'] / u['tok_s']:.2f}x" if o.get("tok_s") and u.get("tok_s") else "-")
        body.append(line_)
    return head, body


def probe_rows(rows: list[dict], labels: dict) -> tuple[list[str], list[list[str]]]:
    """(header, body) of every probe in order: the JSON's rows, readable."""
    head = ["stack", "budget", "T", "outcome", "first at T", "step s", "tok/s", "GPU GiB", "reserved", "dev used",
            "pinned", "RSS", "loss before>after", "note"]
    body = []
    for r in (r for r in rows if r.get("kind") == "probe"):
        loss = f"{r['loss_before']:.3f}>{fmt(r.get('loss_after'), '.3f')}" if "loss_before" in r else "-"
        note = r.get("error") or r.get("over") or (f"est. {r['estimate_s']:.0f} s > {r['left_s']:.0f} s left"
                                                    if r["outcome"] == "slow" else r.get("plan") or "")
        T = "-" if r["T"] is None else f"{r['T']:,}" + (" (warm-up)" if r.get("warmup") else "")
        first = "-" if "first_at_T" not in r else "yes" if r["first_at_T"] else "no"
        body.append([labels[r["stack"]], f"{r['budget_gib']:g}", T, r["outcome"], first, fmt(r.get("step_s"), ".2f"),
                     fmt(r.get("tok_s"), ",.0f"), fmt(r.get("gpu_gib"), ".2f"), fmt(r.get("reserved_gib"), ".2f"),
                     fmt(r.get("device_used_gib"), ".2f"), fmt(r.get("pinned_gib"), ".2f"),
                     fmt(r.get("rss_peak_gib"), ".2f"), loss, str(note)[:70]])
    return head, body
