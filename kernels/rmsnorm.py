"""RMSNorm's Triton kernels and launchers: y = weight * cast(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps).

The spec (`rms_norm_ref`), the autograd Function and the routing are in qlora_core/ops/rmsnorm.py; this file is
the two launchers, `rms_norm_forward` and `rms_norm_backward`. The mean square, rstd and the normalized row are
fp32, that row is rounded to x's dtype, then multiplied by the weight in PyTorch's promotion of (x.dtype,
weight.dtype), which is also the output dtype (bf16 x with an fp32 weight gives fp32).
With unit_offset (Gemma's RMSNorm, weights stored centred on 0) y = cast(xhat * (1 + weight)) with the product in
fp32 and the output in x's dtype: transformers' Gemma3RMSNorm rounds once, after the weight, not before it.

Design:
  * Forward: one program per row holds the whole row in registers (BLOCK = next_pow2(d)) and writes y and
    rstd (fp32, one per row), so backward can recompute the normalized row from x and rstd.
  * Backward: dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * weight and xhat = x * rstd, all fp32 (the
    rounding of xhat to x's dtype is a cast, whose gradient is the identity, as in autograd).
    dweight = sum over rows of dy * cast(xhat): each program walks a fixed, contiguous range of rows and keeps
    its partial sum in fp32 registers; the (programs, d) partials are then summed by torch in a fixed order,
    so dweight is deterministic run to run (no atomics).
  * Frozen weight (QLoRA norms): COMPUTE_DW=False drops the partial sums and the reduction, and the grid
    goes back to one row per program.
Limits: d <= MAX_D (one row per program in registers); x's last dim contiguous after `.contiguous()`.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import cast_rne  # fp32 -> dtype with round-to-nearest-even in the interpreter too

MAX_D = 65536  # the widest row a program holds in registers (Llama widths are 2048..16384)


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, d, eps, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < d
    x = tl.load(x_ptr + row * d + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / d + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:  # Gemma: fp32 xhat * (1 + w), rounded once
        xn = xf * rstd
        w = w + 1.0
    else:
        xn = cast_rne(xf * rstd, x.dtype).to(tl.float32)  # rounded to x's dtype before the weight, as llama.py
    tl.store(y_ptr + row * d + cols, cast_rne(xn * w, y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, n_rows, d, rows_per_program,
                         COMPUTE_DW: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < d
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        w = w + 1.0
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for row in range(first, last):
        x = tl.load(x_ptr + row * d + cols, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x.to(tl.float32) * rstd
        if COMPUTE_DW:
            if UNIT_OFFSET:
                dw += dy * xhat  # Gemma's weight saw the fp32 row
            else:
                dw += dy * cast_rne(xhat, x.dtype).to(tl.float32)  # the weight saw the rounded row
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / d))
        tl.store(dx_ptr + row * d + cols, cast_rne(dx, dx_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(dw_part_ptr + pid * d + cols, dw, mask=mask)


def _num_warps(block: int) -> int:
    # one warp per 256 row elements (8 fp32 registers a thread), 4..16 warps
    return max(4, min(16, block // 256))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so several rows per program are exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check(x: torch.Tensor, weight: torch.Tensor) -> int:
    d = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != d:
        raise ValueError(f"kernels/rmsnorm.py: weight shape {tuple(weight.shape)} != ({d},) for x {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"kernels/rmsnorm.py: x dtype {x.dtype} is not fp32/fp16/bf16")
    if not 0 < d <= MAX_D:
        raise ValueError(f"kernels/rmsnorm.py: row width d={d} is outside 1..{MAX_D}")
    return d


def out_dtype(x: torch.Tensor, weight: torch.Tensor, unit_offset: bool) -> torch.dtype:
    """y's dtype: x's with unit_offset (Gemma's type_as(x)), else PyTorch's promotion of x's and weight's."""
    return x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher. x (..., d), weight (d,) -> (y (..., d) in out_dtype(x, weight, unit_offset), rstd (rows,) fp32).

    x is made contiguous once; y has x's shape.
    """
    d = _check(x, weight)
    x2 = x.reshape(-1, d).contiguous()
    rows = x2.shape[0]
    y = torch.empty((rows, d), dtype=out_dtype(x, weight, unit_offset), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(d)
        _rms_norm_fwd_kernel[(rows,)](x2, weight.contiguous(), y, rstd, d, eps, UNIT_OFFSET=unit_offset,
                                      BLOCK=block, num_warps=_num_warps(block))
    return y.view(x.shape), rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      compute_dw: bool, unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launcher. dy, x (..., d), weight (d,), rstd (rows,) fp32 -> (dx (..., d) in x's dtype,
    dweight (d,) in weight's dtype, or None when not compute_dw); unit_offset as in rms_norm_forward."""
    d = _check(x, weight)
    x2 = x.reshape(-1, d).contiguous()
    dy2 = dy.reshape(-1, d).contiguous()
    rows = x2.shape[0]
    dx = torch.empty_like(x2)
    if compute_dw:
        programs = max(1, min(rows, 4 * _sm_count(x.device)))
    else:
        programs = rows
    per_program = triton.cdiv(rows, programs) if rows else 0
    programs = triton.cdiv(rows, per_program) if rows else 0
    dw_part = torch.empty((programs, d) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(d)
        _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight.contiguous(), rstd, dx, dw_part, rows, d, per_program,
                                          COMPUTE_DW=compute_dw, UNIT_OFFSET=unit_offset,
                                          BLOCK=block, num_warps=_num_warps(block))
    dw = None
    if compute_dw:
        dw = dw_part.sum(0).to(weight.dtype) if rows else torch.zeros_like(weight)
    return dx.view(x.shape), dw

