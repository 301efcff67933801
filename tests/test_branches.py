"""The one registry of dispatch branches: every device-dependent choice is a module-level tuple named `*_BRANCHES`
in qlora_core/ or kernels/ (found here by reading the source, nothing imported), and REGISTRY names, for each, the
table of a test that forces every branch on the CPU. A new set, or a new branch in a set, fails here until a test
covers it. This file also forces backend.BACKEND_BRANCHES (where an op runs) on four ops.
"""
import ast
import json
import math
from pathlib import Path

import pytest
import torch

from tests import test_nf4_linear_branches, test_quant4_interpret, test_sdpa_branches

ROOT = Path(__file__).resolve().parents[1]

# where the set is defined ("file:NAME") -> the test table whose keys are the branches it forces
OPS = ("rms_norm", "swiglu", "nf4_linear", "adamw32")  # adamw32: ops/adamw.triton_kernels' choice
BACKEND_SERVES = {"reference": OPS, "triton": OPS}
KERNEL_FILE = {"rms_norm": "rmsnorm", "swiglu": "swiglu", "nf4_linear": "nf4_linear", "adamw32": "adamw"}
REGISTRY = {
    "qlora_core/backend.py:BACKEND_BRANCHES": BACKEND_SERVES,
    "qlora_core/llama.py:SDPA_BRANCHES": test_sdpa_branches.SERVES,
    "kernels/nf4_linear.py:FWD_BRANCHES": test_nf4_linear_branches.FWD_SERVES,
    "kernels/nf4_linear.py:DX_BRANCHES": test_nf4_linear_branches.DX_SERVES,
    # a tiling is covered when both nf4_linear's branch tests and quant4's interpreter groups run it
    "kernels/common.py:TILING_BRANCHES": {
        t: (test_nf4_linear_branches.TILING_SERVES[t], test_quant4_interpret.TILING_SERVES[t])
        for t in set(test_nf4_linear_branches.TILING_SERVES) & set(test_quant4_interpret.TILING_SERVES)},
    "kernels/quant4.py:MODE_BRANCHES": test_quant4_interpret.MODE_SERVES,
}


def _branch_sets() -> dict[str, tuple]:
    """"file:NAME" -> the literal tuple of every module-level `NAME_BRANCHES = (...)` in qlora_core/ and kernels/."""
    found = {}
    for path in sorted([*(ROOT / "qlora_core").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                    and node.targets[0].id.endswith("_BRANCHES"):
                found[f"{path.relative_to(ROOT)}:{node.targets[0].id}"] = ast.literal_eval(node.value)
    return found


def test_every_branch_set_is_registered():
    assert set(_branch_sets()) == set(REGISTRY)


@pytest.mark.parametrize("where", sorted(REGISTRY))
def test_every_branch_is_tested(where):
    """A new branch fails here until its test's table covers it (and a table cannot name a branch that is gone)."""
    branches = _branch_sets()[where]
    assert len(set(branches)) == len(branches), f"{where}: duplicate names in {branches}"
    assert set(branches) == set(REGISTRY[where]), f"{where}: {branches} vs tested {sorted(REGISTRY[where])}"


def test_quant4_groups_named_exist():
    """MODE_SERVES and TILING_SERVES name interpreter groups that run (a renamed group would leave a branch
    untested)."""
    for table in (test_quant4_interpret.MODE_SERVES, test_quant4_interpret.TILING_SERVES):
        for groups in table.values():
            assert groups and set(groups) <= set(test_quant4_interpret.GROUPS), groups


def test_backend_choice_rule():
    """choose: Triton for CUDA tensors (a device object: no GPU needed), the reference on the CPU and for float64;
    forcing Triton on a CPU tensor outside the interpreter is a named error, not a silent reference run."""
    from qlora_core import backend
    if backend.has_triton():
        assert backend.choose(torch.device("cuda"), torch.bfloat16) == "triton"
    assert backend.choose(torch.device("cuda"), torch.float64) == "reference"
    assert backend.choose(torch.device("cpu"), torch.float32) == "reference"
    with backend.forced("reference"):
        assert backend.choose(torch.device("cuda"), torch.bfloat16) == "reference"
    if backend.has_triton() and not backend.interpreting():
        with backend.forced("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            backend.choose(torch.device("cpu"), torch.float32)


_BACKEND_SCRIPT = r'''
import json, sys, torch
import qlora_core as qc
from qlora_core import backend
from qlora_core.ops.rmsnorm import rms_norm
from qlora_core.ops.swiglu import swiglu
from tests.helpers import DTYPE_ATOL
from tests.test_branches import BACKEND_SERVES, KERNEL_FILE, adamw32_run, float64_cases

torch.manual_seed(0)
cases = float64_cases()
result = {}
for branch in ("reference", "triton"):  # reference first: its run must not load a kernel module
    for op in BACKEND_SERVES[branch]:
        args, want, own_err, dtype = cases[op]
        with backend.forced(branch):
            got = {"rms_norm": lambda: rms_norm(*args), "swiglu": lambda: swiglu(*args),
                   "nf4_linear": lambda: qc.nf4_linear(*args), "adamw32": lambda: adamw32_run(*args)}[op]()
        kernel_loaded = "qlora_core.kernels." + KERNEL_FILE[op] in sys.modules
        err, bound = (got.double() - want).abs().max().item(), 2 * own_err + DTYPE_ATOL[dtype]
        bad = [] if got.dtype == dtype else [f"dtype {got.dtype}"]
        bad += [] if err <= bound else [f"max error {err:.3e} > {bound:.3e}"]
        bad += [] if kernel_loaded == (branch == "triton") else [f"kernel module loaded: {kernel_loaded}"]
        result[f"{branch}:{op}"] = "; ".join(bad) or "ok"
print("RESULT " + json.dumps(result))
'''


def _adamw_step(p, g, m, v, t, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.1):
    """AdamW's published step (decoupled decay, bias corrections) in p's dtype -> new p."""
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    return p * (1 - lr * wd) - lr / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + eps)


def adamw32_run(p, g, m, v, t):
    """ops/adamw.adamw32_step on copies (it works in place) -> new p."""
    from qlora_core.ops.adamw import adamw32_step, adamw_coeffs
    p, m, v = p.clone(), m.clone(), v.clone()
    adamw32_step(p, g, m, v, adamw_coeffs(t, 1e-2, 0.9, 0.999, 1e-8, 0.1, 32))
    return p


def float64_cases() -> dict:
    """op -> (fp16 args, float64 result, PyTorch's own fp16 error against it, dtype). fp16: the interpreter's
    bf16 tl.dot is wrong, and fp16 rounding makes a dropped step visible."""
    import qlora_core as qc
    from qlora_core.ops.quant4 import dequantize_as
    h = torch.float16
    x, w = torch.randn(5, 48, dtype=h), torch.rand(48, dtype=h) + 0.5
    rms64 = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    rms_own = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    g, u = torch.randn(5, 40, dtype=h), torch.randn(5, 40, dtype=h)
    sw64 = g.double() * torch.sigmoid(g.double()) * u.double()
    q = qc.quantize(torch.randn(24, 128), blocksize=64)
    xl = torch.randn(3, 128, dtype=h)
    lin64 = xl.double() @ dequantize_as(q, torch.float32).double().T
    # AdamW at step 3 from nonzero moments (at step 1 the update is ~lr * sign(g), blind to the moments), fp32
    pa, ga, ma, va = torch.randn(300), torch.randn(300) * 0.1, torch.randn(300) * 0.01, torch.rand(300) * 1e-3
    own = {"rms_norm": (rms_own.to(h) * w), "swiglu": torch.nn.functional.silu(g) * u,
           "nf4_linear": torch.nn.functional.linear(xl, dequantize_as(q, h)), "adamw32": _adamw_step(pa, ga, ma, va, 3)}
    want = {"rms_norm": rms64, "swiglu": sw64, "nf4_linear": lin64,
            "adamw32": _adamw_step(*(a.double() for a in (pa, ga, ma, va)), 3)}
    args = {"rms_norm": (x, w, 1e-6), "swiglu": (g, u), "nf4_linear": (xl, q), "adamw32": (pa, ga, ma, va, 3)}
    dtype = {"adamw32": torch.float32}
    return {op: (args[op], want[op], (own[op].double() - want[op]).abs().max().item(), dtype.get(op, h))
            for op in want}


@pytest.fixture(scope="module")
def backend_results():
    from tests.helpers import run_interpreted
    return json.loads(run_interpreted(_BACKEND_SCRIPT).split("RESULT ", 1)[1])


@pytest.mark.parametrize("key", [f"{b}:{op}" for b, ops in BACKEND_SERVES.items() for op in ops])
def test_forced_backend_matches_float64(backend_results, key):
    assert backend_results[key] == "ok", f"{key}: {backend_results[key]}"


def test_float64_cases_are_distinct():
    """The shared cases are not degenerate (a zero reference would let any zero output pass)."""
    torch.manual_seed(0)
    for op, (_, want, own_err, _) in float64_cases().items():
        assert want.abs().max().item() > 1.0 and math.isfinite(own_err) and own_err > 0, op
