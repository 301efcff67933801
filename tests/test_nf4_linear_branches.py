"""kernels/nf4_linear.py's dispatch branches (FWD_BRANCHES, DX_BRANCHES), each forced with `path=` on the CPU under
TRITON_INTERPRET=1 (one subprocess for all cases: triton reads the variable at its first import), with each of
kernels/common.TILING_BRANCHES: the interpreter's small tiles and, under `forced_tiling("gpu")`, the tiles a GPU
runs (with QLORA_CORE_AUTOTUNE=0 the tiled dx takes its table's first row, as the GPU tests do; split-K runs there).

On the CPU the Triton backend is only ever forced, and the kernel a GPU would pick depends on M, the dtype and the
layout, so each branch is forced here over the cases it serves (FWD_SERVES, DX_SERVES), whatever fwd_branch would
pick; tests/test_branches.py fails when a branch has no entry. Also checked: the default pick (CHOICES) and that a
decode kernel forced on an input it cannot serve refuses it.
Reference: y64 = x64 @ W64.T + b64, dx64 = dy64 @ W64, W64 the exact quantized weight (the fp32 product lut[code] *
absmax of the CPU spec, as float64). Tolerance (STYLE.md): 2x PyTorch's own same-dtype F.linear / matmul on
dequantize(q) against that reference, + DTYPE_ATOL. fp32/fp16 only: the interpreter's tl.dot on bf16 is wrong.
"""
import json

import pytest

# weight name -> (N, K, blocksize, quant_type, double_quant): register-decodable (K % blocksize == 0) and not
WEIGHTS = {"aligned": (24, 128, 64, "nf4", True), "odd": (19, 65, 64, "fp4", False),
           "long": (40, 640, 64, "nf4", True)}  # long: whole K steps of the GPU tiles (8 absmax blocks), split-K
# branch -> the (weight, x dtype, M) cases it serves
FWD_SERVES = {
    "gemv1": [("aligned", "float16", 1), ("long", "float16", 1)],
    "gemv_mma": [("aligned", "float16", 1), ("aligned", "float16", 5), ("long", "float16", 3)],
    "gemv_generic": [("aligned", "float32", 1), ("aligned", "float16", 3), ("odd", "float16", 2),
                     ("long", "float16", 1)],
    "cublas": [("aligned", "float32", 5), ("odd", "float16", 17)],
}
DX_SERVES = {
    "tiled": [("aligned", "float32", 3), ("odd", "float16", 2), ("aligned", "float16", 17), ("long", "float16", 2)],
    "cublas": [("aligned", "float16", 3), ("odd", "float32", 20)],
}
# kernels/common.TILING_BRANCHES -> the branch tables run under it (all of them, under each)
TILING_SERVES = {"interpreter": ("fwd", "dx"), "gpu": ("fwd", "dx")}
# (direction, weight, dtype, M) -> the branch the dispatch picks by itself
CHOICES = {("fwd", "aligned", "float16", 1): "gemv1", ("fwd", "aligned", "float16", 5): "gemv_mma",
           ("fwd", "odd", "float16", 2): "gemv_generic", ("fwd", "aligned", "float32", 1): "cublas",
           ("fwd", "aligned", "float16", 17): "cublas", ("dx", "aligned", "float16", 3): "tiled",
           ("dx", "aligned", "float32", 3): "cublas", ("dx", "aligned", "float16", 17): "cublas",
           ("dx", "odd", "float16", 2): "tiled"}

_SCRIPT = r'''
import json, os, sys, torch
import qlora_core as qc
from qlora_core.kernels import nf4_linear
from qlora_core.kernels.common import forced_tiling
from qlora_core.ops.nf4_linear import kernel_tables
from qlora_core.ops.quant4 import dequantize_as
from tests.helpers import DTYPE_ATOL, assert_close_verbose
from tests.test_nf4_linear_branches import WEIGHTS, FWD_SERVES, DX_SERVES, CHOICES, TILING_SERVES
os.environ["QLORA_CORE_AUTOTUNE"] = "0"  # GPU tiles of the tiled dx: its table's first row, not a CPU autotune

torch.manual_seed(0)
qs = {name: qc.quantize(torch.randn(n, k), blocksize=bs, quant_type=qt, double_quant=dq)
      for name, (n, k, bs, qt, dq) in WEIGHTS.items()}
w64 = {name: dequantize_as(q, torch.float32).double() for name, q in qs.items()}
result = {}


def check(key, out, want, own):
    bound = 2.0 * (own.double() - want).abs().max().item() + DTYPE_ATOL[out.dtype]
    assert_close_verbose(out, want, atol=bound, rtol=0, name=key)


def case(direction, branch, wname, dname, m):
    q, dtype = qs[wname], getattr(torch, dname)
    w = dequantize_as(q, dtype)  # what a PyTorch user would multiply by
    if direction == "fwd":
        x, b = torch.randn(m, q.shape[1], dtype=dtype), torch.randn(q.shape[0], dtype=dtype)
        out = nf4_linear.linear_forward(x, q, kernel_tables(q), b, path=branch)
        check(branch, out, x.double() @ w64[wname].T + b.double(), torch.nn.functional.linear(x, w, b))
    else:
        dy = torch.randn(m, q.shape[0], dtype=dtype)
        out = nf4_linear.linear_input_grad(dy, q, kernel_tables(q), path=branch)
        check(branch, out, dy.double() @ w64[wname], dy @ w)


for tiling, directions in TILING_SERVES.items():
    for direction, serves in (("fwd", FWD_SERVES), ("dx", DX_SERVES)):
        for branch, cases in serves.items() if direction in directions else ():
            key = f"{direction}:{branch}@{tiling}"
            try:
                with forced_tiling(tiling):
                    for c in cases:
                        case(direction, branch, *c)
                result[key] = "ok"
            except Exception as e:  # reported per branch by the test
                result[key] = f"{type(e).__name__}: {e}"[:1500]
for (direction, wname, dname, m), want in CHOICES.items():
    q = qs[wname]
    x = torch.randn(m, q.shape[1] if direction == "fwd" else q.shape[0], dtype=getattr(torch, dname))
    got = nf4_linear.fwd_branch(x, q) if direction == "fwd" else nf4_linear.dx_branch(x, q)
    result[f"choice:{direction}/{wname}/{dname}/M={m}"] = "ok" if got == want else f"picked {got}, expected {want}"
for branch, wname, m in (("gemv1", "aligned", 2), ("gemv_mma", "odd", 2)):  # refuse what they cannot serve
    q = qs[wname]
    try:
        nf4_linear.linear_forward(torch.randn(m, q.shape[1], dtype=torch.float16), q, kernel_tables(q), None,
                                  path=branch)
        result[f"refuse:{branch}"] = "accepted an input it cannot serve"
    except ValueError as e:
        result[f"refuse:{branch}"] = "ok" if f"{branch} needs" in str(e) else str(e)
print("RESULT " + json.dumps(result))
'''


@pytest.fixture(scope="module")
def results():
    from tests.helpers import run_interpreted
    out = run_interpreted(_SCRIPT)
    return json.loads(out.split("RESULT ", 1)[1])


@pytest.mark.parametrize("key", [f"{d}:{b}@{tiling}" for tiling, ds in TILING_SERVES.items() for d in ds
                                 for b in {"fwd": FWD_SERVES, "dx": DX_SERVES}[d]])
def test_forced_branch_matches_float64(results, key):
    assert results[key] == "ok", f"{key}: {results[key]}"


def test_dispatch_picks_and_refusals(results):
    others = {k: v for k, v in results.items() if k.startswith(("choice:", "refuse:"))}
    assert len(others) == len(CHOICES) + 2, sorted(others)
    bad = {k: v for k, v in others.items() if v != "ok"}
    assert not bad, bad
