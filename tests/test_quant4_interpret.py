"""kernels/quant4.py under the Triton CPU interpreter, bit for bit against the ops/quant4.py reference.

Each group runs in a fresh subprocess (tests/_interp_quant4.py) because TRITON_INTERPRET=1 only takes
effect if it is set before triton is first imported, and other test modules may import triton earlier.
Cases: shapes (1,), (2,), (3,5), (7,129), (130,64), (33,65); fp32/fp16/bf16; nf4/fp4; blocksizes
32/64/256/4096; double quant on/off; whole zero blocks, exact +-0, exact NF4/FP4 thresholds +-1 ulp,
fp32 subnormals, exact 8-bit midpoint ties. Packed bytes, absmax, nested codes, offset and dequantized
outputs must be identical bytes. Group "bnbmode" runs mode="bnb" (the GPU default: bitsandbytes CUDA's
fast-math semantics) against an independent torch emulation of those semantics (with an IEEE reciprocal,
the one part the interpreter cannot run; the GPU tests cover rcp.approx against bitsandbytes itself). Group
"gputiles" quantizes with the tiles a GPU runs (kernels/common.forced_tiling("gpu")).
"""
import json
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_interp_quant4.py")
ROOT = os.path.dirname(os.path.dirname(WORKER))

# group -> minimum number of cases it must have run (guards against a worker that silently checks nothing)
GROUPS = {"quant4": 288, "dequant": 288, "blockwise": 63, "pipeline": 54, "errors": 9, "bnbmode": 108, "gputiles": 18}
# kernels/quant4.MODE_BRANCHES -> the groups that run it on the CPU: "reference" is the CPU default, "bnb" (the GPU
# default) is forced with mode="bnb" (tests/test_branches.py checks this covers every mode)
MODE_SERVES = {"reference": ("quant4", "dequant", "blockwise", "pipeline"), "bnb": ("bnbmode",)}
# kernels/common.TILING_BRANCHES -> the groups that run quantize with those tiles
TILING_SERVES = {"interpreter": ("quant4", "blockwise"), "gpu": ("gputiles",)}


def _run(group: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("QLORA_CORE_BACKEND", None)
    proc = subprocess.run([sys.executable, WORKER, group], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, f"worker {group} crashed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("group", list(GROUPS))
def test_interpreter_bit_exact(group):
    res = _run(group)
    assert res["cases"] >= GROUPS[group], res
    assert res["nfail"] == 0, f"{res['nfail']}/{res['cases']} cases differ from the reference: {res['failures']}"
    facts = res["facts"]
    if group == "quant4":
        # the inputs really contained zero blocks, odd tails and exact-threshold blocks
        assert facts["zero_blocks"] > 100 and facts["odd_tails"] > 0 and facts["threshold_blocks"] > 0, facts
    if group == "blockwise":
        # exact midpoint ties whose CUDA answer (even pivot) differs from "ties to the lower index"
        assert facts["ties_not_lower"] > 50, facts
    if group == "bnbmode":
        # mode="bnb" really differs from the reference on these inputs (thresholds, subnormals, FP4 -0)
        assert facts["bnb_differs_from_reference"] > 10, facts
        assert facts["neg_zero_outputs"] > 100, facts  # -0.0 outputs (zero blocks, FP4 code 8) were checked
