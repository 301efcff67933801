"""The linear_ce op: lm_head + summed cross entropy over row chunks, without an (N, V) logits tensor, with its spec,
autograd and custom op.

Value: F.cross_entropy(F.linear(h, weight).float(), target, ignore_index=ignore_index, reduction="sum"), i.e.
train.py's loss: logits come out of the matmul in the compute dtype (h's, or autocast's), and everything after
the matmul is fp32. `fused_linear_cross_entropy_ref` is that spec, chunked the way train.batch_loss is (chunks of
chunk_logits // V rows, each recomputed in backward).

Dispatch: `fused_linear_cross_entropy` asks `backend.choose`. "reference" runs the spec under autograd, which
torch.compile traces as it is (ops/rmsnorm.py says why the reference is not wrapped in an op). "triton" runs
kernels/linear_ce.py's launcher, which finishes the gradients in forward (one logits chunk at a time, softmax -
onehot written over it); the autograd Function only scales them by grad_output in backward, in place and once (a
second backward raises). Without gradients (evaluation) the launcher computes the loss alone. Under
torch.compile the Triton path goes through the custom op `qlora_core::fused_linear_cross_entropy` instead (the
same launcher, opaque to Dynamo), whose gradient formula scales the gradients it returned, out of place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend

DEFAULT_CHUNK_LOGITS = 2 ** 27  # logits per chunk: bounds the transient buffer (256 MiB bf16, 512 MiB fp32)


def _chunk_ce(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), target, ignore_index=ignore_index, reduction="sum")


def _chunk_rows(n: int, vocab: int, chunk_logits: int) -> int:
    """Rows per chunk: chunk_logits // vocab, at least 1, at most n."""
    if chunk_logits < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_logits must be >= 1, got {chunk_logits}")
    return max(1, min(n, chunk_logits // vocab))


def fused_linear_cross_entropy_ref(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                   ignore_index: int = -100, chunk_logits: int = DEFAULT_CHUNK_LOGITS
                                   ) -> torch.Tensor:
    """Spec. h (N, d), weight (V, d), target (N,) int -> summed cross entropy, fp32 scalar. Chunks of
    chunk_logits // V rows, each recomputed in backward (torch.utils.checkpoint) when grads are on."""
    n = h.shape[0]
    rows = _chunk_rows(n, weight.shape[0], chunk_logits)
    if n <= rows:  # one chunk (or none): nothing to recompute
        return _chunk_ce(h, weight, target, ignore_index)
    total = None
    for s in range(0, n, rows):
        args = (h[s:s + rows], weight, target[s:s + rows], ignore_index)
        part = torch.utils.checkpoint.checkpoint(_chunk_ce, *args, use_reentrant=False) \
            if torch.is_grad_enabled() else _chunk_ce(*args)
        total = part if total is None else total + part
    return total


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """The Triton path: forward computes the loss and the gradients; backward scales them by grad_output (once)."""

    @staticmethod
    def forward(ctx, h, weight, target, ignore_index, chunk_logits):
        from ..kernels import linear_ce as k
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = _chunk_rows(h.shape[0], weight.shape[0], chunk_logits)
        loss, dh, dw = k.fused_linear_ce_forward(h, weight, target, ignore_index, rows, need_dh, need_dw)
        ctx.grads = (dh, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy: backward ran twice; the gradients were computed in "
                               "forward and were already handed out (retain_graph cannot replay them)")
        dh, dw = ctx.grads
        ctx.grads = None
        for g in (dh, dw):
            if g is not None:
                g.mul_(grad_output)
        return dh, dw, None, None, None


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               ignore_index: int = -100, chunk_logits: int = DEFAULT_CHUNK_LOGITS) -> torch.Tensor:
    """Summed cross entropy of the rows whose target != ignore_index, fp32 scalar:
    F.cross_entropy(F.linear(h, weight).float(), target, reduction="sum") without the (N, V) logits.

    h (N, d) bf16/fp16/fp32, weight (V, d) (h's dtype, or anything under autocast), target (N,) integer;
    chunk_logits bounds the logits held at once (rows per chunk = chunk_logits // V). Triton where
    backend.choose(h.device, h.dtype) says so, else `fused_linear_cross_entropy_ref` (differentiable either way).
    """
    if backend.choose(h.device, h.dtype) != "triton":
        return fused_linear_cross_entropy_ref(h, weight, target, ignore_index, chunk_logits)
    grad = torch.is_grad_enabled()
    if backend.compiling():
        return torch.ops.qlora_core.fused_linear_cross_entropy(h, weight, target, ignore_index, chunk_logits,
                                                               grad and h.requires_grad,
                                                               grad and weight.requires_grad)[0]
    if grad and (h.requires_grad or weight.requires_grad):
        return FusedLinearCrossEntropyFunction.apply(h, weight, target, ignore_index, chunk_logits)
    # no gradients wanted (evaluation): the loss only, no softmax pass or gradient matmuls
    from ..kernels import linear_ce as k
    rows = _chunk_rows(h.shape[0], weight.shape[0], chunk_logits)
    return k.fused_linear_ce_forward(h, weight, target, ignore_index, rows, False, False)[0]


# -- torch.library custom op: what torch.compile sees (docs/backends.md, "torch.compile: the custom ops") ------
_T = torch.Tensor


@torch.library.custom_op("qlora_core::fused_linear_cross_entropy", mutates_args=())
def _linear_ce_op(h: _T, weight: _T, target: _T, ignore_index: int, chunk_logits: int, need_dh: bool,
                  need_dw: bool) -> tuple[_T, _T, _T]:
    """The launcher: (loss, dh, dW), the gradients of the loss itself where asked for, else empty (0,) tensors (an
    op cannot return None)."""
    from ..kernels import linear_ce as k
    rows = _chunk_rows(h.shape[0], weight.shape[0], chunk_logits)
    loss, dh, dw = k.fused_linear_ce_forward(h, weight, target, ignore_index, rows, need_dh, need_dw)
    return loss, (h.new_empty(0) if dh is None else dh), (weight.new_empty(0) if dw is None else dw)


@_linear_ce_op.register_fake
def _(h, weight, target, ignore_index, chunk_logits, need_dh, need_dw):
    return (h.new_empty((), dtype=torch.float32), h.new_empty(h.shape if need_dh else 0),
            weight.new_empty(weight.shape if need_dw else 0))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])  # the finished gradients; h and weight are not needed
    ctx.need = inputs[5:7]


def _linear_ce_op_backward(ctx, grad_output, _ddh, _ddw):
    dh, dw = (g * grad_output if need else None for g, need in zip(ctx.saved_tensors, ctx.need))
    return dh, dw, None, None, None, None, None


_linear_ce_op.register_autograd(_linear_ce_op_backward, setup_context=_setup_context)
