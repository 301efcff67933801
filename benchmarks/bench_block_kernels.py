"""Forward + backward of the block kernels (RMSNorm, RoPE, SwiGLU, lm_head + cross entropy) on Llama-3.1-8B shapes,
against the PyTorch code they replace (eager) and Liger-Kernel's op when it imports, same run, same GPU.

Shapes: d 4096, I 14336, 32/8 heads of 128, vocab 128256, M = B*T rows (default 2048 and 8192), bf16, frozen
norm and lm_head weights (QLoRA; --trainable gives them gradients). Each step is one forward and one backward
(grads fed in), timed with triton.testing.do_bench (median; it clears L2 before each rep). Columns:
  * ms, and the ratio of each peer's ms to ours (> 1: we are faster);
  * GB/s for the elementwise ops from the bytes their forward + backward must move (bf16: RMSNorm 10*M*d,
    RoPE 8*M*(H+KVH)*D, SwiGLU 16*M*I); TFLOP/s for the cross entropy (2*M*V*d per GEMM: logits and dh, plus dW
    with --trainable);
  * MiB: peak memory allocated by one step above its inputs.
Baselines: torch = llama.py / train.py today (RMSNorm module math, `q * cos + rotate_half(q) * sin` on the
(B, H, T, D) views, F.silu(gate) * up, train.batch_loss's chunked lm_head + CE recomputed in backward);
liger = liger_kernel.transformers.functional (liger_rms_norm, liger_rope, liger_swiglu on separate gate/up
tensors, liger_fused_linear_cross_entropy with reduction="sum"; liger_rms_norm with in_place=False, since its
default overwrites dy). RoPE: every column first clones its q and k (ours rotates a (B, T, (H+KVH)*D) buffer in
place, Liger writes into its inputs), the same bytes in each. SwiGLU: ours with inplace_grad=True, as Liger
writes its gradient over the saved gate/up too; Liger gets gate and up as separate tensors (two GEMMs).
Prints a table, then one JSON line last.

Usage: python benchmarks/bench_block_kernels.py [--rows 2048 8192] [--trainable] [--ops rmsnorm rope swiglu ce]
       [--smoke]  (tiny shapes, CPU allowed: checks the script itself; with TRITON_INTERPRET=1 and
                  QLORA_CORE_BACKEND=triton our kernels run in the interpreter)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qlora_core.kernels import fused_linear_ce, rmsnorm, rope, swiglu  # noqa: E402
from qlora_core.llama import rotate_half  # noqa: E402

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


# -- one fwd + bwd step per (op, implementation) ------------------------------------------------------------------
def rmsnorm_steps(M, s, dev, trainable, lf):
    x = torch.randn(M, s["d"], device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(s["d"], device=dev)).to(torch.bfloat16).requires_grad_(trainable)
    dy = torch.randn_like(x)
    steps = {"ours": lambda: rmsnorm.rms_norm(x, w, 1e-5).backward(dy),
             "torch": lambda: rmsnorm.rms_norm_ref(x, w, 1e-5).backward(dy)}
    if lf is not None:
        # in_place=False: Liger's default writes dx over dy, which this loop reuses
        steps["liger"] = lambda: lf.liger_rms_norm(x, w, 1e-5, in_place=False).backward(dy)
    return steps, [x, w], 10 * M * s["d"], 0


def rope_steps(M, s, dev, trainable, lf):
    B, T = max(1, M // 2048), min(M, 2048)
    H, KVH, D = s["H"], s["KVH"], s["D"]
    qk = torch.randn(B, T, (H + KVH) * D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    q0 = qk.detach()[..., :H * D].contiguous().requires_grad_()  # separate q_proj / k_proj outputs (HF, Liger)
    k0 = qk.detach()[..., H * D:].contiguous().requires_grad_()
    cos, sin = _tables(T, D, dev)
    dq = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)  # SDPA's backward hands (B, heads, T, D)
    dk = torch.randn(B, KVH, T, D, device=dev, dtype=torch.bfloat16)
    dqk = torch.cat((dq.transpose(1, 2).flatten(2), dk.transpose(1, 2).flatten(2)), -1)

    def heads():  # fresh copies (ours rotates in place, Liger writes into its inputs), as attention views them
        return (q0.clone().view(B, T, H, D).transpose(1, 2), k0.clone().view(B, T, KVH, D).transpose(1, 2))

    def eager():
        q, k = heads()
        c, sn = cos.to(q.dtype), sin.to(q.dtype)
        torch.autograd.backward([q * c + rotate_half(q) * sn, k * c + rotate_half(k) * sn], [dq, dk])

    steps = {"ours": lambda: rope.apply_rope_qkv_(qk.clone(), H + KVH, cos, sin).backward(dqk), "torch": eager}
    if lf is not None:
        steps["liger"] = lambda: torch.autograd.backward(list(lf.liger_rope(*heads(), cos, sin)), [dq, dk])
    return steps, [qk, q0, k0], 8 * M * (H + KVH) * D, 0


def swiglu_steps(M, s, dev, trainable, lf):
    I = s["I"]
    gu = (3 * torch.randn(M, 2 * I, device=dev)).to(torch.bfloat16).requires_grad_()
    gate = gu.detach()[:, :I].contiguous().requires_grad_()
    up = gu.detach()[:, I:].contiguous().requires_grad_()
    dy = torch.randn(M, I, device=dev, dtype=torch.bfloat16)
    # both write the gradient over their saved inputs, as Liger always does (ours: inplace_grad=True)
    steps = {"ours": lambda: swiglu.swiglu(gu, inplace_grad=True).backward(dy),
             "torch": lambda: (F.silu(gu[:, :I]) * gu[:, I:]).backward(dy)}
    if lf is not None:
        steps["liger"] = lambda: lf.liger_swiglu(gate, up).backward(dy)
    return steps, [gu, gate, up], 16 * M * I, 0


def ce_steps(M, s, dev, trainable, lf):
    d, V = s["d"], s["V"]
    h = torch.randn(M, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, d, device=dev) * d ** -0.5 * 3).to(torch.bfloat16).requires_grad_(trainable)
    y = torch.randint(0, V, (M,), device=dev)
    steps = {"ours": lambda: fused_linear_ce.fused_linear_cross_entropy(h, w, y).backward(),
             "torch": lambda: fused_linear_ce.fused_linear_cross_entropy_ref(h, w, y).backward()}
    if lf is not None:
        steps["liger"] = lambda: lf.liger_fused_linear_cross_entropy(h, w, y, reduction="sum").backward()
    return steps, [h, w], 0, 2 * M * V * d * (3 if trainable else 2)


OPS = {"rmsnorm": rmsnorm_steps, "rope": rope_steps, "swiglu": swiglu_steps, "ce": ce_steps}


def _tables(T, D, dev):
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    f = torch.arange(T, device=dev).float()[:, None] * inv
    emb = torch.cat((f, f), -1)
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def run(op, M, shapes, dev, trainable, lf) -> list[dict]:
    steps, params, nbytes, flops = OPS[op](M, shapes, dev, trainable, lf)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2048, 8192], help="M = B*T rows (multiples of 2048)")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--trainable", action="store_true", help="norm and lm_head weights get gradients too")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU (checks the script)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.smoke:
        sys.exit("bench_block_kernels.py needs a CUDA GPU (or --smoke)")
    shapes = SHAPES_SMOKE if args.smoke else SHAPES_8B
    rows_list = [16, 32] if args.smoke else args.rows
    lf = load_liger()
    import triton
    env = {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "triton": triton.__version__, "liger": getattr(sys.modules.get("liger_kernel"), "__version__", None),
           "date": time.strftime("%Y-%m-%d"), "shapes": shapes, "trainable": args.trainable,
           "command": " ".join(sys.argv)}
    torch.manual_seed(0)
    results = []
    print(f"{'op':8} {'M':>6} {'impl':6} {'ms':>9} {'GB/s':>7} {'TFLOP/s':>8} {'MiB':>8} {'x ours':>7}")
    for op in args.ops:
        for M in rows_list:
            for r in run(op, M, shapes, dev, args.trainable, lf):
                results.append(r)
                if "error" in r:
                    print(f"{op:8} {M:6d} {r['impl']:6} error: {r['error']}")
                    continue
                print(f"{op:8} {M:6d} {r['impl']:6} {r['ms']:9.3f} {fmt(r['gbs'], '7.0f')} "
                      f"{fmt(r['tflops'], '8.1f')} {fmt(r['peak_mib'], '8.0f')} {fmt(r['ratio_vs_ours'], '7.2f')}")
    print(json.dumps({"bench": "block_kernels", "env": env, "rows": results}))


if __name__ == "__main__":
    main()
