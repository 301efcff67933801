"""Every qlora_core custom op's fake (what torch.compile traces with) against its real output over the dtype grid
the op accepts (tests/_op_grid.py), and nf4_linear with mixed (activation, weight) dtypes compiled by inductor.

A fake that returned the wrong dtype (nf4_linear's weight dtype instead of x's, say) traces a graph whose buffers
do not match what the op writes: inductor then reads bf16 memory as fp32, or crashes. The compile runs in a
subprocess, so a crash fails the test instead of killing the test run. The block ops' real bodies are Triton:
their fakes are checked in a TRITON_INTERPRET=1 subprocess.
"""
import os
import subprocess
import sys

import pytest

from tests import _op_grid as G
from tests.helpers import run_interpreter_group

pytestmark = pytest.mark.usefixtures("one_thread")
IN_PROCESS = sorted(G.op_names() - set(G.BLOCK_OPS))


def test_every_custom_op_has_cases():
    """A new custom op must get its dtype grid in tests/_op_grid.py (the fake check then covers it)."""
    names = G.op_names()
    assert len(names) >= 13 and set(G.BLOCK_OPS) <= names
    assert sorted(names) == sorted(G.BUILDERS), "ops without cases / cases without an op"


@pytest.mark.parametrize("name", IN_PROCESS)
def test_fake_matches_real_over_dtype_grid(name):
    """Shape, dtype and strides of the fake output == the real output, for each supported dtype combination;
    then torch.library.opcheck on the same arguments."""
    cs = G.cases(name)
    assert len(cs) >= 3
    for label, args in cs:
        G.check_fake(name, label, args)


def test_block_op_fakes_match_triton_bodies():
    """rms_norm(+backward), swiglu(+backward), rope, fused_linear_cross_entropy: the same check, their Triton
    bodies under the interpreter."""
    run_interpreter_group(G.__file__, "block")


def test_nf4_linear_mixed_dtypes_compile_with_inductor():
    """nf4_linear then silu and a scale, inductor, all 9 (x dtype, weight dtype) pairs (bf16 activations over a
    weight quantized from fp32 among them), forward and input grad == eager, output in x's dtype."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(G.ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # a cached graph from an earlier run would hide a changed fake
    p = subprocess.run([sys.executable, G.__file__, "compile"], env=env, cwd=G.ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and "compile: 9 checks passed" in p.stdout, p.stdout[-3000:] + p.stderr[-4000:]
