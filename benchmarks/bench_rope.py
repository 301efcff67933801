"""RoPE forward + backward on Llama-3.1-8B shapes (32/8 heads of 128, M = B*T rows, T <= 2048, bf16) against the
PyTorch code it replaces and Liger-Kernel's op when it imports, same run, same GPU (harness and columns:
_block_bench.py).

GB/s from the bytes forward + backward must move in bf16: 8*M*(H+KVH)*D. Ours rotates q and k in place in one
(B, T, (H+KVH)*D) buffer (apply_rope_qkv_); torch = llama.py's `q * cos + rotate_half(q) * sin` on the
(B, H, T, D) views; liger = liger_rope on those views. Every column first clones its q and k (ours rotates in
place, Liger writes into its inputs), the same bytes in each.

Usage: python benchmarks/bench_rope.py [--rows 2048 8192]
       [--smoke]  (tiny shapes, CPU allowed: checks the script itself; with TRITON_INTERPRET=1 and
                  QLORA_CORE_BACKEND=triton our kernel runs in the interpreter)
"""
from __future__ import annotations

import torch

import _block_bench as bench
from qlora_core.llama import rotate_half
from qlora_core.ops import rope


def _tables(T, D, dev):
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    f = torch.arange(T, device=dev).float()[:, None] * inv
    emb = torch.cat((f, f), -1)
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def steps(M, s, dev, trainable, lf):
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


if __name__ == "__main__":
    bench.main("rope", steps, __doc__)
