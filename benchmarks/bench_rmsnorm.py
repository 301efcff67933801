"""RMSNorm forward + backward on Llama-3.1-8B shapes (d 4096, M = B*T rows, bf16) against the PyTorch code it
replaces and Liger-Kernel's op when it imports, same run, same GPU (harness and columns: _block_bench.py).

GB/s from the bytes forward + backward must move in bf16: 10*M*d. The norm weight is frozen (QLoRA); --trainable
gives it a gradient too. Baselines: torch = `rms_norm_ref` (llama.py's RMSNorm math under autograd); liger =
liger_rms_norm with in_place=False, since its default overwrites dy, which the loop reuses.

Usage: python benchmarks/bench_rmsnorm.py [--rows 2048 8192] [--trainable]
       [--smoke]  (tiny shapes, CPU allowed: checks the script itself; with TRITON_INTERPRET=1 and
                  QLORA_CORE_BACKEND=triton our kernels run in the interpreter)
"""
from __future__ import annotations

import torch

import _block_bench as bench
from qlora_core.ops import rmsnorm


def steps(M, s, dev, trainable, lf):
    x = torch.randn(M, s["d"], device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(s["d"], device=dev)).to(torch.bfloat16).requires_grad_(trainable)
    dy = torch.randn_like(x)
    steps = {"ours": lambda: rmsnorm.rms_norm(x, w, 1e-5).backward(dy),
             "torch": lambda: rmsnorm.rms_norm_ref(x, w, 1e-5).backward(dy)}
    if lf is not None:
        # in_place=False: Liger's default writes dx over dy, which this loop reuses
        steps["liger"] = lambda: lf.liger_rms_norm(x, w, 1e-5, in_place=False).backward(dy)
    return steps, [x, w], 10 * M * s["d"], 0


if __name__ == "__main__":
    bench.main("rmsnorm", steps, __doc__, trainable=True)
