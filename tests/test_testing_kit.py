"""qlora_core.testing, the public property-testing kit: its properties hold for our quantizer on its own strategies,
each property catches a planted fault, the README example runs as written, and `import qlora_core` does not need
hypothesis."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import qlora_core as qc
from qlora_core import testing as qt
from qlora_core.ops import quant4

README = Path(__file__).resolve().parents[1] / "README.md"
ENV = {**os.environ, "PYTHONPATH": str(README.parent)}  # this checkout's qlora_core, not an installed one


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qt.cases())
def test_our_quantizer_has_every_property(case):
    qt.check_all(**case)


def _off_by_one_level(w, quant_type, blocksize, double_quant):
    q = qc.quantize(w, quant_type, blocksize, double_quant)
    codes = quant4.unpack_nibbles(q.data, w.numel())
    q.data.copy_(quant4.pack_nibbles(torch.where(codes < 15, codes + 1, codes), quant_type))
    return q


def _biased(w, quant_type, blocksize, double_quant):  # scales by 1 + 2**-9: codes near a threshold move
    return qc.quantize(w * (1 + 2**-9), quant_type, blocksize, double_quant)


@pytest.mark.parametrize("fault,check", [(_off_by_one_level, "error"), (_biased, "reference")])
def test_properties_catch_a_faulty_quantizer(fault, check):
    """A quantizer one level off breaks the error bound; one that rounds a hair off (values at the thresholds)
    disagrees with the reference: hypothesis finds both."""
    @settings(max_examples=200, deadline=None, database=None, report_multiple_bugs=False)
    @given(qt.cases())
    def run(case):
        q = fault(case["w"], case["quant_type"], case["blocksize"], case["double_quant"])
        if check == "error":
            qt.check_error_bound(case["w"], q)
        else:
            qt.check_matches_reference(case["w"], q)
    with pytest.raises(AssertionError):
        run()


def test_code_gap_is_half_the_nf4_level_gap():
    """NF4's thresholds are the midpoints of its levels, so each code's bound is half its wider neighbour gap."""
    from qlora_core.formats import code_table
    lv = code_table("nf4").double()
    gaps = lv.diff() / 2
    want = torch.maximum(torch.cat([torch.zeros(1), gaps.double()]), torch.cat([gaps.double(), torch.zeros(1)]))
    torch.testing.assert_close(qt.code_gap("nf4"), want, rtol=0, atol=1e-6)


def test_readme_example_runs_as_written(tmp_path):
    text = README.read_text()
    section = text[text.index("## Testing your own quantizer"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "qt.check_all" in code and len(code.strip().splitlines()) <= 14
    (tmp_path / "example.py").write_text(code)
    p = subprocess.run([sys.executable, str(tmp_path / "example.py")], capture_output=True, text=True, timeout=300,
                       cwd=README.parent, env=ENV)
    assert p.returncode == 0, p.stderr


def test_import_qlora_core_needs_no_hypothesis():
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "import qlora_core, qlora_core.cli, qlora_core.export\n"
            "try:\n    import qlora_core.testing\nexcept ImportError:\n    print('needs hypothesis')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=README.parent, env=ENV)
    assert p.returncode == 0 and p.stdout.strip() == "needs hypothesis", p.stderr
