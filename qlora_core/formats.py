"""Code tables of the bitsandbytes 4-bit and 8-bit formats.

Everything here is data: the NF4 and FP4 lookup tables, the thresholds the CUDA quantizer compares against,
and the 256-entry signed / unsigned dynamic maps used for the nested (double-quant) absmax and for 8-bit
optimizer states. The values are the ones bitsandbytes stores in checkpoints (`weight.quant_map`,
`weight.nested_quant_map`, `qmap1`/`qmap2`), see docs/format.md. Tables are built once per (device) and
cached, because every quantize call needs them and they are tiny.
"""
from __future__ import annotations

import functools
import hashlib

import torch

QUANT_TYPES = ("nf4", "fp4")

# NF4: 16 quantiles of N(0, 1) normalised to [-1, 1], ascending, code 7 is exact zero.
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 (e2m1, bias 2) in *bit-pattern* order, divided by 12 so that the largest magnitude is 1.0.
# Bit 3 is the sign. bitsandbytes stores -0.0 as +0.0 in the table (index 8).
FP4_TABLE = tuple(v / 12.0 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3))

# FP4 quantizer thresholds on |xn| (CUDA literals, not exact midpoints) and the 3-bit magnitude code of
# each bucket in ascending order: |xn| <= t0 -> 000, t0 < |xn| <= t1 -> 001, ...
FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_BUCKET_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)

# NF4 decision thresholds of bitsandbytes' CUDA quantizer (dQuantizeNF4), as fp32 bit patterns. They are its
# decimal literals rounded by nvcc straight to fp32; 11 equal the fp32 midpoints (lut[i]+lut[i+1])/2, but
# indices 0, 8, 12 and 14 sit one ulp from them (measured against bitsandbytes CUDA on an H100:
# docs/benchmarks.md). A value exactly on a threshold takes the lower code (strict `>` tests).
NF4_THRESHOLD_BITS = (
    0xbf591cd9, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871, 0x3d22faff,
    0x3df64863, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d03, 0x3f248daf, 0x3f5c89d9,
)

NF4_PAD_NIBBLE = 0x7  # an odd-length tensor's last low nibble: NF4 zero
FP4_PAD_NIBBLE = 0x0  # FP4 +0

# sha256 of the 256 x fp32 little-endian bytes of bitsandbytes' dynamic maps (bnb-format.md §3).
DYNAMIC_MAP_SHA256 = {
    True: "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c",
    False: "305f002cc11278fb769d13b25b9fd0c7c83c8402c40a878fe086f4039fde6398",
}


def _device_key(device) -> str:
    return str(torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=None)
def _table(name: str, device: str) -> torch.Tensor:
    if name == "nf4":
        return torch.tensor(NF4_TABLE, dtype=torch.float32, device=device)
    if name == "fp4":
        return torch.tensor(FP4_TABLE, dtype=torch.float32, device=device)
    if name == "nf4_thresholds":
        return torch.tensor(NF4_THRESHOLD_BITS, dtype=torch.int64).to(torch.int32).view(torch.float32).to(device)
    if name == "fp4_dequant":
        # CUDA's dDequantizeFP4Tree returns 0 * absmax * -1 for code 8: -0.0, where the stored table has +0.0
        t = _table("fp4", "cpu").clone()
        t[8] = -0.0
        return t.to(device)
    if name == "fp4_thresholds":
        return torch.tensor(FP4_THRESHOLDS, dtype=torch.float32, device=device)
    if name == "fp4_bucket_codes":
        return torch.tensor(FP4_BUCKET_CODES, dtype=torch.uint8, device=device)
    if name in ("dynamic_signed", "dynamic_unsigned"):
        return _build_dynamic_map(name == "dynamic_signed").to(device)
    raise KeyError(name)


def code_table(quant_type: str, device=None) -> torch.Tensor:
    """The 16-entry fp32 lookup table of a 4-bit quant type ("nf4" or "fp4"), as stored in `quant_map`.

    Returns a shared, cached tensor of shape (16,), dtype float32: do not modify it in place.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {QUANT_TYPES}")
    return _table(quant_type, _device_key(device))


def nf4_thresholds(device=None) -> torch.Tensor:
    """The 15 ascending fp32 NF4 decision thresholds of bitsandbytes CUDA: code = number strictly below xn."""
    return _table("nf4_thresholds", _device_key(device))


def dequant_table(quant_type: str, device=None) -> torch.Tensor:
    """The 16 fp32 levels dequantization multiplies by: `code_table`, except FP4 code 8 is -0.0 (as on CUDA)."""
    if quant_type == "fp4":
        return _table("fp4_dequant", _device_key(device))
    return code_table(quant_type, device)


def fp4_thresholds(device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 thresholds on |xn| (7 fp32 values) and the magnitude code (uint8, 8 values) of each bucket."""
    key = _device_key(device)
    return _table("fp4_thresholds", key), _table("fp4_bucket_codes", key)


def _build_dynamic_map(signed: bool) -> torch.Tensor:
    # The map is defined by how bitsandbytes computes it (torch.linspace in fp32, fp32 scalar products),
    # not by a closed formula: numpy.linspace or fp64 scalars change 22-26 entries. We rebuild it the
    # same way and verify it against the recorded sha256 so a torch change that alters linspace is caught.
    values: list[float] = []
    for i in range(7):
        k = (2**i if signed else 2 ** (i + 1)) + 1
        edges = torch.linspace(0.1, 1, k, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * mids).tolist()
        if signed:
            values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    table = torch.tensor(sorted(values), dtype=torch.float32)
    digest = hashlib.sha256(table.numpy().astype("<f4").tobytes()).hexdigest()
    if digest != DYNAMIC_MAP_SHA256[signed]:
        raise RuntimeError(
            f"dynamic map (signed={signed}) does not match bitsandbytes' (sha256 {digest}); "
            "torch.linspace may have changed"
        )
    return table


def dynamic_map(signed: bool = True, device=None) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map: shape (256,), float32, ascending.

    signed=True: 127 negatives, 0 at index 127, 1.0 at index 255 (minimum -0.99296874); used for the nested
    absmax of double quantization and for Adam's first moment. signed=False: 0 at index 0; used for the
    second moment. Returns a shared, cached tensor: do not modify it in place.
    """
    return _table("dynamic_signed" if signed else "dynamic_unsigned", _device_key(device))
