"""Property tests of quantize/dequantize (reference path), driven by hypothesis."""
import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import qlora_core as qc
from qlora_core import testing as qt
from qlora_core.ops import quant4
from qlora_core.formats import code_table, dynamic_map

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

cases = st.fixed_dictionaries({
    "shape": st.lists(st.integers(1, 70), min_size=1, max_size=3).map(tuple),
    "dtype": st.sampled_from(DTYPES),
    "quant_type": st.sampled_from(["nf4", "fp4"]),
    "blocksize": st.sampled_from([32, 64, 128, 256, 4096]),
    "double_quant": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
    # log10 of the data scale; kept where fp16 neither overflows nor goes subnormal after dequantization
    "log_scale": st.floats(-1.5, 1.5),
})


def make(case):
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["shape"], generator=g) * 10 ** case["log_scale"]
    return x.to(case["dtype"])


def values(q):
    """Dequantized values with FP4's two zero codes (0 and 8, +0 and -0 in the table) made one."""
    return qc.dequantize(q).float() + 0.0


@settings(max_examples=150, deadline=None)
@given(cases)
def test_round_trip_is_idempotent(case):
    """Codes unchanged on requantization, absmax too (or within the 8-bit map's gap with double quant):
    qlora_core.testing.check_idempotent, the property users run on their own quantizers."""
    qt.check_idempotent(make(case), case["quant_type"], case["blocksize"], case["double_quant"])


@settings(max_examples=150, deadline=None)
@given(qt.cases())
def test_corner_cases_keep_every_property(case):
    """The kit's corner-case weights (zeros, zero blocks, threshold neighbours, subnormals, straddling blocks):
    error bound, idempotence, state dict and agreement with the CUDA-semantics reference."""
    qt.check_all(**case)


@settings(max_examples=100, deadline=None)
@given(cases, st.integers(-4, 4))
def test_power_of_two_scaling_scales_absmax_and_keeps_codes(case, k):
    x = make(case)
    y = x * 2.0**k
    # The property is about exact scaling: in fp16 a small value can become subnormal (or lose bits) at 2**-k,
    # and then y is not x times a power of two any more.
    assume(torch.equal(y / 2.0**k, x))
    q1 = qc.quantize(x, case["quant_type"], case["blocksize"], False)
    q2 = qc.quantize(y, case["quant_type"], case["blocksize"], False)
    assert torch.equal(q2.absmax, q1.absmax * 2.0**k)
    assert torch.equal(q1.data, q2.data)


@settings(max_examples=100, deadline=None)
@given(cases)
def test_dequantized_values_monotone_in_input(case):
    """Within a block (fixed absmax), a larger input never gets a smaller level."""
    x = make(case).reshape(-1)
    bs = case["blocksize"]
    nb = -(-x.numel() // bs)
    # sort inside every block: absmax per block is unchanged, so codes must come out sorted by value
    xs = torch.cat([x[i * bs:(i + 1) * bs].sort().values for i in range(nb)])
    v = values(qc.quantize(xs, case["quant_type"], bs, case["double_quant"]))
    for i in range(nb):
        blk = v[i * bs:(i + 1) * bs]
        assert bool((blk[1:] >= blk[:-1]).all()), f"block {i} not monotone"


@settings(max_examples=100, deadline=None)
@given(cases)
def test_state_dict_round_trip_is_exact(case):
    x = make(case)
    qt.check_state_dict_round_trip(qc.quantize(x, case["quant_type"], case["blocksize"], case["double_quant"]), "p.")


def test_state_dict_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file
    q = qc.quantize(torch.randn(96, 80, dtype=torch.bfloat16), "nf4", 64, True)
    save_file(q.state_dict("model.layers.0.mlp.up_proj."), tmp_path / "m.safetensors")
    q2 = qc.QuantizedTensor.from_state_dict(load_file(tmp_path / "m.safetensors"), "model.layers.0.mlp.up_proj.")
    assert torch.equal(qc.dequantize(q), qc.dequantize(q2)) and torch.equal(q.data, q2.data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0, width=32), min_size=1, max_size=300), st.booleans())
def test_8bit_encode_is_nearest(xs, signed):
    """CUDA's binary search ends at the nearest map entry (ties: either neighbour is nearest)."""
    code = dynamic_map(signed)
    x = torch.tensor(xs, dtype=torch.float32)
    if not signed:
        x = x.abs()
    q = quant4.encode_8bit(x, code)
    err = (code[q.long()] - x).abs()
    best = (code[None, :] - x[:, None]).abs().min(dim=1).values
    assert torch.equal(err, best)


# Mean |err| and mean relative error limits of bitsandbytes' own test_4bit_quant (mu + 7 sigma of its
# RTX 4090 measurement, bnb-format.md §8) for randn(1024, 1024): (err mu, err sigma, rel mu, rel sigma).
BNB_ERROR_TABLE = {
    ("nf4", 32): (.067746, .000069, .189726, .000304), ("fp4", 32): (.088925, .000091, .242443, .000330),
    ("nf4", 64): (.072798, .000074, .203339, .000340), ("fp4", 64): (.096543, .000111, .260125, .000379),
    ("nf4", 128): (.076831, .000091, .215237, .000391), ("fp4", 128): (.102969, .000134, .275817, .000433),
    ("nf4", 256): (.080337, .000102, .226105, .000398), ("fp4", 256): (.108684, .000182, .289831, .000497),
    ("nf4", 512): (.083547, .000143, .236079, .000544), ("fp4", 512): (.114115, .000234, .302881, .000583),
    ("nf4", 1024): (.086610, .000187, .245370, .000600), ("fp4", 1024): (.119333, .000320, .315000, .000757),
    ("nf4", 2048): (.089592, .000251, .254163, .000747), ("fp4", 2048): (.124556, .000455, .326607, .000955),
    ("nf4", 4096): (.092547, .000360, .262473, .000999), ("fp4", 4096): (.129536, .000612, .337169, .001239),
}


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key", sorted(BNB_ERROR_TABLE), ids=lambda k: f"{k[0]}-{k[1]}")
def test_error_within_bnb_bounds(key, dtype, double_quant):
    quant_type, bs = key
    mu, sd, rmu, rsd = BNB_ERROR_TABLE[key]
    a = torch.randn(1024, 1024, dtype=dtype)
    err = (qc.dequantize(qc.quantize(a, quant_type, bs, double_quant)).float() - a.float()).abs()
    rel = err / (a.float().abs() + 1e-8)
    assert err.mean().item() < mu + 7 * sd
    assert rel.mean().item() < rmu + 7 * rsd


def test_bits_per_parameter():
    q = qc.quantize(torch.randn(4096, 4096), "nf4", 64, True)
    assert math.isclose(q.bits_per_parameter(), 4 + 8 / 64 + 32 / (64 * 256) + 32 / 4096**2, rel_tol=1e-9)
    assert math.isclose(qc.quantize(torch.randn(4096, 4096), "nf4", 64, False).bits_per_parameter(), 4.5)


def test_all_zero_block_follows_cuda():
    """A block of zeros: absmax 0, code 0 (-1.0) for every element, dequantizing to -0.0 (bnb CUDA)."""
    x = torch.zeros(128)
    x[64:] = torch.randn(64)
    q = qc.quantize(x, "nf4", 64, False)
    codes = quant4.unpack_nibbles(q.data, 128)
    assert q.absmax[0] == 0 and bool((codes[:64] == 0).all())
    y = qc.dequantize(q)
    assert bool((y[:64] == 0).all()) and bool(torch.signbit(y[:64]).all())
    assert code_table("nf4")[0] == -1.0
