"""Every qlora_core custom op (`torch.library.custom_op` in qlora_core/ops) with the dtype grid it accepts, and the
check that its fake (what torch.compile traces with) describes its real output: shape, dtype and strides.

    op_names()                 the op names, read from the sources (a new op must get cases here)
    cases(name)                [(label, args)]: small arguments over the op's (input dtype, weight dtype) grid
    check_fake(name, label, args)  fake output metadata == real output metadata, then torch.library.opcheck

The block ops (rms_norm, swiglu, rope, fused_linear_cross_entropy) run Triton in their real bodies, so
tests/test_op_fakes.py checks them in a TRITON_INTERPRET=1 subprocess (`python tests/_op_grid.py block`); the
others run their PyTorch bodies in the test process. Shared by test_op_fakes.py (every op) and test_compile.py.
"""
import dataclasses
import re
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parents[1]
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_OPS = ("rms_norm", "rms_norm_backward", "swiglu", "swiglu_backward", "rope", "fused_linear_cross_entropy")


def op_names() -> set[str]:
    """Names of every `torch.library.custom_op("qlora_core::<name>", ...)` in qlora_core/ops/*.py."""
    pat = re.compile(r'torch\.library\.custom_op\(\s*"qlora_core::(\w+)"')
    return {m for p in (ROOT / "qlora_core" / "ops").glob("*.py") for m in pat.findall(p.read_text())}


def _q(dtype: torch.dtype, shape=(24, 64), quant_type="nf4", double_quant=True):
    from qlora_core import quantize
    return quantize((torch.randn(shape) * 0.05).to(dtype), quant_type, 64, double_quant)


def _quant_cases():
    from qlora_core.ops.quant4 import q_args
    out = {"quantize_4bit": [], "dequantize_4bit": [], "dequantize_4bit_into": []}
    for wd in FLOATS:
        for qt, dq in (("nf4", True), ("fp4", False)):
            out["quantize_4bit"].append((f"{wd} {qt} dq={dq}", ((torch.randn(7, 129) * 0.1).to(wd), 64, qt, dq)))
            q = _q(wd, (7, 129), qt, dq)
            for od in FLOATS:
                out["dequantize_4bit"].append((f"w {wd} {qt} dq={dq} -> {od}", (*q_args(q), od)))
                out["dequantize_4bit_into"].append((f"w {wd} {qt} dq={dq} into {od}",
                                                    (torch.empty(7, 129, dtype=od), *q_args(q))))
    return out


def _linear_cases():
    """nf4_linear over (x dtype, weight dtype): bf16 activations over a weight quantized from fp32 and every other
    pair; 2-D and 3-D x, with and without bias; its input grad over (dy dtype, weight dtype)."""
    from qlora_core.ops.quant4 import q_args
    out = {"nf4_linear": [], "nf4_linear_input_grad": []}
    for wd in FLOATS:
        q = _q(wd)
        for xd in FLOATS:
            x = torch.randn(3, 5, 64).to(xd)
            out["nf4_linear"].append((f"x {xd} w {wd} bias", (x, *q_args(q), torch.randn(24).to(xd))))
            out["nf4_linear"].append((f"x {xd} w {wd} 2-D", (x[0], *q_args(q), None)))
            out["nf4_linear_input_grad"].append((f"dy {xd} w {wd}", (torch.randn(3, 5, 24).to(xd), *q_args(q))))
    return out


def _adam_cases():
    from qlora_core.formats import dynamic_map
    from qlora_core.ops.adamw import adamw_coeffs
    out = {"adamw8bit_step": [], "adamw32_step": []}
    n, nb = 600, 3
    for pd in FLOATS:
        p, g = torch.randn(n).to(pd), torch.randn(n).to(pd)
        s = [torch.randint(0, 256, (n,), dtype=torch.uint8) for _ in range(2)]
        k8 = list(dataclasses.astuple(adamw_coeffs(3, 1e-3, 0.9, 0.999, 1e-8, 0.01, 8)))
        k32 = list(dataclasses.astuple(adamw_coeffs(3, 1e-3, 0.9, 0.999, 1e-8, 0.01, 32)))
        out["adamw8bit_step"].append((f"p {pd}", (p, g, *s, torch.rand(nb) * 0.1, torch.rand(nb) * 0.01,
                                                  dynamic_map(True), dynamic_map(False), k8)))
        out["adamw32_step"].append((f"p {pd}", (p.clone(), g, torch.randn(n) * 0.1, torch.rand(n) * 0.01, k32)))
    return out


def _block_cases():
    """The block ops over their dtype grids (their real bodies are Triton: run under TRITON_INTERPRET=1)."""
    from tests._block_cases import ce_inputs, rope_tables
    out = {k: [] for k in BLOCK_OPS}
    for xd in FLOATS:
        for wd in (xd, torch.float32):
            x, w = torch.randn(2, 5, 64).to(xd), (1 + 0.2 * torch.randn(64)).to(wd)
            out["rms_norm"].append((f"x {xd} w {wd}", (x, w, 1e-6)))
            _, rstd = torch.ops.qlora_core.rms_norm(x, w, 1e-6)
            dy = torch.randn(2, 5, 64).to(torch.promote_types(xd, wd))
            for dw in (True, False):
                out["rms_norm_backward"].append((f"x {xd} w {wd} dw={dw}", (dy, x, w, rstd, dw)))
            # Gemma's (1 + w) norm: the output in x's dtype, whatever the weight's
            out["rms_norm"].append((f"x {xd} w {wd} unit_offset", (x, w, 1e-6, True)))
            out["rms_norm_backward"].append((f"x {xd} w {wd} unit_offset", (dy.to(xd), x, w, rstd, True, True)))
        gu = torch.randn(7, 96).to(xd)
        out["swiglu"] += [(f"{xd} fused", (gu, None)), (f"{xd} split", (gu[:, :48].contiguous(),
                                                                      gu[:, 48:].contiguous())),
                          (f"{xd} fused gelu_tanh", (gu, None, "gelu_tanh"))]
        dy = torch.randn(7, 48).to(xd)
        out["swiglu_backward"] += [(f"{xd} fused", (dy, gu, None)),
                                   (f"{xd} split", (dy, gu[:, :48].contiguous(), gu[:, 48:].contiguous())),
                                   (f"{xd} fused gelu_tanh", (dy, gu, None, "gelu_tanh"))]
        for td in (xd, torch.float32):
            cos, sin = rope_tables(torch.arange(5), 16, td)
            for bw in (False, True):
                out["rope"].append((f"x {xd} tables {td} backward={bw}", (torch.randn(2, 5, 48).to(xd), cos, sin, bw)))
        for dw in (True, False):
            h, w, y = ce_inputs(9, 32, 100, xd, "cpu", ignored=0.25, weight_grad=dw)
            for dh in (True, False):
                out["fused_linear_cross_entropy"].append((f"{xd} dh={dh} dw={dw}",
                                                          (h.detach(), w.detach(), y, -100, 400, dh, dw)))
    return out


BUILDERS = {**{k: _quant_cases for k in ("quantize_4bit", "dequantize_4bit", "dequantize_4bit_into")},
            **{k: _linear_cases for k in ("nf4_linear", "nf4_linear_input_grad")},
            **{k: _adam_cases for k in ("adamw8bit_step", "adamw32_step")}, **{k: _block_cases for k in BLOCK_OPS}}


def cases(name: str) -> list:
    """[(label, args)] for custom op `name` (KeyError for an op without cases)."""
    if name not in BUILDERS:
        raise KeyError(f"no cases for custom op qlora_core::{name}: add them to tests/_op_grid.py")
    _import_ops()
    return BUILDERS[name]()[name]


def _import_ops() -> None:
    """Import every qlora_core/ops module: each registers its custom ops on import."""
    import importlib
    for p in (ROOT / "qlora_core" / "ops").glob("*.py"):
        importlib.import_module(f"qlora_core.ops.{p.stem}")


def _meta(t):
    return (tuple(t.shape), t.dtype, tuple(t.stride())) if isinstance(t, torch.Tensor) else t


def check_fake(name: str, label: str, args: tuple, opcheck: bool = True) -> None:
    """The op's fake output (under FakeTensorMode) has the real output's shape, dtype and strides, output by
    output (None for an op that only mutates); then torch.library.opcheck (fake vs real again, plus schema,
    autograd registration and AOT dispatch) unless opcheck=False (the block ops: tests/_block_cases.py opchecks
    them, and opcheck's dozen runs per case are slow under the interpreter)."""
    _import_ops()
    op = getattr(torch.ops.qlora_core, name).default
    real = op(*tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, args))
    with FakeTensorMode() as mode:
        fake = op(*tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, args))
    got, want = [_meta(t) for t in tree_flatten(fake)[0]], [_meta(t) for t in tree_flatten(real)[0]]
    assert got == want, f"{name} [{label}]: fake {got} != real {want}"
    if opcheck:
        torch.library.opcheck(op, args)


def run_block() -> int:
    """The block ops' fakes against their Triton bodies (call under TRITON_INTERPRET=1); returns the cases run."""
    from qlora_core import backend
    assert backend.interpreting()
    torch.manual_seed(0)
    n = 0
    with backend.forced("triton"):
        for name in BLOCK_OPS:
            cs = cases(name)
            assert len(cs) >= 4, name
            for label, args in cs:
                check_fake(name, label, args, opcheck=False)
                n += 1
    print(f"block: {n} checks passed")
    return n


def run_compile() -> int:
    """nf4_linear with a pointwise op after it (silu, then a scale), compiled by inductor, over every (x dtype,
    weight dtype): output dtype is x's and forward / input grad equal eager within the dtype's rounding (inductor
    computes silu * 2 in fp32 and rounds once, eager rounds after each op: 2 ulps of the output dtype)."""
    from qlora_core.ops.nf4_linear import nf4_linear
    from tests.helpers import DTYPE_ATOL, assert_close_verbose
    torch.manual_seed(0)
    n = 0
    for wd in FLOATS:
        q = _q(wd)
        for xd in FLOATS:
            def f(x, b):
                return torch.nn.functional.silu(nf4_linear(x, q, b)) * 2.0

            x = torch.randn(3, 5, 64).to(xd).requires_grad_()
            b = torch.randn(24).to(xd)
            gy = torch.randn(3, 5, 24).to(xd)
            torch._dynamo.reset()
            y = torch.compile(f, backend="inductor", fullgraph=True)(x, b)
            (dx,) = torch.autograd.grad(y, x, gy)
            y0 = f(x, b)
            (dx0,) = torch.autograd.grad(y0, x, gy)
            assert y.dtype == dx.dtype == xd, (xd, wd, y.dtype, dx.dtype)
            rtol = 2 * torch.finfo(xd).eps
            assert_close_verbose(y, y0, atol=DTYPE_ATOL[xd], rtol=rtol, name=f"y x {xd} w {wd}")
            assert_close_verbose(dx, dx0, atol=DTYPE_ATOL[xd], rtol=rtol, name=f"dx x {xd} w {wd}")
            n += 1
    print(f"compile: {n} checks passed")
    return n


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(0 if {"block": run_block, "compile": run_compile}[sys.argv[1]]() > 0 else 1)
