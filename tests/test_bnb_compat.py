"""Byte-for-byte comparison with bitsandbytes 0.50.2 on the CPU.

Reference semantics are bitsandbytes' CUDA kernels (what wrote nearly every bnb-4bit checkpoint). bnb's own CPU
backend departs from them in three documented places, so on the CPU we compare byte for byte everywhere
*except* on the set D where bnb-CPU's rule and the CUDA rule differ, and we pin D down exactly:
  * all-zero blocks: CUDA computes 0 * (1/0) = NaN -> code 0; bnb-CPU clamps absmax and gets code 7 (NF4) / 0 (FP4);
  * the tail block: bnb-CPU divides by absmax where CUDA multiplies by one reciprocal (1-ulp near-ties);
  * a tail block of zeros: bnb-CPU stores absmax 1e-38 (its clamp), CUDA stores 0;
  * NF4: 4 of CUDA's 15 thresholds are one ulp off the fp32 midpoints bnb-CPU uses;
  * FP4 code 8 dequantizes to -0.0 on CUDA and +0.0 on the CPU;
  * FP4: bnb-CPU buckets by midpoints of the sorted table (with an arbitrary sign for zero) where CUDA uses its
    literal thresholds on |x| and the sign bit.
`bnb_cpu_codes` below re-derives bnb-CPU's rule; the tests first check that bnb really follows it (so D is
known, not guessed) and then that we equal bnb off D and the CUDA rule on D. On the device,
tests/test_gpu_quant4.py compares against bnb's CUDA kernels with D empty.
"""
import json

import pytest
import torch

bnbF = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test extra")
from bitsandbytes.functional import QuantState  # noqa: E402

import qlora_core as qc  # noqa: E402
from qlora_core.ops import quant4  # noqa: E402
from qlora_core.formats import code_table, dynamic_map, fp4_thresholds  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (2,), (3, 5), (65,), (7, 129), (129, 65), (64, 64), (300, 257), (4097,)]
BLOCKSIZES = [32, 64, 128, 256, 1024, 4096]


@pytest.fixture(autouse=True)
def _no_dynamo():
    # bnb's CPU dequantize is wrapped in torch.compile; compiling per shape costs minutes and tests nothing of ours.
    import torch._dynamo
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old


def make_input(shape, dtype, blocksize, gen):
    """randn with extras that break quantizers: an all-zero block, exact zeros, a repeated max, a tiny block."""
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    flat = x.view(-1)
    n = flat.numel()
    if n > blocksize:
        flat[:blocksize] = 0.0  # all-zero block
        flat[blocksize + 1::7] = 0.0  # exact zeros inside non-zero blocks
    if n > 3 * blocksize:
        flat[2 * blocksize:3 * blocksize] *= 1e-3  # a block of small values
    return x.to(dtype)


def bnb_cpu_codes(x, blocksize, quant_type):
    """bnb-CPU's 4-bit rule (backends/default/ops.py), re-derived: clamp, divide in the tail, sorted midpoints."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    am = quant4.blockwise_absmax(x, blocksize)
    scaled = flat.clone()
    if full:
        scaled[:full] = (flat[:full].view(-1, blocksize) * (1.0 / am[: full // blocksize].clamp(min=1e-38))[:, None]).view(-1)
    if full < n:
        scaled[full:] = flat[full:] / am[-1].clamp(min=1e-38)
    scaled = scaled.clamp(-1, 1)
    code = code_table(quant_type)
    order = torch.argsort(code)
    mids = (code[order[:-1]] + code[order[1:]]) / 2
    idx = torch.bucketize(scaled, mids)
    return (idx if quant_type == "nf4" else order[idx]).to(torch.uint8)


def bnb_dequantize(packed, state, shape):
    """bnb's dequantize_4bit, except where bnb 0.50.2's CPU (AVX) kernel is wrong.

    That kernel mis-indexes absmax when a block straddles rows (blocksize > last dim, blocksize < 2048, even
    last dim): e.g. (64, 64) at blocksize 256 gives 3394 of 4096 wrong values against code*absmax. There we
    use bnb's own pure-PyTorch dequantizer (backends/default), which is what its CPU op falls back to elsewhere.
    """
    last = shape[-1] if len(shape) > 1 else shape[0]
    if last % 2 == 0 and state.blocksize > last and state.blocksize < 2048:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        absmax = state.absmax
        if state.nested:
            absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return _dequantize_4bit_compute(packed.reshape(-1), absmax, state.code, state.blocksize, shape, state.dtype)
    out = bnbF.dequantize_4bit(packed, state)
    return out.reshape(shape)  # bnb's legacy shim transposes when the packed tensor has one row (n <= 2)


def cuda_rule_codes(x, blocksize, quant_type):
    xn, _, _ = quant4._normalize(x, blocksize)
    return quant4.encode_4bit(xn, quant_type)


def fp4_rules_disagree(xn):
    """True where |xn| lies where bnb-CPU's FP4 rule may legitimately differ from CUDA's: between a CUDA
    threshold (formats.FP4_THRESHOLDS, pinned in tests/test_quant_constants.py) and the midpoint of the sorted
    table that bnb-CPU bucketizes on, 2 ulps either side (tail blocks divide instead of multiplying)."""
    t = fp4_thresholds()[0]
    mag = code_table("fp4").abs().unique().sort().values  # the 8 magnitudes, ascending
    mids = (mag[:-1] + mag[1:]) / 2
    lo, hi = torch.minimum(t, mids), torch.maximum(t, mids)
    for _ in range(2):
        lo, hi = torch.nextafter(lo, torch.zeros_like(lo)), torch.nextafter(hi, torch.ones_like(hi))
    a = xn.abs()[:, None]
    return ((a >= lo) & (a <= hi)).any(dim=1)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_matches_bnb(dtype, quant_type, double_quant):
    """Codes equal bnb-CPU's off D and the CUDA rule on D, where D is bounded element by element: NF4's D is exactly
    the all-zero blocks (CUDA: NaN -> code 0, bnb-CPU: clamp -> code 7); FP4's D holds no zero-block element and
    only (a) elements both rules put in the zero bucket (codes 0 / 8: they disagree on the sign of a zero) and (b)
    elements between a CUDA threshold and bnb-CPU's midpoint, at most 0.1% of all (measured: 0.057% in bf16,
    whose values land on the dyadic thresholds; 0.007% fp16; 0 fp32). A threshold moved in formats.py would
    send elements away from both into D and fail here; tests/test_quant_constants.py pins the exact values."""
    gen = torch.Generator().manual_seed(1234)
    between_total = total = 0
    for shape in SHAPES:
        for bs in BLOCKSIZES:
            x = make_input(shape, dtype, bs, gen)
            n = x.numel()
            where = f"{dtype} {quant_type} dq={double_quant} shape={shape} bs={bs}"
            q = qc.quantize(x, quant_type, bs, double_quant)
            bp, st = bnbF.quantize_4bit(x, blocksize=bs, quant_type=quant_type, compress_statistics=double_quant)
            assert q.data.shape == bp.shape and q.data.dtype == bp.dtype, where

            ours = quant4.unpack_nibbles(q.data, n)
            theirs = quant4.unpack_nibbles(bp, n)
            cpu_rule = bnb_cpu_codes(x, bs, quant_type)
            cuda_rule = cuda_rule_codes(x, bs, quant_type)
            assert torch.equal(theirs, cpu_rule), f"bnb-CPU no longer follows the rule we derived: {where}"
            d = cpu_rule != cuda_rule
            assert torch.equal(ours[~d], theirs[~d]), f"codes differ off D: {where}"
            assert torch.equal(ours[d], cuda_rule[d]), where
            if n % 2:  # the pad nibble, which unpack drops
                assert (q.data.view(-1)[-1] & 0xF) == (bp.view(-1)[-1] & 0xF) or bool(d[-1]), where
            zero_block = (quant4.blockwise_absmax(x, bs) == 0).repeat_interleave(bs)[:n]
            if quant_type == "nf4":
                excused = int((d ^ zero_block).sum())
                assert torch.equal(d, zero_block), f"{excused} codes excused off zero blocks: {where}"
            else:
                xn = quant4._normalize(x, bs)[0].reshape(-1)[:n]
                zero_bucket = ((cuda_rule & 7) == 0) & ((cpu_rule & 7) == 0)
                between = fp4_rules_disagree(xn)
                unexplained = d & ~zero_bucket & ~between
                assert not (d & zero_block).any() and not unexplained.any(), (
                    f"{int(unexplained.sum())} codes excused away from every threshold, e.g. xn="
                    f"{xn[unexplained][:4].tolist()}: {where}")
                between_total += int((d & ~zero_bucket).sum())
            total += n

            am_ours = quant4.blockwise_absmax(x, bs)
            am_theirs = st.absmax if not double_quant else None
            if not double_quant:
                zero_tail = n % bs != 0 and float(am_ours[-1]) == 0.0
                if zero_tail:
                    assert am_theirs[-1] == torch.tensor(1e-38, dtype=torch.float32) and float(q.absmax[-1]) == 0.0, where
                    am_theirs = torch.cat([am_theirs[:-1], am_ours[-1:]])
                assert torch.equal(q.absmax, am_theirs), where
            else:
                assert torch.equal(q.offset, st.offset), where
                assert torch.equal(q.nested_absmax, st.state2.absmax), where
                # bnb-CPU's 8-bit search (BinSearch) is not CUDA's; off ties both are nearest, so where the
                # codes differ ours must be at least as close to the value as bnb's.
                xn = quant4._normalize(am_ours - q.offset, 256)[0]
                code = dynamic_map(True)
                ours8, theirs8 = q.absmax, st.absmax
                diff = ours8 != theirs8
                err_ours = (code[ours8.long()] - xn).abs()
                err_theirs = (code[theirs8.long()] - xn).abs()
                assert bool((err_ours[diff] <= err_theirs[diff]).all()), f"nested code farther than bnb's: {where}"
                assert int(diff.sum()) <= max(1, ours8.numel() // 50), f"{int(diff.sum())} nested codes differ: {where}"
    assert between_total <= total // 1000, f"{between_total} of {total} FP4 codes excused near thresholds"


def assert_signs_match(ours, theirs, packed, quant_type, where):
    """-0.0 vs +0.0 agree too, except FP4 code 8: -0.0 on CUDA (and ours), +0.0 on bnb-CPU."""
    fp4_neg_zero = (quant4.unpack_nibbles(packed, ours.numel()) == 8).view(ours.shape) & (quant_type == "fp4")
    assert torch.equal(torch.signbit(ours)[~fp4_neg_zero], torch.signbit(theirs)[~fp4_neg_zero]), where
    assert bool(torch.signbit(ours[fp4_neg_zero]).all()) and bool((theirs[fp4_neg_zero] == 0).all()), where


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_matches_bnb_bitwise(dtype, quant_type, double_quant):
    """Same state in, same bits out: our dequantize of bnb's state and bnb's dequantize of ours."""
    gen = torch.Generator().manual_seed(99)
    for shape in SHAPES:
        for bs in (32, 64, 256, 4096):
            x = make_input(shape, dtype, bs, gen)
            where = f"{dtype} {quant_type} dq={double_quant} shape={shape} bs={bs}"
            # bnb's state -> ours
            bp, st = bnbF.quantize_4bit(x, blocksize=bs, quant_type=quant_type, compress_statistics=double_quant)
            sd = {"weight": bp, **{f"weight.{k}": v for k, v in st.as_dict(packed=True).items()}}
            ours = qc.dequantize(qc.QuantizedTensor.from_state_dict(sd))
            theirs = bnb_dequantize(bp, st, x.shape)
            assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape == x.shape, where
            assert torch.equal(ours, theirs), where
            assert_signs_match(ours, theirs, bp, quant_type, where)
            # our state -> bnb
            q = qc.quantize(x, quant_type, bs, double_quant)
            qsd = q.state_dict()
            st2 = QuantState.from_dict({k[len("weight."):]: v for k, v in qsd.items() if k != "weight"},
                                       device=torch.device("cpu"))
            theirs2 = bnb_dequantize(qsd["weight"], st2, x.shape)
            ours2 = qc.dequantize(q)
            assert torch.equal(ours2, theirs2), where
            assert_signs_match(ours2, theirs2, qsd["weight"], quant_type, where)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_state_dict_matches_linear4bit(dtype, quant_type, double_quant):
    """Keys, order, dtypes, shapes and the JSON blob of bnb.nn.Linear4bit's state dict, on identical codes."""
    import bitsandbytes as bnb
    torch.manual_seed(3)
    out_f, in_f = 33, 70
    w = (torch.randn(out_f, in_f) * 0.02).to(dtype)
    m = bnb.nn.Linear4bit(in_f, out_f, bias=False, quant_type=quant_type, compress_statistics=double_quant,
                          compute_dtype=dtype)
    m.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=double_quant, blocksize=64)
    m = m.to("cpu")
    theirs = m.state_dict(prefix="model.layers.0.mlp.up_proj.")
    ours = qc.quantize(w, quant_type, 64, double_quant).state_dict("model.layers.0.mlp.up_proj.")
    assert list(ours) == list(theirs)
    blob_key = f"model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__{quant_type}"
    assert json.loads(bytes(ours[blob_key].tolist())) == json.loads(bytes(theirs[blob_key].tolist()))
    assert bytes(ours[blob_key].tolist()) == bytes(theirs[blob_key].tolist())
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
    # weights of 0.02 scale, no zero blocks, even n: every tensor equal too, except FP4 codes on the set D
    # (module docstring) and nested codes that bnb-CPU's search rounds the other way (tested above).
    prefix = "model.layers.0.mlp.up_proj."
    for k in theirs:
        if k == prefix + "weight" and quant_type == "fp4":
            d = bnb_cpu_codes(w, 64, "fp4") != cuda_rule_codes(w, 64, "fp4")
            o, t = (quant4.unpack_nibbles(sd[k], w.numel()) for sd in (ours, theirs))
            assert torch.equal(o[~d], t[~d])
        elif k != prefix + "weight.absmax" or not double_quant:
            assert torch.equal(ours[k], theirs[k]), k
    q = qc.QuantizedTensor.from_state_dict(theirs, "model.layers.0.mlp.up_proj.")
    assert torch.equal(qc.dequantize(q), bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state))


def test_dynamic_maps_equal_bnb():
    assert torch.equal(dynamic_map(True), bnbF.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(False), bnbF.create_dynamic_map(signed=False))
    assert torch.equal(code_table("nf4"), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code_table("fp4"), bnbF.get_4bit_type("fp4", device="cpu"))
