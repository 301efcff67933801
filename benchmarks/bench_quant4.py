"""Quantize / dequantize speed of kernels/quant4.py against bitsandbytes' CUDA kernels, same run, same GPU.

For the Llama-3-8B weight shapes (4096x4096, 14336x4096, 4096x14336), bf16, NF4, blocksize 64:
  * quantize (4-bit codes + fp32 absmax) and quantize with double quant (nested 8-bit absmax);
  * dequantize without and with double quant (the QLoRA setting);
time = triton.testing.do_bench median (p20/p80 kept in the JSON), which zeroes a 256 MB buffer before every
rep so L2 (50 MB on H100) is cold; inputs also rotate over 3 copies. Effective bandwidth counts the bytes
the op must move: quantize reads 2n and writes n/2 + absmax; dequantize reads n/2 + absmax state and writes
2n. The device copy bandwidth (y.copy_(x) of 1 GiB, read + write) is the 100% mark.
Optional sections: --sweep (fixed dequant / quantize tiles, to choose the autotune set and defaults) and
--probe (byte-exactness against bitsandbytes CUDA for each reciprocal / FTZ choice, see kernels/quant4.py).
Prints tables, then one JSON line last.

Usage: python benchmarks/bench_quant4.py [--sweep] [--probe] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import qlora_core as qc  # noqa: E402
from qlora_core.formats import dequant_table, dynamic_map, fp4_thresholds, nf4_thresholds  # noqa: E402
from qlora_core.kernels import quant4  # noqa: E402

try:
    import bitsandbytes
    import bitsandbytes.functional as bnbf
except Exception as e:  # noqa: BLE001
    bitsandbytes = bnbf = None
    print(f"bitsandbytes unavailable ({e}); peer columns will be empty", file=sys.stderr)

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
ROTATE = 4


def _dequantize(q, **kw):
    """kernels/quant4.dequantize_4bit with q's tables, as ops/quant4.py calls it."""
    return quant4.dequantize_4bit(q, dequant_table(q.quant_type, q.device), dynamic_map(True, q.device), **kw)


def bench(fns, calls: int = 24, graph: bool = True) -> dict:
    """Time one call of fns[i % len(fns)] (inputs rotate so the working set exceeds L2).

    ms: device time per call from a CUDA graph of `calls` calls replayed 10 times (median), which is what
    the kernels sustain without Python launch overhead. eager_ms: do_bench median (L2 zeroed before each
    rep), which adds the launcher's host overhead when that exceeds the kernel time (small shapes).
    """
    i = [0]

    def step():
        fns[i[0] % len(fns)]()
        i[0] += 1
    med, p20, p80 = do_bench(step, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
    out = {"eager_ms": med, "eager_p20": p20, "eager_p80": p80}
    if not graph:
        out.update(ms=med, graph_error="not captured (host sync inside)")
        return out
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for k in range(calls):
                fns[k % len(fns)]()
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            g.replay()
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1) / calls)
        times.sort()
        out.update(ms=times[len(times) // 2], graph_min=times[0], graph_max=times[-1])
        del g
    except Exception as e:  # noqa: BLE001  (a peer op that cannot be captured: fall back to eager)
        out.update(ms=med, graph_error=repr(e)[:200])
    return out


def copy_bandwidth() -> float:
    x = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    # eager do_bench: 1 GiB makes launch overhead irrelevant, and inside a CUDA graph copy_ becomes a
    # memcpy node served by the copy engines (measured 2.43 TB/s there vs 3.0 TB/s as a kernel).
    t = bench([lambda: y.copy_(x)], graph=False)["eager_ms"]
    return 2 * x.numel() * x.element_size() / (t * 1e-3) / 1e9


def _gbs(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def main_table(copy_gbs: float) -> list[dict]:
    rows = []
    for shape in SHAPES:
        ws = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(ROTATE)]
        n, bs = ws[0].numel(), 64
        nb = n // bs
        qs = {dq: [qc.quantize(w, "nf4", bs, dq) for w in ws] for dq in (False, True)}
        peer = {dq: [bnbf.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=dq) for w in ws]
                for dq in (False, True)} if bnbf else None
        absmax_bytes = {False: 4 * nb, True: nb + 4 * (-(-nb // 256)) + 4}
        ops = {
            "quantize": (2 * n + n // 2 + 4 * nb,
                         [lambda w=w: quant4.quantize_4bit(w, bs, "nf4", nf4_thresholds("cuda")) for w in ws],
                         [lambda w=w: bnbf.quantize_4bit(w, blocksize=bs, quant_type="nf4") for w in ws]),
            "quantize+dq": (2 * n + n // 2 + absmax_bytes[True],
                            [lambda w=w: qc.quantize(w, "nf4", bs, True) for w in ws],
                            [lambda w=w: bnbf.quantize_4bit(w, blocksize=bs, quant_type="nf4",
                                                            compress_statistics=True) for w in ws]),
            "dequantize": (n // 2 + absmax_bytes[False] + 2 * n,
                           [lambda q=q: _dequantize(q) for q in qs[False]],
                           [lambda p=p: bnbf.dequantize_4bit(*p) for p in (peer or {False: []})[False]]),
            "dequantize+dq": (n // 2 + absmax_bytes[True] + 2 * n,
                              [lambda q=q: _dequantize(q) for q in qs[True]],
                              [lambda p=p: bnbf.dequantize_4bit(*p) for p in (peer or {True: []})[True]]),
        }
        for op, (nbytes, ours, theirs) in ops.items():
            # quantize+dq checks the weights for NaN/Inf (a host sync): not capturable, timed eagerly on both sides
            graph = op != "quantize+dq"
            r = {"op": op, "shape": list(shape), "bytes": nbytes, "ours": bench(ours, graph=graph)}
            r["ours"]["gbs"] = _gbs(nbytes, r["ours"]["ms"])
            if bnbf:
                r["bnb"] = bench(theirs, graph=graph)
                r["bnb"]["gbs"] = _gbs(nbytes, r["bnb"]["ms"])
            rows.append(r)
        del ws, qs, peer
    print(f"\ncopy bandwidth (y.copy_(x), 1 GiB bf16, read+write): {copy_gbs:.0f} GB/s")
    print("ms = device time per call (CUDA graph; * = not capturable, eager); eager = do_bench median, which adds "
          "Python launch overhead and write-back of the dirty L2 left by do_bench's cache flush")
    print(f"{'op':<14} {'shape':<11} | {'ours ms':>7} {'GB/s':>5} {'%copy':>6} {'eager':>7} | "
          f"{'bnb ms':>7} {'GB/s':>5} "
          f"{'%copy':>6} {'eager':>7} | {'speedup':>7}")
    for r in rows:
        o, b = r["ours"], r.get("bnb")
        star = lambda d: "*" if "graph_error" in d else " "  # noqa: E731  (* = eager: not capturable)
        line = (f"{r['op']:<14} {'x'.join(map(str, r['shape'])):<11} | {o['ms']:7.4f}{star(o)}{o['gbs']:5.0f} "
                f"{100 * o['gbs'] / copy_gbs:5.1f}% {o['eager_ms']:7.4f} |")
        if b:
            line += (f" {b['ms']:7.4f}{star(b)}{b['gbs']:5.0f} {100 * b['gbs'] / copy_gbs:5.1f}% {b['eager_ms']:7.4f} |"
                     f" {b['ms'] / o['ms']:6.2f}x")
        print(line)
    return rows


def sweep(copy_gbs: float) -> dict:
    out = {"dequant": [], "quant": []}
    for shape in SHAPES[1:2]:
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        q = qc.quantize(w, "nf4", 64, True)
        n = w.numel()
        nbytes = n // 2 + n // 64 + 4 * (n // 64 // 256) + 2 * n
        for bb in (2048, 4096, 8192, 16384):
            for nw in (4, 8, 16):
                for join in (True, False):
                    t = bench([lambda: _dequantize(q, block_bytes=bb, join=join, num_warps=nw)])["ms"]
                    out["dequant"].append({"shape": list(shape), "block_bytes": bb, "warps": nw, "join": join,
                                           "ms": t, "pct_copy": 100 * _gbs(nbytes, t) / copy_gbs})
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    n = w.numel()
    for bs in (64, 4096):
        for elems in (1024, 2048, 4096, 8192):
            for nw in (2, 4, 8):
                if elems < bs:
                    continue
                t = bench([lambda: quant4.quantize_4bit(w, bs, "nf4", nf4_thresholds("cuda"), elems=elems,
                                                         num_warps=nw)])["ms"]
                out["quant"].append({"blocksize": bs, "elems": elems, "warps": nw, "ms": t,
                                     "pct_copy": 100 * _gbs(2 * n + n // 2 + 4 * n // bs, t) / copy_gbs})
    print("\nsweep, dequantize+dq (best 3 per shape):")
    for shape in SHAPES[1:2]:
        best = sorted([r for r in out["dequant"] if r["shape"] == list(shape)], key=lambda r: r["ms"])[:3]
        for r in best:
            print(f"  {shape} bb={r['block_bytes']} warps={r['warps']} join={r['join']}: {r['ms']:.4f} ms "
                  f"{r['pct_copy']:.1f}% copy")
    for join in (True, False):
        best = min((r for r in out["dequant"] if r["join"] == join and r["shape"] == [14336, 4096]),
                   key=lambda r: r["ms"])
        print(f"  best with join={join} (14336x4096): {best['ms']:.4f} ms")
    print("sweep, quantize 14336x4096 (best 3 per blocksize):")
    for bs in (64, 4096):
        for r in sorted([r for r in out["quant"] if r["blocksize"] == bs], key=lambda r: r["ms"])[:3]:
            print(f"  bs={bs} elems={r['elems']} warps={r['warps']}: {r['ms']:.4f} ms {r['pct_copy']:.1f}% copy")
    return out


def _diff(a, b):
    return int((a.reshape(-1).view(torch.uint8) != b.reshape(-1).view(torch.uint8)).sum())


def _weights(shape, dtype, bs, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, device="cuda", generator=g) * 0.02
    flat = x.view(-1)
    nfull = flat.numel() // bs
    flat[: nfull * bs].view(nfull, bs)[1::97] = 0.0
    flat[::13] = 0.0
    return x.to(dtype)


def _adversarial(nblocks, bs, seed):
    """fp32 blocks with absmax A in [0.5, 1) and every other element = fp32(t * A) +- up to 2 ulp for a random
    NF4/FP4 threshold t: xn lands within a few ulp of a threshold, where the reciprocal choice shows."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.cat([nf4_thresholds("cuda"), fp4_thresholds("cuda")[0], -fp4_thresholds("cuda")[0]])
    a = 0.5 + 0.5 * torch.rand(nblocks, 1, device="cuda", generator=g)
    x = t[torch.randint(0, t.numel(), (nblocks, bs), device="cuda", generator=g)] * a
    jitter = torch.randint(-2, 3, x.shape, device="cuda", generator=g).to(torch.int32)
    x = (x.view(torch.int32) + jitter).view(torch.float32)
    x[:, 0] = a[:, 0]
    return x.reshape(-1)


PROBE_MODES = (("reference", dict(mode="reference")),
               ("midpoint-thr+approx+ftz", dict(mode="reference", rcp="approx", ftz=True)),
               ("bnb rcp=ieee", dict(rcp="ieee")),
               ("bnb rcp=div", dict(rcp="div")),
               ("bnb ftz=off", dict(ftz=False)),
               ("bnb (default)", dict()))


def probe() -> dict:
    """Mismatch counts against bitsandbytes CUDA for each arithmetic choice (see kernels/quant4.py)."""
    res = {"quantize": [], "adversarial": [], "subnormal": [], "nested": [], "dequant": [], "diag": []}
    combos = [(torch.bfloat16, "nf4", 64), (torch.bfloat16, "fp4", 64), (torch.float16, "nf4", 64),
              (torch.float32, "fp4", 64), (torch.bfloat16, "nf4", 32), (torch.bfloat16, "fp4", 4096),
              (torch.float16, "fp4", 256), (torch.float32, "nf4", 128)]
    for i, (dtype, qt, bs) in enumerate(combos):
        x = _weights((14336, 4096), dtype, bs, i)
        p_ref, st = bnbf.quantize_4bit(x, blocksize=bs, quant_type=qt)
        for name, kw in PROBE_MODES:
            p, a = quant4.quantize_4bit(x, bs, qt, nf4_thresholds("cuda"), **kw)
            res["quantize"].append({"dtype": str(dtype)[6:], "qt": qt, "bs": bs, "mode": name,
                                    "bytes": _diff(p, p_ref), "absmax": _diff(a, st.absmax)})
    for qt in ("nf4", "fp4"):
        x = _adversarial(1 << 16, 64, 7)
        p_ref, st = bnbf.quantize_4bit(x, blocksize=64, quant_type=qt)
        for name, kw in PROBE_MODES:
            p, a = quant4.quantize_4bit(x, 64, qt, nf4_thresholds("cuda"), **kw)
            res["adversarial"].append({"qt": qt, "n": x.numel(), "mode": name,
                                       "bytes": _diff(p, p_ref), "absmax": _diff(a, st.absmax)})
    for dtype in (torch.bfloat16, torch.float32):
        x = _weights((1024, 1024), dtype, 64, 11).float()
        x.view(-1)[5::17] = 1e-39 * torch.randn_like(x.view(-1)[5::17])
        x.view(-1)[64 * 3: 64 * 4] = 1e-39
        x = x.to(dtype)
        for qt in ("nf4", "fp4"):
            p_ref, st = bnbf.quantize_4bit(x, blocksize=64, quant_type=qt)
            for name, kw in PROBE_MODES:
                p, a = quant4.quantize_4bit(x, 64, qt, nf4_thresholds("cuda"), **kw)
                res["subnormal"].append({"dtype": str(dtype)[6:], "qt": qt, "mode": name,
                                         "bytes": _diff(p, p_ref), "absmax": _diff(a, st.absmax)})
    code = dynamic_map(True, "cuda")
    _, am = quant4.quantize_4bit(_weights((14336, 4096), torch.bfloat16, 64, 12), 64, "nf4", nf4_thresholds("cuda"))
    for name, v in (("absmax-offset", am - am.mean()), ("randn", torch.randn(1 << 22, device="cuda"))):
        q_ref, st = bnbf.quantize_blockwise(v, code=code, blocksize=256)
        for mname, kw in PROBE_MODES:
            q, a = quant4.quantize_blockwise(v, code, 256, **kw)
            res["nested"].append({"input": name, "mode": mname, "codes": _diff(q, q_ref),
                                  "absmax": _diff(a, st.absmax)})
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for qt in ("nf4", "fp4"):
            x = _weights((14336, 4096), dtype, 64, 13)
            p_ref, st = bnbf.quantize_4bit(x, blocksize=64, quant_type=qt, compress_statistics=True)
            y_ref = bnbf.dequantize_4bit(p_ref, st)
            q = qc.quantize(x, qt, 64, True)
            for name, kw in (("reference", dict(mode="reference")), ("bnb ftz=off", dict(ftz=False)),
                             ("bnb (default)", dict()), ("bnb + fp_fusion", dict(fp_fusion=True))):
                y = _dequantize(q, block_bytes=8192, num_warps=8, **kw)
                res["dequant"].append({"dtype": str(dtype)[6:], "qt": qt, "mode": name, "values": _diff(y, y_ref)})
            y = _dequantize(q)
            yf, yrf = y.view(-1), y_ref.view(-1)
            bad = (yf.float() != yrf.float()) | (torch.signbit(yf) != torch.signbit(yrf))
            idx = bad.nonzero().squeeze(1)[:8]
            if idx.numel():
                am_bnb = bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset
                am_ours = q.absmax_fp32()
                codes = torch.stack([q.data.view(-1) >> 4, q.data.view(-1) & 15], 1).view(-1)
                for i in idx.tolist():
                    b = i // 64
                    res["diag"].append({"dtype": str(dtype)[6:], "qt": qt, "i": i, "ours": y.view(-1)[i].item(),
                                        "bnb": y_ref.view(-1)[i].item(), "code": int(codes[i]),
                                        "absmax_bnb": am_bnb[b].item(), "absmax_ref": am_ours[b].item(),
                                        "absmax_differs": int((am_bnb != am_ours).sum())})
    print("\nexactness vs bitsandbytes CUDA (mismatch counts; packed bytes / absmax):")
    for sec in ("quantize", "adversarial", "subnormal"):
        for r in res[sec]:
            key = " ".join(f"{k}={r[k]}" for k in r if k not in ("bytes", "absmax"))
            print(f"  {sec:<11} {key:<62} bytes={r['bytes']:<8} absmax={r['absmax']}")
    for r in res["nested"]:
        print(f"  nested      input={r['input']} mode={r['mode']}: codes={r['codes']} absmax={r['absmax']}")
    for r in res["dequant"]:
        print(f"  dequant+dq  dtype={r['dtype']} qt={r['qt']} mode={r['mode']}: values={r['values']}")
    for r in res["diag"]:
        print(f"  diag        {r}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="time fixed dequant/quantize tiles")
    ap.add_argument("--probe", action="store_true", help="exactness vs bitsandbytes per reciprocal/FTZ mode")
    ap.add_argument("--json-out", help="also write the JSON result to this file")
    args = ap.parse_args()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "bitsandbytes": getattr(bitsandbytes, "__version__", None), "cuda": torch.version.cuda}
    print(env)
    result = {"env": env}
    if args.probe and bnbf:
        result["probe"] = probe()
    copy_gbs = copy_bandwidth()
    result["copy_gbs"] = copy_gbs
    if args.sweep:
        result["sweep"] = sweep(copy_gbs)
    result["rows"] = main_table(copy_gbs)
    line = json.dumps(result)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    print(json.dumps({"env": env, "copy_gbs": copy_gbs, "rows": result["rows"]}))


if __name__ == "__main__":
    main()
