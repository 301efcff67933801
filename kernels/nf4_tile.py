"""Transitional: kernels/rmsnorm.py, rope.py, swiglu.py and fused_linear_ce.py still import cast_rne from here.
Delete this file once they import it from kernels/common.py (the NF4 tile helpers are in kernels/nf4_decode.py)."""
from .common import cast_rne  # noqa: F401
