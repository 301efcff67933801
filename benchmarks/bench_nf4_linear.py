"""Fused NF4 linear vs bitsandbytes matmul_4bit vs bf16 cuBLAS, forward and input gradient (dx), 8B shapes.

    python benchmarks/bench_nf4_linear.py [--tune] [--tune-gemv1] [--tune-mma] [--ms 1,16,128,4096,8192] [--json out.json]

Shapes (N x K): 4096x4096 (q/o proj), 14336x4096 (gate/up), 4096x14336 (down); M rows of bf16 x.
Timing: every op is captured in a CUDA graph together with R copies of its weight (R chosen so the copies
exceed 2x the 50 MB L2: 8.4 MB packed NF4 would otherwise sit in L2) and the replays are timed with
triton.testing.do_bench_cudagraph (median); time per call = graph time / R. Graphs remove the Python launch
overhead from all three contenders alike (decode loops run under CUDA graphs in practice).
Metrics: TFLOP/s = 2*M*N*K / t; effective GB/s = (weight bytes in its own format + x + y) / t.
bnb: bitsandbytes.matmul_4bit(x, qw.t(), quant_state) on the same weight quantized by bnb (nf4, double quant);
its dx is what MatMul4Bit.backward does: dy @ dequantize_4bit(qw, state).
Peak memory (M >= 4096): allocated bytes kept after the op (beyond its output) and the transient peak.
Prints a table, then one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
L2_BYTES = 50 * 2**20


def _graph_time(fn, reps: int) -> float:
    """ms per call of fn (which makes `reps` calls), CUDA-graph timed, median."""
    import triton.testing
    fn()  # warm-up / autotune outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median") / reps


def _copies(nbytes: int) -> int:
    return max(1, min(16, math.ceil(2 * L2_BYTES / max(nbytes, 1))))


def _q_nbytes(q) -> int:
    extra = q.nested_absmax.numel() * 4 if q.double_quant else 0
    return q.data.numel() + q.absmax.numel() * q.absmax.element_size() + extra


def _quantize(w):
    """NF4 + double quant on the GPU (kernels/quant4.py); the CPU reference if that fails (same bytes)."""
    import qlora_core as qc
    try:
        return qc.quantize(w, "nf4", 64, True)
    except Exception as e:
        print(f"GPU quantize failed ({type(e).__name__}: {str(e)[:120]}); quantizing on the CPU", flush=True)
        return qc.quantize(w.cpu(), "nf4", 64, True).to(w.device)


def bench_shape(n, k, ms, log, do_bnb=True, paths=True, a_tiled_max=1 << 30):
    from qlora_core.kernels import nf4_linear as disp
    from qlora_core.ops.nf4_linear import kernel_tables
    dev = "cuda"
    dt = torch.bfloat16
    w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
    q0 = _quantize(w)
    qs = [q0] + [_quantize(w + 0.001 * i) for i in range(1, _copies(_q_nbytes(q0)))]
    rq = len(qs)
    t = kernel_tables(q0)
    rw = _copies(n * k * 2)
    ws = [w + 0.001 * i for i in range(rw)]
    bnb = None
    if do_bnb:
        try:
            import bitsandbytes as bnb_mod
            import bitsandbytes.functional as bnbF
            bq = [bnbF.quantize_4bit(w + 0.001 * i, quant_type="nf4", compress_statistics=True, blocksize=64)
                  for i in range(rq)]
            bnb = (bnb_mod, bnbF, bq)
        except Exception as e:  # named reason in the output, never a silent skip
            log(f"bitsandbytes unavailable: {type(e).__name__}: {e}")
    rows = []
    for m in ms:
        big = m >= 1024
        x = torch.randn(m, k, device=dev, dtype=dt)
        dy = torch.randn(m, n, device=dev, dtype=dt)
        flops = 2.0 * m * n * k
        act = (m * k + m * n) * 2
        r_q = 1 if big else rq
        r_w = 1 if big else rw
        res = {"N": n, "K": k, "M": m}

        def timed(name, calls, reps, wbytes):
            t = _graph_time(calls, reps)
            res[name] = {"ms": t, "tflops": flops / t / 1e9, "gbs": (wbytes + act) / t / 1e6}

        timed("cublas_fwd", lambda: [torch.nn.functional.linear(x, ws[i]) for i in range(r_w)], r_w, n * k * 2)
        timed("cublas_dx", lambda: [dy @ ws[i] for i in range(r_w)], r_w, n * k * 2)
        qb = _q_nbytes(qs[0])
        timed("ours_fwd", lambda: [disp.linear_forward(x, qs[i], t, None) for i in range(r_q)], r_q, qb)
        timed("ours_dx", lambda: [disp.linear_input_grad(dy, qs[i], t) for i in range(r_q)], r_q, qb)
        res["path_fwd"] = disp.choose_path("fwd", m, n, k)
        res["path_dx"] = disp.choose_path("dx", m, n, k)
        if paths:  # every path, so the dispatch thresholds come from data
            for p in (["gemv"] if m <= 128 else []) + ["cublas"]:
                timed(f"fwd_{p}", lambda p=p: [disp.linear_forward(x, qs[i], t, None, path=p) for i in range(r_q)],
                      r_q, qb)
            for p in (["tiled"] if m <= a_tiled_max else []) + ["cublas"]:
                timed(f"dx_{p}", lambda p=p: [disp.linear_input_grad(dy, qs[i], t, path=p) for i in range(r_q)],
                      r_q, qb)
        if bnb is not None:
            bnb_mod, bnbF, bq = bnb
            try:
                timed("bnb_fwd", lambda: [bnb_mod.matmul_4bit(x, bq[i][0].t(), quant_state=bq[i][1])
                                          for i in range(r_q)], r_q, qb)
                timed("bnb_dx", lambda: [dy @ bnbF.dequantize_4bit(bq[i][0], bq[i][1]).to(dt)
                                         for i in range(r_q)], r_q, qb)
            except Exception as e:
                log(f"bnb failed at M={m}: {type(e).__name__}: {e}")
        if big:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            y = disp.linear_forward(x, qs[0], t, None)
            torch.cuda.synchronize()
            res["mem_fwd_kept_MB"] = (torch.cuda.memory_allocated() - base - y.numel() * 2) / 2**20
            res["mem_fwd_peak_extra_MB"] = (torch.cuda.max_memory_allocated() - base - y.numel() * 2) / 2**20
            del y
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            g = disp.linear_input_grad(dy, qs[0], t)
            torch.cuda.synchronize()
            res["mem_dx_kept_MB"] = (torch.cuda.memory_allocated() - base - g.numel() * 2) / 2**20
            res["mem_dx_peak_extra_MB"] = (torch.cuda.max_memory_allocated() - base - g.numel() * 2) / 2**20
            res["bf16_weight_MB"] = n * k * 2 / 2**20
            del g
        rows.append(res)
        log(json.dumps(res))
    return rows


def _weight_copies(n: int, k: int) -> list:
    """NF4 copies of one random (n, k) bf16 weight, as many as `_copies` asks for (beyond 2x the L2)."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q0 = _quantize(w)
    return [q0] + [_quantize(w + 0.001 * i) for i in range(1, _copies(_q_nbytes(q0)))]


def _sweep(log, label: str, call, qs: list, grid: list, splits=(), grid_split=1) -> tuple[list, tuple]:
    """Time call(q, cfg, split_k) over every cfg of grid with split_k=grid_split, then the best cfg with each of
    `splits`.
    Returns (rows {"cfg", "split_k", "us"}, (best ms, (cfg, split_k))); a failing config is logged and skipped."""
    rows, best = [], None
    for cfg, sp in [(c, grid_split) for c in grid] + [(None, s) for s in splits]:
        c = cfg if cfg is not None else best[1][0]
        try:
            t = _graph_time(lambda: [call(q, c, sp) for q in qs], len(qs))
        except Exception as e:
            log(f"{label} cfg {c} split {sp} failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        rows.append({"cfg": list(c), "split_k": sp, "us": t * 1e3})
        if best is None or t < best[0]:
            best = (t, (c, sp))
    log(f"{label} best: {best[1]} {best[0] * 1e3:.2f} us; "
        + " ".join(f"{r['cfg']}/{r['split_k']}:{r['us']:.1f}" for r in rows))
    return rows, best


def tune_gemv(log, shapes):
    """Sweep the generic decode kernel's block sizes (gemv, kernels/nf4_linear.py) at M = 1, 16 and 128."""
    from qlora_core.kernels import nf4_linear
    from qlora_core.ops.nf4_linear import kernel_tables
    out = []
    for n, k in shapes:
        qs = _weight_copies(n, k)
        t = kernel_tables(qs[0])
        for m, grid in ((1, [(bn, un, 4, 1, None) for bn in (16, 32, 64) for un in (2, 4)]
                         + [(32, 4, 4, 1, 4), (32, 4, 8, 1, None), (64, 4, 8, 1, None), (32, 4, 4, 3, None)]),
                        (16, [(bn, un, 4, 1, None) for bn in (32, 64, 128) for un in (1, 2)] + [(64, 1, 8, 1, None)]),
                        (128, [(bn, 1, 4, 1, None) for bn in (32, 64, 128)] + [(64, 1, 8, 1, None), (64, 1, 4, 1, 2)])):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            rows, _ = _sweep(log, f"gemv N={n} K={k} M={m}",
                             lambda q, c, sp: nf4_linear.gemv(x, q, t, None, c[0], c[1], c[2], split_k=c[4],
                                                              num_stages=c[3]),
                             qs, grid)
            out += [dict(r, N=n, K=k, M=m) for r in rows]
    return out


GEMV1_GRID = [(8, 8, 2, 1, 1), (16, 8, 4, 1, 1), (8, 16, 4, 1, 1), (16, 4, 2, 1, 1), (8, 8, 2, 1, 0),
              (4, 8, 1, 1, 1), (8, 4, 2, 1, 1), (8, 8, 4, 1, 1), (4, 16, 2, 1, 1)]


def tune_gemv1(log, shapes):
    """Sweep the one-row decode kernel's tiling (gemv1, kernels/nf4_linear.py) at M = 1, plus split-K 2 and 4 on the
    best."""
    from qlora_core.kernels import nf4_linear
    from qlora_core.ops.nf4_linear import kernel_tables
    out = []
    for n, k in shapes:
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        qs = _weight_copies(n, k)
        t = kernel_tables(qs[0])
        rows, _ = _sweep(log, f"gemv1 N={n} K={k}",
                         lambda q, c, sp: nf4_linear.gemv1(x, q, t, None, config=c, split_k=sp),
                         qs, GEMV1_GRID, splits=(2, 4))
        out += [dict(r, N=n, K=k) for r in rows]
    return out


MMA_GRID = {16: [(64, 2, 4, 1), (128, 2, 4, 1), (64, 4, 4, 1), (32, 2, 2, 1), (64, 2, 4, 3), (128, 2, 8, 1),
                 (128, 4, 8, 1), (64, 4, 8, 1), (32, 4, 2, 1), (64, 8, 4, 1), (16, 4, 1, 1), (32, 4, 4, 1)],
            128: [(64, 2, 4, 1), (128, 2, 8, 1), (64, 2, 8, 1), (128, 2, 4, 1), (64, 4, 8, 1), (32, 2, 4, 1)]}


def tune_mma(log, shapes, ms=(16,)):
    """Sweep the small-M tensor-core kernel's tiling (gemv_mma, kernels/nf4_linear.py) at its default split-K, then
    split-K 1, 2 and 4 on the best."""
    from qlora_core.kernels import nf4_linear
    from qlora_core.ops.nf4_linear import kernel_tables
    out = []
    for n, k in shapes:
        qs = _weight_copies(n, k)
        t = kernel_tables(qs[0])
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            grid = MMA_GRID[16 if m <= 16 else 128]
            rows, _ = _sweep(log, f"mma N={n} K={k} M={m}",
                             lambda q, c, sp: nf4_linear.gemv_mma(x, q, t, None, config=c, split_k=sp),
                             qs, grid, splits=(1, 2, 4), grid_split=nf4_linear.MMA_SPLIT_K)
            out += [dict(r, N=n, K=k, M=m) for r in rows]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="1,16,128,4096,8192")
    ap.add_argument("--shapes", default="all", help="all or indices into SHAPES, e.g. 0,2")
    ap.add_argument("--tune", action="store_true", help="sweep the gemv block sizes first")
    ap.add_argument("--tune-gemv1", action="store_true", help="sweep the one-row decode kernel's tiling first")
    ap.add_argument("--tune-mma", action="store_true", help="sweep the small-M tensor-core kernel's tiling first")
    ap.add_argument("--no-paths", action="store_true", help="skip timing each dispatch path separately")
    ap.add_argument("--json", default=None, help="write all rows to this file")
    ap.add_argument("--tiled-max", type=int, default=1 << 30, help="time the fused tiled dx path only up to this M")
    a = ap.parse_args(argv)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    import triton
    try:
        import bitsandbytes
        bnb_ver = bitsandbytes.__version__
    except Exception:
        bnb_ver = None
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "bnb": bnb_ver, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    log(json.dumps(meta))
    ms = [int(v) for v in a.ms.split(",")]
    shapes = SHAPES if a.shapes == "all" else [SHAPES[int(i)] for i in a.shapes.split(",")]
    result = {"meta": meta}
    if a.tune:
        result["gemv_tune"] = tune_gemv(log, shapes)
    if a.tune_gemv1:
        result["gemv1_tune"] = tune_gemv1(log, shapes)
    if a.tune_mma:
        result["mma_tune"] = tune_mma(log, shapes)
    rows = []
    for n, k in shapes:
        rows += bench_shape(n, k, ms, log, paths=not a.no_paths, a_tiled_max=a.tiled_max)
    result["rows"] = rows
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    # table
    hdr = f"{'N x K':>12} {'M':>5} | {'cuBLAS us':>9} {'ours us':>8} {'x cuBLAS':>8} {'bnb us':>8} {'bnb x':>6} " \
          f"{'ours TF/s':>9} {'ours GB/s':>9} | {'dx cuBLAS':>9} {'dx ours':>8} {'x':>5} {'bnb dx':>8} {'bnb x':>6} | path"
    print(hdr)
    summary = []
    for r in rows:
        c, o = r["cublas_fwd"]["ms"], r["ours_fwd"]["ms"]
        cd, od = r["cublas_dx"]["ms"], r["ours_dx"]["ms"]
        b = r.get("bnb_fwd", {}).get("ms", float("nan"))
        bd = r.get("bnb_dx", {}).get("ms", float("nan"))
        print(f"{r['N']:>5}x{r['K']:<6} {r['M']:>5} | {c * 1e3:9.1f} {o * 1e3:8.1f} {c / o:8.2f} {b * 1e3:8.1f} "
              f"{c / b:6.2f} {r['ours_fwd']['tflops']:9.1f} {r['ours_fwd']['gbs']:9.0f} | {cd * 1e3:9.1f} "
              f"{od * 1e3:8.1f} {cd / od:5.2f} {bd * 1e3:8.1f} {cd / bd:6.2f} | {r['path_fwd']}/{r['path_dx']}")
        summary.append({"N": r["N"], "K": r["K"], "M": r["M"], "fwd_x": round(c / o, 3), "dx_x": round(cd / od, 3),
                        "bnb_fwd_x": round(c / b, 3) if b == b else None})
    print(json.dumps({"bench": "nf4_linear", **meta, "summary": summary}))


if __name__ == "__main__":
    sys.exit(main())
