"""Where each op runs: the one place that decides between the Triton kernels and the PyTorch reference.

Rule: Triton for CUDA tensors (when triton imports), the reference everywhere else. Tests and benchmarks can
force a choice with `QLORA_CORE_BACKEND=reference|triton` or the `forced()` context manager; forcing
"triton" on CPU tensors is how CI runs the kernels under `TRITON_INTERPRET=1`.
Nothing here touches the GPU or imports triton at import time, so `import qlora_core` is safe on any box.

Under `torch.compile` the ops go through `torch.library` custom ops (namespace `qlora_core`, registered in
ops/quant4.py, ops/nf4_linear.py and ops/adamw.py) so Dynamo keeps one graph; in eager mode the same Python bodies
are called directly, because a custom op call costs ~100-130 us of dispatcher overhead (`compiling`,
docs/backends.md).
"""
from __future__ import annotations

import contextlib
import os

import torch

from .defaults import FLOAT_DTYPES

BACKEND_BRANCHES = ("reference", "triton")  # where an op runs: choose picks one, forced() forces one
_forced: list[str] = []
_has_triton: list[bool] = []  # has_triton()'s answer, once known


def has_triton() -> bool:
    """True when `import triton` works (it is a dependency, but a CPU wheel of torch may ship without it).

    Looked up once and kept in a plain module global: Dynamo traces `choose` inside compiled models, and it warns on
    an `lru_cache`-wrapped call there, while a global read traces cleanly.
    """
    if not _has_triton:
        try:
            import triton  # noqa: F401 (deferred: `import qlora_core` never loads triton)
        except ImportError:
            _has_triton.append(False)
        else:
            _has_triton.append(True)
    return _has_triton[0]


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Return "triton" or "reference" for tensors on `device` (see the module docstring for the rule). With a
    `dtype` outside defaults.FLOAT_DTYPES (float64: the references tests build) the reference runs unless a backend
    is forced, in which case the kernel's own dtype check answers."""
    choice = _forced[-1] if _forced else os.environ.get("QLORA_CORE_BACKEND", "")
    if not choice and dtype is not None and dtype not in FLOAT_DTYPES:
        return "reference"
    if choice:
        if choice not in BACKEND_BRANCHES:
            raise ValueError(f"QLORA_CORE_BACKEND={choice!r}; expected one of {BACKEND_BRANCHES}")
        if choice == "triton":
            if not has_triton():
                raise RuntimeError("backend 'triton' was forced but triton is not importable")
            if device.type != "cuda" and not interpreting():
                raise RuntimeError(
                    f"backend 'triton' was forced for a {device.type} tensor; set TRITON_INTERPRET=1 "
                    "before importing triton to run the kernels on the CPU")
        return choice
    return "triton" if device.type == "cuda" and has_triton() else "reference"


@contextlib.contextmanager
def forced(name: str):
    """Force a backend inside a `with` block (tests, benchmarks)."""
    if name not in BACKEND_BRANCHES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_BRANCHES}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def compiling() -> bool:
    """True while torch.compile (Dynamo) traces the caller: route through the custom ops then (~0.4 us a check)."""
    return torch.compiler.is_compiling()

