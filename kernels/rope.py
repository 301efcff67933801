"""RoPE's Triton kernel and launcher: rotary position embedding (rotate-half layout) applied in place to q and k.

The spec (`rope_ref`), the autograd Function and the routing are in qlora_core/ops/rope.py; this file is the
launcher `rope_rotate_`. With halves x = [x1, x2] and HF's duplicated tables cos = [c, c], sin = [s, s] (llama.py
builds them as cat(freqs, freqs)) the rotation is y = [x1*c - x2*s, x2*c + x1*s] of each pair (x1[j], x2[j]),
with c, s rounded to x's dtype first, evaluated in fp32 and rounded once to x's dtype. The backward is the
transpose: the same kernel rotating by -sin (a constexpr flag), in place over the incoming gradients.

Layout: q (B, T, H*D) and k (B, T, KVH*D) exactly as the projections write them, heads contiguous within a token
row; the token and batch strides are free (q, k may be column slices of one fused qkv output), the last dim must
have stride 1. cos, sin: (T, D) shared by all rows, or (B, T, D) per row (packed rows restart positions);
(B or 1, 1, T, D) as llama.py's `rope()` returns them is accepted too.

Design: one launch for q and k together. A program owns one token (b, t): it loads the first half of that token's
cos/sin row once (the tables are duplicated, see above) and rotates all H query heads, then all KVH key heads, in
tiles of (BLOCK_H heads, D/2).
Limits: D even; cos/sin must be duplicated halves (not checked: it would cost a pass over the tables).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_rne  # fp32 -> dtype with round-to-nearest-even in the interpreter too


@triton.jit
def _rotate_heads(base, n_heads, c, s, hj, j, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # rotate heads [0, n_heads) of one token row starting at `base`; c, s: (1, BLOCK_D) fp32
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + hj
        mask = (h < n_heads) & (j < HALF)
        p1 = base + h * (2 * HALF) + j
        x1 = tl.load(p1, mask=mask, other=0.0)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
        dtype = x1.dtype
        x1 = x1.to(tl.float32)
        tl.store(p1, cast_rne(x1 * c - x2 * s, dtype), mask=mask)
        tl.store(p1 + HALF, cast_rne(x2 * c + x1 * s, dtype), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, T, q_sb, q_st, k_sb, k_st, cs_sb, H, KVH,
                 BACKWARD: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    j = tl.arange(0, BLOCK_D)[None, :]
    hj = tl.arange(0, BLOCK_H)[:, None]
    cs = b * cs_sb + t * (2 * HALF) + j
    c = tl.load(cos_ptr + cs, mask=j < HALF, other=0.0)
    s = tl.load(sin_ptr + cs, mask=j < HALF, other=0.0)
    dtype = q_ptr.dtype.element_ty
    c = cast_rne(c.to(tl.float32), dtype).to(tl.float32)  # llama.py casts the tables to the activations' dtype
    s = cast_rne(s.to(tl.float32), dtype).to(tl.float32)
    if BACKWARD:
        s = -s
    _rotate_heads(q_ptr + b * q_sb + t * q_st, H, c, s, hj, j, HALF, BLOCK_H)
    _rotate_heads(k_ptr + b * k_sb + t * k_st, KVH, c, s, hj, j, HALF, BLOCK_H)


def _check_rows(name: str, x: torch.Tensor, D: int, heads: int) -> None:
    if x.dim() != 3 or x.shape[-1] % D or not 0 <= heads * D <= x.shape[-1]:
        raise ValueError(f"kernels/rope.py: {name} must be (B, T, n*{D}) with n >= {heads} heads, "
                         f"got {tuple(x.shape)}")
    if x.numel() and not _rows_of_heads(x):
        raise ValueError(f"kernels/rope.py: {name} strides {x.stride()} are not rows of contiguous heads "
                         "(needed to rotate in place)")


def _rows_of_heads(x: torch.Tensor) -> bool:
    """Whether x (B, T, W) has contiguous, non-overlapping token rows (so it can be rotated in place)."""
    B, T, W = x.shape
    return x.stride(2) == 1 and (T == 1 or x.stride(1) >= W) and (B == 1 or x.stride(0) >= T * x.stride(1))


def _tables_2d_3d(cos: torch.Tensor, sin: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    if cos.shape != sin.shape:
        raise ValueError(f"kernels/rope.py: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    if cos.dim() == 4 and cos.shape[1] == 1:
        cos, sin = cos.squeeze(1), sin.squeeze(1)
    D = cos.shape[-1]
    ok = (cos.dim() == 2 and cos.shape[0] == T) or (cos.dim() == 3 and cos.shape[:2] in ((B, T), (1, T)))
    if not ok or D % 2:
        raise ValueError(f"kernels/rope.py: cos/sin must be (T={T}, D) or (B={B}, T, D) with D even, "
                         f"got {tuple(cos.shape)}")
    return cos.contiguous(), sin.contiguous()


def rope_rotate_(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 q_heads: int | None = None, k_heads: int | None = None, backward: bool = False) -> None:
    """Launcher: rotate in place the first q_heads heads of q (B, T, >= q_heads*D) and the first k_heads heads of
    k (or no k), cos/sin (T, D) or (B, T, D); heads default to all of each row. backward=True rotates by -sin
    (the gradient). q and k share B, T and dtype."""
    B, T = q.shape[:2]
    cos, sin = _tables_2d_3d(cos, sin, B, T)
    D = cos.shape[-1]
    H = q.shape[-1] // D if q_heads is None else q_heads
    _check_rows("q", q, D, H)
    KVH = 0
    if k is not None:
        KVH = k.shape[-1] // D if k_heads is None else k_heads
        _check_rows("k", k, D, KVH)
        if k.shape[:2] != q.shape[:2] or k.dtype != q.dtype:
            raise ValueError(f"kernels/rope.py: k {tuple(k.shape)} {k.dtype} does not match q "
                             f"{tuple(q.shape)} {q.dtype}")
    else:
        k = q  # never read: KVH = 0
    if B * T == 0:
        return
    half = D // 2
    block_d = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(H, KVH, 1)), 2048 // block_d))
    cs_sb = T * D if cos.dim() == 3 and cos.shape[0] == B and B > 1 else 0
    _rope_kernel[(B * T,)](q, k, cos, sin, T, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cs_sb, H, KVH,
                           BACKWARD=backward, HALF=half, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)

