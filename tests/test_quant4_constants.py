"""The 4-bit and 8-bit format constants as literal fp32 bit patterns, checked against qlora_core/formats.py and
against sources that do not go through it.

Why literals: the reference quantizer, the Triton kernels and the bitsandbytes comparisons all read formats.py,
so a wrong constant there would move all of them together (tests/test_bnb_compat.py would only see its excused
set change). The values here are the measured truth:
  * NF4 / FP4 tables: bitsandbytes' get_4bit_type, the quant_map of its checkpoints (test_bnb_compat.py compares
    them with bnb directly). FP4 code 8 is stored as +0.0 but dequantizes to -0.0 on CUDA (0 * absmax * -1).
  * NF4 thresholds: bitsandbytes CUDA's dQuantizeNF4 decimal literals rounded by nvcc to fp32, measured against
    bitsandbytes CUDA on an H100 (docs/format.md; tests/test_gpu_quant4.py re-measures them on every GPU run).
    11 equal the fp32 midpoints of adjacent levels; indices 0, 8, 12 and 14 are one ulp off them.
    ../shared/docs/bnb-format.md §1 lists the midpoints at those four (bf591cd8, 3df64862, 3f006d04, 3f5c89da):
    that is bnb's CPU rule, not CUDA's.
  * FP4 thresholds: dQuantizeFP4's literals on |xn|, not midpoints; buckets map to magnitude codes
    000, 001, 110, 111, 100, 101, 010, 011; the sign bit is xn < 0 (so -0.0 gets code 0, a tiny negative code 8).
  * bitsandbytes' own source restates both CUDA trees' literals (backends/triton/kernels_4bit.py, 0.50.2, the
    pinned test extra): each decimal rounded to the nearest fp32 must give the bit patterns here.
"""
import hashlib
import importlib.util
import re
import struct
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from qlora_core import formats
from qlora_core.ops import quant4

NF4_TABLE_BITS = (
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
)
FP4_TABLE_BITS = (  # bit-pattern order, / 12; index 8 is the stored +0.0
    0x00000000, 0x3baaaaab, 0x3f2aaaab, 0x3f800000, 0x3eaaaaab, 0x3f000000, 0x3e2aaaab, 0x3e800000,
    0x00000000, 0xbbaaaaab, 0xbf2aaaab, 0xbf800000, 0xbeaaaaab, 0xbf000000, 0xbe2aaaab, 0xbe800000,
)
FP4_DEQUANT_CODE8_BITS = 0x80000000  # -0.0
NF4_THRESHOLD_BITS = (
    0xbf591cd9, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871, 0x3d22faff,
    0x3df64863, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d03, 0x3f248daf, 0x3f5c89d9,
)
NF4_OFF_MIDPOINT = {0: -1, 8: +1, 12: -1, 14: -1}  # index: (CUDA threshold - fp32 midpoint) in ulps
FP4_THRESHOLD_BITS = (0x3b2aaab9, 0x3db00000, 0x3e555555, 0x3e955555, 0x3ed55556, 0x3f155550, 0x3f555555)
FP4_BUCKET_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
# 8-bit dynamic maps (nested absmax, optimizer states): sha256 of the 256 little-endian fp32 values, and anchors
DYNAMIC_SHA256 = {True: "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c",
                  False: "305f002cc11278fb769d13b25b9fd0c7c83c8402c40a878fe086f4039fde6398"}
DYNAMIC_ANCHORS = {True: {0: 0xbf7e3333, 1: 0xbf7a999a, 126: 0xb513a3b7, 127: 0x00000000, 128: 0x3513a3b7,
                          254: 0x3f7e3333, 255: 0x3f800000},
                   False: {0: 0x00000000, 1: 0x34ae7baa, 254: 0x3f7f199a, 255: 0x3f800000}}


def bits(t: torch.Tensor) -> tuple[int, ...]:
    """fp32 tensor -> its values' bit patterns as unsigned ints."""
    return tuple(v & 0xFFFFFFFF for v in t.float().contiguous().view(torch.int32).tolist())


def f32(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b))[0]


def nearest_f32_bits(decimal: str) -> int:
    """The fp32 nearest to the exact decimal value (ties to even), as nvcc rounds a float literal: exact rational
    arithmetic, no double rounding through a Python float."""
    x = Fraction(decimal)
    b = struct.unpack("<I", struct.pack("<f", float(decimal)))[0]
    cands = [c for c in (b - 1, b, b + 1) if 0 <= c < 1 << 32]
    return min(cands, key=lambda c: (abs(Fraction(f32(c)) - x), c & 1))


def test_tables_bits():
    assert bits(formats.code_table("nf4")) == NF4_TABLE_BITS
    assert bits(torch.tensor(formats.NF4_TABLE, dtype=torch.float32)) == NF4_TABLE_BITS
    assert bits(formats.code_table("fp4")) == FP4_TABLE_BITS
    deq = bits(formats.dequant_table("fp4"))
    assert deq[8] == FP4_DEQUANT_CODE8_BITS and deq[:8] + deq[9:] == FP4_TABLE_BITS[:8] + FP4_TABLE_BITS[9:]
    assert bits(formats.dequant_table("nf4")) == NF4_TABLE_BITS
    assert formats.NF4_PAD_NIBBLE == 0x7 and formats.FP4_PAD_NIBBLE == 0x0  # NF4 zero, FP4 +0


def test_nf4_thresholds_bits_and_their_distance_from_midpoints():
    assert bits(formats.nf4_thresholds()) == NF4_THRESHOLD_BITS
    assert tuple(formats.NF4_THRESHOLD_BITS) == NF4_THRESHOLD_BITS
    lut = torch.tensor([f32(b) for b in NF4_TABLE_BITS], dtype=torch.float32)
    mids = bits((lut[:-1] + lut[1:]) / 2)  # fp32 midpoints, bnb-CPU's rule
    for i, (t, m) in enumerate(zip(NF4_THRESHOLD_BITS, mids)):
        off = (f32(t) > f32(m)) - (f32(t) < f32(m))
        assert off == NF4_OFF_MIDPOINT.get(i, 0), f"threshold {i}: {t:#010x} vs midpoint {m:#010x}"
        if off:  # one ulp: adjacent bit patterns of the same sign
            assert abs(t - m) == 1, f"threshold {i}: {t:#010x} vs midpoint {m:#010x}"


def test_fp4_thresholds_bits():
    t, codes = formats.fp4_thresholds()
    assert bits(t) == FP4_THRESHOLD_BITS
    assert tuple(codes.tolist()) == FP4_BUCKET_CODES and codes.dtype == torch.uint8


def test_thresholds_are_bitsandbytes_source_literals():
    """bitsandbytes' Triton backend restates the CUDA trees' literals (its comment: 'similar CUDA kernel ... to
    avoid loading code from csrc/kernels.cu::dQuantizeNF4'); read them from the installed package's source."""
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None:
        pytest.skip("test extra: bitsandbytes==0.50.2 (its source holds the CUDA literals)")
    src = (Path(spec.origin).parent / "backends" / "triton" / "kernels_4bit.py").read_text()
    nf4_body = src[src.index("def quantize_nf4_blockwise_kernel"):]
    nf4_body = nf4_body[:nf4_body.index("\ndef ", 1)]
    fp4_body = src[src.index("def quantize_fp4_blockwise_kernel"):]
    fp4_body = fp4_body[:fp4_body.index("\ndef ", 1)]
    nf4 = sorted(re.findall(r"A_normalized > (-?\d+\.\d+)", nf4_body), key=float)
    fp4 = sorted(re.findall(r"A_absf > (\d+\.\d+)", fp4_body), key=float)
    assert len(nf4) == 15 and len(fp4) == 7, (nf4, fp4)
    assert tuple(nearest_f32_bits(s) for s in nf4) == NF4_THRESHOLD_BITS
    assert tuple(nearest_f32_bits(s) for s in fp4) == FP4_THRESHOLD_BITS


def test_reference_codes_on_and_beside_the_literal_thresholds():
    """quant4.encode_4bit, driven by the literals: a value on a threshold takes the lower code (strict `>`),
    one ulp above takes the next; FP4's sign bit is `xn < 0`, so -0.0 -> 0 and a tiny negative -> 8; NaN -> 0."""
    t = torch.tensor([f32(b) for b in NF4_THRESHOLD_BITS], dtype=torch.float32)
    up = torch.nextafter(t, torch.full_like(t, 2.0))
    assert quant4.encode_4bit(t, "nf4").tolist() == list(range(15))
    assert quant4.encode_4bit(up, "nf4").tolist() == list(range(1, 16))
    t = torch.tensor([f32(b) for b in FP4_THRESHOLD_BITS], dtype=torch.float32)
    up = torch.nextafter(t, torch.full_like(t, 2.0))
    assert quant4.encode_4bit(t, "fp4").tolist() == list(FP4_BUCKET_CODES[:7])
    assert quant4.encode_4bit(up, "fp4").tolist() == list(FP4_BUCKET_CODES[1:])
    assert quant4.encode_4bit(-t, "fp4").tolist() == [8 | c for c in FP4_BUCKET_CODES[:7]]
    special = torch.tensor([0.0, -0.0, -1e-3, 1e-3, float("nan")])
    assert quant4.encode_4bit(special, "fp4").tolist() == [0, 0, 8, 0, 0]
    assert quant4.encode_4bit(special, "nf4").tolist() == [7, 7, 7, 7, 0]
    codes = torch.tensor([0x08], dtype=torch.uint8)  # codes 0 and 8 in one byte
    out = quant4.dequantize_4bit_ref(codes, torch.ones(1), (2,), torch.float32, 64, "fp4")
    assert bits(out) == (0x00000000, FP4_DEQUANT_CODE8_BITS)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_bits(signed):
    m = formats.dynamic_map(signed)
    assert m.shape == (256,) and m.dtype == torch.float32
    assert hashlib.sha256(m.numpy().astype("<f4").tobytes()).hexdigest() == DYNAMIC_SHA256[signed]
    assert formats.DYNAMIC_MAP_SHA256[signed] == DYNAMIC_SHA256[signed]
    b = bits(m)
    assert {i: b[i] for i in DYNAMIC_ANCHORS[signed]} == DYNAMIC_ANCHORS[signed]
