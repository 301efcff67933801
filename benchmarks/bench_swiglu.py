"""SwiGLU forward + backward on Llama-3.1-8B shapes (I 14336, M = B*T rows, bf16) against the PyTorch code it
replaces and Liger-Kernel's op when it imports, same run, same GPU (harness and columns: _block_bench.py).

GB/s from the bytes forward + backward must move in bf16: 16*M*I. Ours reads [gate | up] from one fused (M, 2I)
GEMM output with inplace_grad=True, as Liger writes its gradient over the saved gate/up too; torch =
F.silu(gate) * up on the two halves (llama.py); liger = liger_swiglu on separate gate and up tensors (two GEMMs).

Usage: python benchmarks/bench_swiglu.py [--rows 2048 8192]
       [--smoke]  (tiny shapes, CPU allowed: checks the script itself; with TRITON_INTERPRET=1 and
                  QLORA_CORE_BACKEND=triton our kernels run in the interpreter)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import _block_bench as bench
from qlora_core.ops import swiglu


def steps(M, s, dev, trainable, lf):
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


if __name__ == "__main__":
    bench.main("swiglu", steps, __doc__)
