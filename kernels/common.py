"""Triton helpers shared by every kernel file: the interpreter flag, a round-to-nearest-even cast and a dot.

This folder imports nothing from `qlora_core` (tables and constants are passed in by the library's ops), so
these helpers live here rather than in the library's `backend`.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The CPU interpreter (TRITON_INTERPRET=1) truncates fp32 -> bf16 and computes tl.dot on bf16 operands
# wrongly; kernels read this flag to round by hand and to upcast dot operands to fp32 there.
INTERPRET: tl.constexpr = tl.constexpr(interpreting())


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """fp32 -> dtype rounding to nearest even (the GPU's own cvt; done with integer ops in the interpreter)."""
    if dtype == tl.float32:
        return x
    elif INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def mma(a, b, acc):
    """acc + a @ b with fp32 accumulation: fp32 operands stay fp32 (ieee, not tf32); the interpreter upcasts
    bf16/fp16 operands (its tl.dot on bf16 is wrong)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
