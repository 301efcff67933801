"""Fused lm_head + cross entropy forward + backward on Llama-3.1-8B shapes (d 4096, vocab 128256, M = B*T rows,
bf16) against the PyTorch code it replaces and Liger-Kernel's op when it imports, same run, same GPU (harness and
columns: _block_bench.py).

TFLOP/s from 2*M*V*d per GEMM: logits and dh, plus dW with --trainable (the lm_head is frozen by default, as in
QLoRA). Baselines: torch = `fused_linear_cross_entropy_ref` (train.batch_loss's chunked lm_head + CE, each chunk
recomputed in backward); liger = liger_fused_linear_cross_entropy with reduction="sum".

Usage: python benchmarks/bench_linear_ce.py [--rows 2048 8192] [--trainable]
       [--smoke]  (tiny shapes, CPU allowed: checks the script itself; with TRITON_INTERPRET=1 and
                  QLORA_CORE_BACKEND=triton our kernel runs in the interpreter)
"""
from __future__ import annotations

import torch

import _block_bench as bench
from qlora_core.ops import linear_ce


def steps(M, s, dev, trainable, lf):
    d, V = s["d"], s["V"]
    h = torch.randn(M, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, d, device=dev) * d ** -0.5 * 3).to(torch.bfloat16).requires_grad_(trainable)
    y = torch.randint(0, V, (M,), device=dev)
    steps = {"ours": lambda: linear_ce.fused_linear_cross_entropy(h, w, y).backward(),
             "torch": lambda: linear_ce.fused_linear_cross_entropy_ref(h, w, y).backward()}
    if lf is not None:
        steps["liger"] = lambda: lf.liger_fused_linear_cross_entropy(h, w, y, reduction="sum").backward()
    return steps, [h, w], 0, 2 * M * V * d * (3 if trainable else 2)


if __name__ == "__main__":
    bench.main("linear_ce", steps, __doc__, trainable=True)
