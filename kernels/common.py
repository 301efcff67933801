"""Triton helpers shared by every kernel file: the interpreter flag, the tile-size choice, a round-to-nearest-even
cast and a dot.

This folder imports nothing from `qlora_core` (tables and constants are passed in by the library's ops), so
these helpers live here rather than in the library's `backend`.
"""
from __future__ import annotations

import contextlib
import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The CPU interpreter (TRITON_INTERPRET=1) truncates fp32 -> bf16 and computes tl.dot on bf16 operands
# wrongly; kernels read this flag to round by hand and to upcast dot operands to fp32 there.
INTERPRET: tl.constexpr = tl.constexpr(interpreting())

# Tile sizes of the launchers (nf4_linear, quant4): the ones measured on a GPU, or small ones under the
# interpreter, which runs every program in Python. Decided once, here, at import (triton read TRITON_INTERPRET at
# its own import); launchers read TILING[-1]. `forced_tiling("gpu")` lets the interpreter tests run the GPU's tiles
# too (masks where a tile is wider than the tensor, whole K steps, split-K). Inline PTX stays off in the
# interpreter either way: that follows `interpreting()`, a capability, not a tile size.
TILING_BRANCHES = ("gpu", "interpreter")
TILING = ["interpreter" if interpreting() else "gpu"]  # the last entry rules; forced_tiling pushes onto it


@contextlib.contextmanager
def forced_tiling(name: str):
    """Use the tiles of one of TILING_BRANCHES inside a `with` block (tests)."""
    if name not in TILING_BRANCHES:
        raise ValueError(f"unknown tiling {name!r}; expected one of {TILING_BRANCHES}")
    TILING.append(name)
    try:
        yield
    finally:
        TILING.pop()


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
