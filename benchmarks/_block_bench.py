"""The harness that bench_rmsnorm.py, bench_rope.py, bench_swiglu.py and bench_linear_ce.py share: shapes, timing,
peak memory, the table and the JSON line. Each script supplies one `steps` function and calls `main`.

Shapes: Llama-3.1-8B (d 4096, I 14336, 32/8 heads of 128, vocab 128256), M = B*T rows (default 2048 and 8192),
bf16. Each step is one forward and one backward (grads fed in), timed with triton.testing.do_bench (median; it
clears L2 before each rep). Columns:
  * ms, and the ratio of each peer's ms to ours (> 1: we are faster);
  * GB/s from the bytes an elementwise op's forward + backward must move, or TFLOP/s for a GEMM-bound one;
  * MiB: peak memory allocated by one step above its inputs.
Peers: torch = the PyTorch code our op replaces (its reference), liger = Liger-Kernel's op when
liger_kernel.transformers.functional imports. Prints a table, then one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's qlora_core

SHAPES_8B = dict(d=4096, I=14336, H=32, KVH=8, D=128, V=128256)
SHAPES_SMOKE = dict(d=64, I=96, H=4, KVH=2, D=16, V=1000)


def load_liger():
    """liger_kernel's functional ops, or None (it is optional: the peer column is then empty)."""
    try:
        from liger_kernel.transformers import functional as lf
        return lf
    except Exception as e:  # noqa: BLE001 - any import failure only removes the peer column
        print(f"liger_kernel unavailable ({type(e).__name__}: {e}); its column is empty", file=sys.stderr)
        return None


def timed(step, device) -> float:
    """Median ms of step() (do_bench on CUDA; a plain median of 5 runs in --smoke on the CPU)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(step, warmup=10, rep=100, return_mode="median")
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[2]


def peak_mib(step, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def run(op, steps_fn, M, shapes, dev, trainable, lf) -> list[dict]:
    """One row per implementation: steps_fn(M, shapes, dev, trainable, lf) -> ({name: step}, params whose grads
    are cleared after each step, bytes moved, flops); a failing implementation gives a row with its error."""
    steps, params, nbytes, flops = steps_fn(M, shapes, dev, trainable, lf)
    rows = []
    for name, step in steps.items():
        def clean_step():
            step()
            for p in params:
                p.grad = None
        try:
            clean_step()  # compile / warm up
            ms = timed(clean_step, dev)
            mib = peak_mib(clean_step, dev)
        except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
            rows.append({"op": op, "M": M, "impl": name, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        rows.append({"op": op, "M": M, "impl": name, "ms": ms, "peak_mib": mib,
                     "gbs": nbytes / ms / 1e6 if not flops else None,
                     "tflops": flops / ms / 1e9 if flops else None})
    ours = next((r["ms"] for r in rows if r["impl"] == "ours" and "ms" in r), None)
    for r in rows:
        r["ratio_vs_ours"] = r["ms"] / ours if ours and "ms" in r else None
    return rows


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(op: str, steps_fn, doc: str, trainable: bool = False) -> None:
    """The command line of one benchmark script: --rows, --smoke, and --trainable where the op has a weight."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2048, 8192], help="M = B*T rows (multiples of 2048)")
    if trainable:
        ap.add_argument("--trainable", action="store_true", help="the weight gets gradients too")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU (checks the script)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    script = os.path.basename(sys.argv[0])
    if dev.type != "cuda" and not args.smoke:
        sys.exit(f"{script} needs a CUDA GPU (or --smoke)")
    shapes = SHAPES_SMOKE if args.smoke else SHAPES_8B
    rows_list = [16, 32] if args.smoke else args.rows
    train = getattr(args, "trainable", False)
    lf = load_liger()
    import triton
    env = {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "triton": triton.__version__, "liger": getattr(sys.modules.get("liger_kernel"), "__version__", None),
           "date": time.strftime("%Y-%m-%d"), "shapes": shapes, "trainable": train, "command": " ".join(sys.argv)}
    torch.manual_seed(0)
    results = []
    print(f"{'op':9} {'M':>6} {'impl':6} {'ms':>9} {'GB/s':>7} {'TFLOP/s':>8} {'MiB':>8} {'x ours':>7}")
    for M in rows_list:
        for r in run(op, steps_fn, M, shapes, dev, train, lf):
            results.append(r)
            if "error" in r:
                print(f"{op:9} {M:6d} {r['impl']:6} error: {r['error']}")
                continue
            print(f"{op:9} {M:6d} {r['impl']:6} {r['ms']:9.3f} {fmt(r['gbs'], '7.0f')} "
                  f"{fmt(r['tflops'], '8.1f')} {fmt(r['peak_mib'], '8.0f')} {fmt(r['ratio_vs_ours'], '7.2f')}")
    print(json.dumps({"bench": op, "env": env, "rows": results}))
