"""lm_head + cross entropy fused over row chunks, in Triton + cuBLAS: the summed loss and its gradients without an
(N, V) logits tensor.

The spec (`fused_linear_cross_entropy_ref`), the autograd Function and the routing are in
qlora_core/ops/linear_ce.py; this file is the launcher `fused_linear_ce_forward`. Value:
F.cross_entropy(F.linear(h, weight).float(), target, ignore_index=ignore_index, reduction="sum"): logits come out
of the matmul in the compute dtype (h's, or autocast's), and everything after the matmul is fp32.

Design (Liger-Kernel's FusedLinearCrossEntropy, written for this library):
  * Rows go in chunks of `chunk_rows` (the caller's choice: qlora_core/ops/linear_ce.py bounds the logits per
    chunk), one preallocated logits buffer for all chunks. Per chunk: logits = h_chunk @ weight.T (cuBLAS), then
    one Triton program per row computes the row's logsumexp online over V (fp32 running max and sum, one read),
    the loss lse - logit[y], and, when gradients are wanted, writes softmax - onehot IN PLACE over the logits
    (second read, one write). Rows whose target is ignore_index get loss 0 and a zero gradient row (no exp work).
  * Gradients are finished here, in forward: dh_chunk = grad_logits @ weight, and only when asked,
    dW += grad_logits.T @ h_chunk into an fp32 accumulator (cast to weight's dtype at the end); the caller's
    backward only scales them by grad_output.
  * The gradient of the logits is rounded to the compute dtype before the two matmuls, as autograd does on the
    reference path (F.linear's backward in bf16); dW is summed over chunks in fp32 rather than per chunk in
    the weight's dtype.
Memory: one (chunk_rows, V) logits chunk, dh (N, d) in the compute dtype, dW (V, d) fp32 when asked for.
Targets must lie in [0, V) or equal ignore_index (an asynchronous device assert checks, as F.cross_entropy does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_rne  # fp32 -> dtype with round-to-nearest-even in the interpreter too

BLOCK_V = 4096  # vocab columns per step of a row's loop
NUM_WARPS = 8
# torch.addmm(..., out_dtype=fp32) takes bf16/fp16 operands into an fp32 accumulator on CUDA since torch 2.8
_ADDMM_OUT_DTYPE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


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


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for h's device (what F.linear would use), else h's."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    if h.dtype != weight.dtype:
        raise TypeError(f"kernels/linear_ce.py: h dtype {h.dtype} != weight dtype {weight.dtype} "
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
                            chunk_rows: int, need_dh: bool, need_dw: bool):
    """Launcher. h (N, d), weight (V, d), target (N,) int, chunk_rows >= 1 rows of logits at a time -> (loss fp32
    scalar, dh (N, d) in h's dtype or None, dW (V, d) in weight's dtype or None); gradients are those of the loss
    itself (grad_output 1)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or target.shape != h.shape[:1]:
        raise ValueError(f"kernels/linear_ce.py: shapes h {tuple(h.shape)}, weight {tuple(weight.shape)}, "
                         f"target {tuple(target.shape)}; expected (N, d), (V, d), (N,)")
    dtype = _compute_dtype(h, weight)
    hc, wc = h.to(dtype).contiguous(), weight.to(dtype).contiguous()
    target = target.contiguous()
    (N, d), V = hc.shape, wc.shape[0]
    ok = (target == ignore_index) | ((target >= 0) & (target < V))
    torch._assert_async(ok.all(), f"kernels/linear_ce.py: a target is outside [0, {V}) and not {ignore_index}")
    grad = need_dh or need_dw
    rows = max(1, min(N, chunk_rows))
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

