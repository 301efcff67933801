"""kernels/quant4.py on a CUDA GPU, byte for byte against bitsandbytes' CUDA kernels and the reference.

Run on the device: `pytest -m gpu tests/test_gpu_quant4.py`. Deselected on CPU boxes (conftest.py).
  * against bitsandbytes 0.50.2 CUDA: packed bytes, absmax, nested 8-bit codes, nested absmax, offset and
    dequantized outputs must be identical (large shapes, zero blocks, exact zeros, subnormals);
  * against the reference of qlora_core/ops/quant4.py: mode="reference" matches it exactly; the default
    mode="bnb" may differ only in codes of elements whose normalized value lies within 2 ulp of a quantization
    threshold (each off by one bucket) and, for dequantized FP4, in the sign of zero.
"""
import pytest
import torch

from qlora_core import backend
from qlora_core.formats import code_table, dequant_table, dynamic_map, fp4_thresholds, nf4_thresholds
from qlora_core.ops import quant4 as ops
from tests.helpers import bnb_cuda

pytestmark = pytest.mark.gpu
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.fixture(scope="module")
def bnbf():
    """bitsandbytes.functional with its CUDA library: a failure, not a skip, when missing (tests/helpers.py)."""
    bnb_cuda()
    import bitsandbytes.functional as functional
    return functional


def _weights(shape, dtype, blocksize, seed=0, subnormals=False):
    """randn * 0.02 (weight scale) with whole zero blocks, exact zeros and, optionally, subnormal values."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, device="cuda", generator=g) * 0.02
    flat = x.view(-1)
    flat[::13] = 0.0
    nb, nfull = -(-flat.numel() // blocksize), flat.numel() // blocksize
    flat[: nfull * blocksize].view(nfull, blocksize)[1::97] = 0.0  # whole zero blocks (absmax 0 -> code 0)
    if subnormals:
        tiny = 1e-39 if dtype != torch.float16 else 1e-7   # subnormal in fp32/bf16, resp. fp16
        flat[5::17] = tiny * torch.randn(flat[5::17].shape, device="cuda", generator=g)
        blk = min(3, nb - 1)
        flat[blk * blocksize:(blk + 1) * blocksize] = tiny  # an all-subnormal block
    return x.to(dtype)


def _dequantize(q, **kw):
    """kernels/quant4.dequantize_4bit with q's tables (as ops/quant4.py passes them)."""
    from qlora_core.kernels import quant4
    return quant4.dequantize_4bit(q, dequant_table(q.quant_type, q.device), dynamic_map(True, q.device), **kw)


def _ndiff(a, b):
    return int((a.view(-1).view(torch.uint8) != b.view(-1).view(torch.uint8)).sum())


CASES = [((14336, 4096), torch.bfloat16, "nf4", 64), ((14336, 4096), torch.bfloat16, "fp4", 64),
         ((4096, 14336), torch.float16, "nf4", 64), ((4096, 4096), torch.float32, "fp4", 64),
         ((4096, 4096), torch.bfloat16, "nf4", 32), ((1001, 333), torch.float16, "fp4", 128),
         ((1001, 333), torch.bfloat16, "nf4", 4096), ((777, 4097), torch.float32, "nf4", 256)]


@pytest.mark.parametrize("shape,dtype,qt,bs", CASES)
def test_quantize_4bit_matches_bnb_cuda(shape, dtype, qt, bs, bnbf):
    from qlora_core.kernels import quant4
    x = _weights(shape, dtype, bs)
    packed, absmax = quant4.quantize_4bit(x, bs, qt, nf4_thresholds("cuda"))
    ref_packed, state = bnbf.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=False)
    assert _ndiff(absmax, state.absmax) == 0
    assert packed.shape == ref_packed.shape and _ndiff(packed, ref_packed) == 0, \
        f"{_ndiff(packed, ref_packed)} packed bytes differ from bitsandbytes CUDA"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_subnormal_inputs_match_bnb_cuda(dtype, qt, bnbf):
    """CUDA is built with -ftz: subnormal inputs count as zero; the kernels emulate that on the GPU."""
    from qlora_core.kernels import quant4
    x = _weights((513, 1024), dtype, 64, seed=3, subnormals=True)
    packed, absmax = quant4.quantize_4bit(x, 64, qt, nf4_thresholds("cuda"))
    ref_packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type=qt, compress_statistics=False)
    assert _ndiff(absmax, state.absmax) == 0 and _ndiff(packed, ref_packed) == 0


@pytest.mark.parametrize("shape,dtype,qt,bs", CASES[:4] + CASES[6:])
def test_double_quant_and_dequant_match_bnb_cuda(shape, dtype, qt, bs, bnbf):
    x = _weights(shape, dtype, bs, seed=1)
    q = ops.quantize(x, qt, bs, double_quant=True)
    ref_packed, state = bnbf.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=True)
    assert _ndiff(q.data, ref_packed) == 0
    assert _ndiff(q.offset, state.offset) == 0
    assert _ndiff(q.absmax, state.absmax) == 0, "nested 8-bit absmax codes differ"
    assert _ndiff(q.nested_absmax, state.state2.absmax) == 0
    y = ops.dequantize(q)
    y_bnb = bnbf.dequantize_4bit(ref_packed, state)
    assert y.dtype == y_bnb.dtype and y.shape == y_bnb.shape and _ndiff(y, y_bnb) == 0
    q1 = ops.quantize(x, qt, bs, double_quant=False)
    y1_bnb = bnbf.dequantize_4bit(*bnbf.quantize_4bit(x, blocksize=bs, quant_type=qt))
    assert _ndiff(ops.dequantize(q1), y1_bnb) == 0


def test_nested_quantize_blockwise_matches_bnb_cuda(bnbf):
    from qlora_core.kernels import quant4
    x = _weights((14336, 4096), torch.bfloat16, 64, seed=2)
    _, absmax = quant4.quantize_4bit(x, 64, "nf4", nf4_thresholds("cuda"))
    a = absmax - absmax.mean()
    code = dynamic_map(True, "cuda")
    for bs in (256, 64, 4096):
        q, am = quant4.quantize_blockwise(a, code, bs)
        q_bnb, st = bnbf.quantize_blockwise(a, code=code, blocksize=bs)
        assert _ndiff(am, st.absmax) == 0 and _ndiff(q, q_bnb) == 0, f"bs {bs}: {_ndiff(q, q_bnb)} codes differ"


@pytest.mark.parametrize("shape,dtype,qt,bs", CASES)
def test_reference_mode_matches_reference_exactly(shape, dtype, qt, bs):
    """mode="reference" (IEEE 1/absmax, no FTZ) is the reference, bit for bit."""
    from qlora_core.kernels import quant4
    x = _weights(shape, dtype, bs, seed=4)
    packed, absmax = quant4.quantize_4bit(x, bs, qt, nf4_thresholds("cuda"), mode="reference")
    ref_packed, ref_absmax = ops.quantize_4bit_ref(x, bs, qt)
    assert _ndiff(absmax, ref_absmax) == 0 and _ndiff(packed, ref_packed) == 0
    a = ref_absmax - ref_absmax.mean()
    q8, am8 = quant4.quantize_blockwise(a, dynamic_map(True, "cuda"), 256, mode="reference")
    q8r, am8r = ops.quantize_blockwise_ref(a, dynamic_map(True, "cuda"), 256)
    assert _ndiff(q8, q8r) == 0 and _ndiff(am8, am8r) == 0


def test_nf4_fp4_thresholds_match_bnb_cuda(bnbf):
    """Blocks with absmax 1 (so xn == x exactly) holding every threshold and its +-1 ulp neighbours: the codes
    bitsandbytes CUDA assigns pin down its thresholds; mode="bnb" and the CPU reference (formats.py) must agree
    on every one, while the fp32 midpoints (4 of which nvcc's literals miss by one ulp) must not."""
    from qlora_core.kernels import quant4
    t = torch.cat([nf4_thresholds("cuda"), fp4_thresholds("cuda")[0], -fp4_thresholds("cuda")[0]])
    vals = torch.cat([t, torch.nextafter(t, torch.full_like(t, 2.0)), torch.nextafter(t, torch.full_like(t, -2.0))])
    x = torch.zeros(vals.numel(), 64, device="cuda")
    x[:, 0], x[:, 1] = 1.0, vals
    for qt in ("nf4", "fp4"):
        p, _ = quant4.quantize_4bit(x, 64, qt, nf4_thresholds("cuda"))
        p_bnb, _ = bnbf.quantize_4bit(x, blocksize=64, quant_type=qt)
        assert _ndiff(p, p_bnb) == 0
        p_ref, _ = ops.quantize_4bit_ref(x, 64, qt)
        assert _ndiff(p_bnb, p_ref) == 0
        if qt == "nf4":
            lut = code_table("nf4", "cuda")
            mid_codes = torch.bucketize(x.reshape(-1), (lut[:-1] + lut[1:]) / 2, right=False).to(torch.uint8)
            p_mid = ops.pack_nibbles(mid_codes, "nf4")
            assert _ndiff(p_bnb, p_mid) > 0, "bitsandbytes CUDA agreed with the midpoint thresholds"


def _near_threshold(xn: torch.Tensor, qt: str, ulps: int) -> torch.Tensor:
    """True where xn is within `ulps` fp32 ulps of a quantization threshold (|xn| for FP4)."""
    if qt == "nf4":
        t, v = nf4_thresholds(xn.device), xn
    else:
        t, v = fp4_thresholds(xn.device)[0], xn.abs()
    ulp = (torch.nextafter(t, torch.full_like(t, 2.0)) - t).abs()
    return ((v[:, None] - t[None, :]).abs() <= ulps * ulp[None, :]).any(dim=1)


@pytest.mark.parametrize("shape,dtype,qt,bs", CASES)
def test_default_mode_vs_reference_differs_only_at_thresholds(shape, dtype, qt, bs):
    """Default GPU mode (rcp.approx + FTZ, = bitsandbytes CUDA) vs the IEEE reference: absmax identical; a
    code may differ only where xn is within 2 ulp of a threshold, and then by one bucket."""
    from qlora_core.kernels import quant4
    x = _weights(shape, dtype, bs, seed=5)
    packed, absmax = quant4.quantize_4bit(x, bs, qt, nf4_thresholds("cuda"))
    ref_packed, ref_absmax = ops.quantize_4bit_ref(x, bs, qt)
    assert _ndiff(absmax, ref_absmax) == 0
    n = x.numel()
    codes, ref_codes = ops.unpack_nibbles(packed, n), ops.unpack_nibbles(ref_packed, n)
    bad = (codes != ref_codes).nonzero().squeeze(1)
    # bf16 inputs land exactly on FP4's dyadic thresholds (0.0859375 = 11/128) often: up to ~0.05% measured
    assert bad.numel() <= max(64, n // 2000), f"{bad.numel()} codes differ from the reference"
    if bad.numel():
        xf = x.reshape(-1).float()[bad]
        xn = xf * (1.0 / ref_absmax[bad // bs])
        assert bool(_near_threshold(xn, qt, 2).all()), "a code differs away from every threshold"
        # one bucket apart: NF4 codes adjacent; FP4 same sign, magnitude buckets adjacent
        if qt == "nf4":
            assert bool(((codes[bad].int() - ref_codes[bad].int()).abs() == 1).all())
        else:
            bucket = torch.tensor([0, 1, 6, 7, 4, 5, 2, 3], device="cuda")  # magnitude code -> bucket
            c, r = codes[bad].long(), ref_codes[bad].long()
            assert bool(((c & 8) == (r & 8)).all()) and bool(((bucket[c & 7] - bucket[r & 7]).abs() == 1).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_dequantize_matches_reference_exactly(dtype, double_quant, qt):
    """Dequant is mul + round (and mul, then add, for the nested absmax): no FMA, so mode="reference" is exact,
    and so is the default "bnb" mode (the reference also gives FP4 code 8 CUDA's -0.0; no reciprocal here)."""
    x = _weights((4097, 1023), dtype, 64, seed=6)
    with backend.forced("reference"):
        q = ops.quantize(x, qt, 64, double_quant)
    y_ref = ops.dequantize_4bit_ref(q.data, q.absmax_fp32(), q.shape, q.dtype, 64, qt)
    assert _ndiff(_dequantize(q, mode="reference"), y_ref) == 0
    for bb, join in ((4096, False), (16384, True)):
        assert _ndiff(_dequantize(q, mode="reference", block_bytes=bb, join=join, num_warps=8), y_ref) == 0
    y = _dequantize(q)
    codes = ops.unpack_nibbles(q.data, q.numel).view(q.shape)
    as_int = torch.int32 if dtype == torch.float32 else torch.int16
    differ = y.view(as_int) != y_ref.view(as_int)
    assert not bool(differ.any()), f"{int(differ.sum())} outputs differ in bits"
    if qt == "fp4":  # the -0.0 of code 8 is really there (bits, not just values)
        assert bool(torch.signbit(y[codes == 8]).all())
