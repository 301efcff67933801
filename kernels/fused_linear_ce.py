"""lm_head + cross entropy fused over row chunks: the summed loss and its gradients without an (N, V) logits tensor.

Value: F.cross_entropy(F.linear(h, weight).float(), target, ignore_index=ignore_index, reduction="sum"), i.e.
train.py's `_chunk_ce` summed over chunks: logits come out of the matmul in the compute dtype (h's, or autocast's),
and everything after the matmul is fp32. `fused_linear_cross_entropy_ref` is that spec (chunked the way
train.batch_loss is, each chunk recomputed in backward); `fused_linear_cross_entropy` routes (backend.choose).

Design (Liger-Kernel's FusedLinearCrossEntropy, written for this library):
  * Rows go in chunks of `chunk_logits // V` (default 2**27 logits: 256 MiB in bf16), one preallocated logits
    buffer for all chunks. Per chunk: logits = h_chunk @ weight.T (cuBLAS), then one Triton program per row
    computes the row's logsumexp online over V (fp32 running max and sum, one read), the loss lse - logit[y], and,
    when gradients are wanted, writes softmax - onehot IN PLACE over the logits (second read, one write).
    Rows whose target is ignore_index get loss 0 and a zero gradient row (no exp work).
  * Gradients are finished in forward: dh_chunk = grad_logits @ weight, and only when weight requires grad,
    dW += grad_logits.T @ h_chunk into an fp32 accumulator (cast to weight's dtype at the end). Backward only
    scales them by grad_output, in place, and hands them out once (a second backward raises).
  * The gradient of the logits is rounded to the compute dtype before the two matmuls, as autograd does on the
    reference path (F.linear's backward in bf16); dW is summed over chunks in fp32 rather than per chunk in
    the weight's dtype.
Memory: one (rows, V) logits chunk, dh (N, d) in the compute dtype, dW (V, d) fp32 when the weight is trainable.
Targets must lie in [0, V) or equal ignore_index (an asynchronous device assert checks, as F.cross_entropy does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qlora_core import backend
from qlora_core.kernels.nf4_tile import cast_rne  # fp32 -> dtype with round-to-nearest-even in the interpreter too

DEFAULT_CHUNK_LOGITS = 2 ** 27  # logits per chunk: bounds the transient buffer (256 MiB bf16, 512 MiB fp32)
BLOCK_V = 4096  # vocab columns per step of a row's loop
NUM_WARPS = 8
# torch.addmm(..., out_dtype=fp32) takes bf16/fp16 operands into an fp32 accumulator on CUDA since torch 2.8
_ADDMM_OUT_DTYPE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


def _chunk_ce(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), target, ignore_index=ignore_index, reduction="sum")


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


@triton.jit
def _ce_rows_kernel(logits_ptr, target_ptr, loss_ptr, V, ignore_index, HAS_GRAD: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    cols = tl.arange(0, BLOCK)
    y = tl.load(target_ptr + row).to(tl.int64)
    if y == ignore_index:
        if HAS_GRAD:
            zero = tl.zeros((BLOCK,), dtype=logits_ptr.dtype.element_ty)
            for v0 in range(0, V, BLOCK):
                tl.store(base + v0 + cols, zero, mask=v0 + cols < V)
        tl.store(loss_ptr + row, 0.0)
    else:
        # online logsumexp: running max m and sum s of exp(x - m), one pass over the row
        m = float("-inf")
        s = 0.0
        for v0 in range(0, V, BLOCK):
            x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        tl.store(loss_ptr + row, lse - tl.load(base + y).to(tl.float32))
        if HAS_GRAD:
            for v0 in range(0, V, BLOCK):
                idx = v0 + cols
                x = tl.load(base + idx, mask=idx < V, other=0.0)
                g = tl.exp(x.to(tl.float32) - lse) - tl.where(idx == y, 1.0, 0.0)
                tl.store(base + idx, cast_rne(g, x.dtype), mask=idx < V)


def _chunk_rows(n: int, vocab: int, chunk_logits: int) -> int:
    if chunk_logits < 1:
        raise ValueError(f"kernels/fused_linear_ce.py: chunk_logits must be >= 1, got {chunk_logits}")
    return max(1, min(n, chunk_logits // vocab))


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for h's device (what F.linear would use), else h's."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    if h.dtype != weight.dtype:
        raise TypeError(f"kernels/fused_linear_ce.py: h dtype {h.dtype} != weight dtype {weight.dtype} "
                        "(outside autocast they must match, as for F.linear)")
    return h.dtype


def _add_weight_grad(dw: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """dw (V, d) fp32 += g.T @ h with g (n, V), h (n, d) in the compute dtype, accumulated in fp32."""
    if g.dtype == torch.float32:
        dw.addmm_(g.t(), h)
    elif dw.is_cuda and _ADDMM_OUT_DTYPE:
        torch.addmm(dw, g.t(), h, out_dtype=torch.float32, out=dw)
    else:  # CPU: no mixed-dtype addmm; upcast the chunk
        dw.addmm_(g.t().float(), h.float())


def fused_linear_ce_forward(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int,
                            chunk_logits: int, need_dh: bool, need_dw: bool):
    """Launcher. h (N, d), weight (V, d), target (N,) int -> (loss fp32 scalar, dh (N, d) in h's dtype or None,
    dW (V, d) in weight's dtype or None); gradients are those of the loss itself (grad_output 1)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or target.shape != h.shape[:1]:
        raise ValueError(f"kernels/fused_linear_ce.py: shapes h {tuple(h.shape)}, weight {tuple(weight.shape)}, "
                         f"target {tuple(target.shape)}; expected (N, d), (V, d), (N,)")
    dtype = _compute_dtype(h, weight)
    hc, wc = h.to(dtype).contiguous(), weight.to(dtype).contiguous()
    target = target.contiguous()
    (N, d), V = hc.shape, wc.shape[0]
    ok = (target == ignore_index) | ((target >= 0) & (target < V))
    torch._assert_async(ok.all(), f"kernels/fused_linear_ce.py: a target is outside [0, {V}) and not {ignore_index}")
    grad = need_dh or need_dw
    rows = _chunk_rows(N, V, chunk_logits)
    logits = torch.empty((rows, V), dtype=dtype, device=h.device)
    loss_rows = torch.empty(N, dtype=torch.float32, device=h.device)
    dh = torch.empty((N, d), dtype=dtype, device=h.device) if need_dh else None
    dw = torch.zeros((V, d), dtype=torch.float32, device=h.device) if need_dw else None
    for s in range(0, N, rows):
        e = min(s + rows, N)
        buf = logits[:e - s]
        torch.mm(hc[s:e], wc.t(), out=buf)
        _ce_rows_kernel[(e - s,)](buf, target[s:e], loss_rows[s:e], V, ignore_index, HAS_GRAD=grad,
                                  BLOCK=min(BLOCK_V, triton.next_power_of_2(V)), num_warps=NUM_WARPS)
        if need_dh:
            torch.mm(buf, wc, out=dh[s:e])
        if need_dw:
            _add_weight_grad(dw, buf, hc[s:e])
    loss = loss_rows.sum()
    return loss, (dh.to(h.dtype) if need_dh else None), (dw.to(weight.dtype) if need_dw else None)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Forward computes the loss and the gradients; backward scales them by grad_output (once)."""

    @staticmethod
    def forward(ctx, h, weight, target, ignore_index, chunk_logits):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dh, dw = fused_linear_ce_forward(h, weight, target, ignore_index, chunk_logits, need_dh, need_dw)
        ctx.grads = (dh, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("kernels/fused_linear_ce.py: backward ran twice; the gradients were computed in "
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
    backend.choose(h.device) says so, else `fused_linear_cross_entropy_ref` (differentiable either way).
    """
    if backend.choose(h.device, h.dtype) != "triton":
        return fused_linear_cross_entropy_ref(h, weight, target, ignore_index, chunk_logits)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return FusedLinearCrossEntropyFunction.apply(h, weight, target, ignore_index, chunk_logits)
    # no gradients wanted (evaluation): the loss only, no softmax pass or gradient matmuls
    return fused_linear_ce_forward(h, weight, target, ignore_index, chunk_logits, False, False)[0]
