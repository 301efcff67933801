"""The rope op: rotary position embedding (rotate-half layout) applied in place to q and k, with its spec, autograd
and custom op.

Semantics are llama.py's `x * cos + rotate_half(x) * sin` with cos/sin cast to x's dtype, evaluated in fp32 and
rounded once to x's dtype (`rope_ref`, the spec). With halves x = [x1, x2] and HF's duplicated tables cos = [c, c],
sin = [s, s] that is a rotation of each pair (x1[j], x2[j]); the backward is the transpose, the rotation by -sin,
applied in place to the incoming gradients.

Layout: q (B, T, H*D) and k (B, T, KVH*D) as the projections write them, or the first heads of one fused
(B, T, (H + 2*KVH)*D) q/k/v output (`apply_rope_qkv_`); cos, sin (T, D), (B, T, D) or (B, 1, T, D).

Dispatch: `apply_rope_` / `apply_rope_qkv_` ask `backend.choose` once and hand the answer to `RoPEFunction`:
"triton" rotates q and k in one launch of kernels/rope.py's `rope_rotate_`, "reference" copies `rope_ref` back
(the same in-place contract); torch.compile traces the reference path as it is (ops/rmsnorm.py says why the
reference is not wrapped in an op). Under torch.compile the Triton path calls the custom op `qlora_core::rope`
instead, which is functional: torch.library cannot register autograd for an op that mutates its inputs, so the op
returns the rotated heads as a new tensor (its gradient is the same op rotating by -sin) and the caller copies them
back into x, which keeps the in-place contract in the compiled graph at the cost of that copy. One op call per
tensor there: q and k take a launch each.
"""
from __future__ import annotations

import torch

from .. import backend


def _tables(cos: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """cos or sin (T, D) / (B, T, D) / (B, 1, T, D) -> broadcastable against x viewed (B, T, heads, D)."""
    if cos.dim() == 4:
        cos = cos.squeeze(1)
    return cos.to(x.dtype).float().unsqueeze(-2)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Spec. x (B, T, n*D) fp32/fp16/bf16, cos/sin (T, D) or (B, T, D) -> new (B, T, n*D) tensor in x's dtype:
    x * cos + rotate_half(x) * sin per head, cos/sin cast to x's dtype, math in fp32 (differentiable)."""
    D = cos.shape[-1]
    xf = x.float().unflatten(-1, (-1, D))  # (B, T, n, D)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * _tables(cos, x) + rotated * _tables(sin, x)).flatten(-2).to(x.dtype)


def _rows_of_heads(x: torch.Tensor) -> bool:
    """Whether x (B, T, W) has contiguous, non-overlapping token rows (so it can be rotated in place)."""
    B, T, W = x.shape
    return x.stride(2) == 1 and (T == 1 or x.stride(1) >= W) and (B == 1 or x.stride(0) >= T * x.stride(1))


def _rotate(xs, heads, cos, sin, impl: str, backward: bool) -> None:
    """Rotate in place the first heads[i] heads of each xs[i] (B, T, W); by -sin when backward."""
    if not xs:
        return
    if impl == "triton":
        from ..kernels import rope as k
        other, other_heads = (xs[1], heads[1]) if len(xs) > 1 else (None, None)
        k.rope_rotate_(xs[0], other, cos, sin, heads[0], other_heads, backward=backward)
    else:
        for x, n in zip(xs, heads):
            part = x[..., :n * cos.shape[-1]]
            part.copy_(rope_ref(part, cos, -sin if backward else sin))


class RoPEFunction(torch.autograd.Function):
    """Rotates in place the first heads[0] heads of x and, when k is given, the first heads[1] heads of k, both
    (B, T, W) (marked dirty); backward rotates the incoming gradients by -sin in place (a copy first when a
    gradient is not rows of heads). Returns x, or (x, k).

    impl "triton": one launch for both tensors; "reference": `rope_ref` copied back (same in-place contract).
    The tensors come first: autograd's CopySlices (an in-place op on a view) expects the view as input 0, and
    it allows only one output when that input is a view, so views go one per call.
    """

    @staticmethod
    def forward(ctx, x, k, cos, sin, heads, impl):
        xs = (x,) if k is None else (x, k)
        _rotate(xs, heads, cos, sin, impl, backward=False)
        ctx.mark_dirty(*xs)
        ctx.save_for_backward(cos, sin)
        ctx.impl, ctx.heads = impl, heads
        return x if k is None else (x, k)

    @staticmethod
    def backward(ctx, *grads):
        cos, sin = ctx.saved_tensors
        grads = tuple(None if g is None else (g if _rows_of_heads(g) else g.contiguous()) for g in grads)
        live = [(g, n) for g, n in zip(grads, ctx.heads) if g is not None]
        _rotate([g for g, _ in live], [n for _, n in live], cos, sin, ctx.impl, backward=True)
        dk = grads[1] if len(grads) > 1 else None
        return grads[0], dk, None, None, None, None


def _rope_compiled_(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Under torch.compile, Triton: the first `heads` heads of x rotated by the functional op, copied back into x."""
    part = x[..., :heads * cos.shape[-1]]
    part.copy_(torch.ops.qlora_core.rope(part, cos, sin, False))
    return x


def apply_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H*D) and k (B, T, KVH*D) in place; cos, sin (T, D) or (B, T, D) (any float dtype, cast to
    q's dtype). Returns (q, k), the same tensors; differentiable on both backends.

    One launch when neither q nor k is a view; views (F.linear's 3-D output is one) take one launch each, since
    autograd cannot mark two views dirty in one Function: prefer `apply_rope_qkv_` on a fused projection output.
    q and k must not be leaves that require grad, nor outputs of split/chunk/unbind (autograd forbids in-place
    ops on those; slice a fused tensor with [..., a:b] instead). Backward rotates the incoming gradients in place:
    a tensor passed as `gradient=` to backward() comes back rotated (in eager mode).
    """
    impl = backend.choose(q.device, q.dtype)
    D = cos.shape[-1]
    hq, hk = q.shape[-1] // D, k.shape[-1] // D
    if impl == "triton" and backend.compiling():
        return _rope_compiled_(q, hq, cos, sin), _rope_compiled_(k, hk, cos, sin)
    if q._is_view() or k._is_view():
        return RoPEFunction.apply(q, None, cos, sin, (hq,), impl), RoPEFunction.apply(k, None, cos, sin, (hk,), impl)
    return RoPEFunction.apply(q, k, cos, sin, (hq, hk), impl)


def apply_rope_qkv_(qkv: torch.Tensor, rotary_heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate in place the first `rotary_heads` heads of each token row of qkv (B, T, (H + 2*KVH)*D), the output of
    a fused q/k/v projection (rotary_heads = H + KVH: the query and key heads; the value heads stay as they are),
    in one launch. cos, sin (T, D) or (B, T, D). Returns qkv itself; differentiable on both backends.
    """
    impl = backend.choose(qkv.device, qkv.dtype)
    if impl == "triton" and backend.compiling():
        return _rope_compiled_(qkv, rotary_heads, cos, sin)
    return RoPEFunction.apply(qkv, None, cos, sin, (rotary_heads,), impl)


def apply_rope_partial(qkv: torch.Tensor, rotary_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor
                       ) -> torch.Tensor:
    """Partial rotary (transformers' partial_rotary_factor, Phi-4-mini): qkv (B, T, n*head_dim) -> a new tensor
    like it, the first R = cos.shape[-1] dims of each of the first `rotary_heads` heads rotated by `rope_ref`
    (rotate-half within those R dims), every other element as is. cos, sin (T, R) or (B, 1, T, R).

    Functional and on the reference math only: the in-place kernels take R as the head stride, and this path
    serves the few checkpoints with R < head_dim (it costs one extra copy of qkv). Differentiable.
    """
    R = cos.shape[-1]
    heads = qkv.unflatten(-1, (-1, head_dim))  # (B, T, n, head_dim)
    rot = rope_ref(heads[..., :rotary_heads, :R].flatten(-2), cos, sin).unflatten(-1, (rotary_heads, R))
    qk = torch.cat((rot, heads[..., :rotary_heads, R:]), dim=-1)  # (B, T, rotary_heads, head_dim)
    return torch.cat((qk, heads[..., rotary_heads:, :]), dim=-2).flatten(-2)


# -- torch.library custom op: what torch.compile sees (docs/backends.md, "torch.compile: the custom ops") ------
_T = torch.Tensor


@torch.library.custom_op("qlora_core::rope", mutates_args=())
def _rope_op(x: _T, cos: _T, sin: _T, backward: bool) -> _T:
    """x (B, T, n*D) -> a new contiguous (B, T, n*D) tensor: every head of x rotated (by -sin when backward)."""
    from ..kernels import rope as k
    y = x.clone(memory_format=torch.contiguous_format)
    k.rope_rotate_(y, None, cos, sin, backward=backward)
    return y


@_rope_op.register_fake
def _(x, cos, sin, backward):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _, cos, sin, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward = backward


def _rope_op_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return torch.ops.qlora_core.rope(dy, cos, sin, not ctx.backward), None, None, None


_rope_op.register_autograd(_rope_op_backward, setup_context=_setup_context)
