"""Pure-PyTorch reference of the bitsandbytes 4-bit and 8-bit blockwise formats: the spec the kernels obey.

Semantics follow bitsandbytes' CUDA kernels (docs/format.md), which is what produced nearly every
bnb-4bit checkpoint in circulation:
  * blocks run over the flattened, row-major tensor; absmax is the fp32 max |x| of each block;
  * xn = x * (1/absmax) with one fp32 reciprocal per block (a multiply, not a divide);
  * NF4 code = number of CUDA's fp32 thresholds strictly below xn (a tie goes to the lower code; 4 of the 15
    thresholds are one ulp off the midpoints, formats.NF4_THRESHOLD_BITS);
  * FP4 uses the CUDA literal thresholds on |xn| plus a sign bit;
  * an all-zero block has absmax 0, xn = 0*inf = NaN, and NaN takes code 0 (NF4 -1.0, dequantizing to -0.0);
  * dequantization multiplies by the table, except FP4 code 8 gives -0.0 (CUDA's sign handling);
  * element 2j goes in the high nibble of byte j; an odd tail is padded with NF4 zero (7) / FP4 +0 (0).
The 8-bit quantizer emulates the CUDA binary search over the 256-entry map, so exact ties resolve as CUDA
resolves them (to the even index), not as a nearest-neighbour search would.

Two known differences from CUDA, both invisible on ordinary weights: CUDA is built with --use_fast_math,
so its reciprocal is approximate (~1 ulp) and denormal inputs flush to zero. An element within ~1 ulp of a
threshold can therefore take the neighbouring code on CUDA. bitsandbytes' own CPU backend differs more
(it divides in the tail block and gives all-zero blocks code 7); tests/test_bnb_compat.py spells it out.

All functions take and return CPU or CUDA tensors and work in fp32 internally.
"""
from __future__ import annotations

import torch

from .formats import FP4_PAD_NIBBLE, NF4_PAD_NIBBLE, dequant_table, dynamic_map, fp4_thresholds, nf4_thresholds


def _blocked(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """Flatten x to fp32 and zero-pad it to whole blocks: returns ((nblocks, blocksize) fp32, n)."""
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    pad = (-n) % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize), n


def blockwise_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| of each block of the flattened x: shape (ceil(n/blocksize),), float32.

    The zero padding of the tail block cannot raise its max, so the last block's absmax is taken over its
    valid elements only, as in bitsandbytes.
    """
    blocks, _ = _blocked(x, blocksize)
    return blocks.abs().amax(dim=1)


def _normalize(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return (xn (n,) fp32 in [-1, 1] or NaN for all-zero blocks, absmax (nblocks,) fp32, n)."""
    blocks, n = _blocked(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    recip = 1.0 / absmax  # one reciprocal per block, as CUDA does; 1/0 = inf -> xn = NaN for a zero block
    xn = (blocks * recip[:, None]).reshape(-1)[:n]
    return xn, absmax, n


def encode_4bit(xn: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Map normalized values (fp32, any shape) to 4-bit codes (uint8, same shape); NaN -> code 0."""
    if quant_type == "nf4":
        # bucketize(right=False) counts boundaries strictly below xn: exactly the CUDA `xn > t` tree.
        codes = torch.bucketize(xn, nf4_thresholds(xn.device), right=False)
    else:
        thresholds, bucket_codes = fp4_thresholds(xn.device)
        mag = torch.bucketize(xn.abs(), thresholds, right=False)
        codes = bucket_codes[mag].to(torch.int64) | torch.where(xn < 0, 8, 0)
    return torch.where(torch.isnan(xn), 0, codes).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Pack n 4-bit codes (uint8, flattened) into ((n+1)//2, 1) uint8: element 2j in the high nibble."""
    codes = codes.reshape(-1)
    if codes.numel() % 2:
        pad = NF4_PAD_NIBBLE if quant_type == "nf4" else FP4_PAD_NIBBLE
        codes = torch.cat([codes, codes.new_full((1,), pad)])
    pairs = codes.view(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_nibbles: ((n+1)//2, 1) uint8 -> (n,) uint8 codes (padding dropped)."""
    flat = packed.reshape(-1).view(torch.uint8)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]


def quantize_4bit_ref(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """Reference 4-bit blockwise quantization of x (any shape; fp32, fp16 or bf16).

    Returns (packed uint8 ((n+1)//2, 1), absmax fp32 (ceil(n/blocksize),)).
    """
    xn, absmax, _ = _normalize(x, blocksize)
    return pack_nibbles(encode_4bit(xn, quant_type), quant_type), absmax


def dequantize_4bit_ref(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype,
                        blocksize: int = 64, quant_type: str = "nf4") -> torch.Tensor:
    """Reference 4-bit dequantization: out[i] = dtype(lut[code_i] * absmax[i // blocksize]) in one fp32 multiply.

    packed: ((n+1)//2, 1) uint8; absmax: (ceil(n/blocksize),) fp32 (already de-nested). Returns `shape`, `dtype`.
    """
    n = 1
    for s in shape:
        n *= int(s)
    codes = unpack_nibbles(packed, n)
    lut = dequant_table(quant_type, packed.device)
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    return (lut[codes.long()] * scale).to(dtype).reshape(shape)


def encode_8bit(xn: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Map normalized values (fp32, any shape) to indices of a sorted 256-entry map, as CUDA's dQuantize does.

    A 7-step binary search (pivot 127, steps 64..1, `x > code[pivot]` goes right) followed by a midpoint test
    between the final even pivot and its bracketing probes. Exact ties go to that pivot. NaN -> 0.
    """
    code = code.to(device=xn.device, dtype=torch.float32)
    shape = xn.shape
    x = xn.reshape(-1)
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    lower_pivot = torch.zeros_like(pivot)
    upper_pivot = torch.full_like(pivot, 255)
    val = code[pivot]
    step = 64
    while step > 0:
        right = x > val
        lower_pivot = torch.where(right, pivot, lower_pivot)
        upper_pivot = torch.where(right, upper_pivot, pivot)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    lower, upper = code[lower_pivot], code[upper_pivot]
    above = x > val
    go_up = above & (x > (upper + val) * 0.5)
    go_down = ~above & (x < (lower + val) * 0.5)
    out = torch.where(go_up, upper_pivot, torch.where(go_down, lower_pivot, pivot))
    return out.to(torch.uint8).reshape(shape)


def quantize_blockwise_ref(x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 256):
    """Reference 8-bit blockwise quantization (bitsandbytes `quantize_blockwise`, CUDA semantics).

    x: any shape, fp32/fp16/bf16; code: sorted (256,) fp32 map, default the signed dynamic map.
    Returns (codes uint8 of x's shape, absmax fp32 (ceil(n/blocksize),)).
    """
    if code is None:
        code = dynamic_map(True, x.device)
    xn, absmax, _ = _normalize(x, blocksize)
    return encode_8bit(xn, code).reshape(x.shape), absmax


def dequantize_blockwise_ref(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None,
                             blocksize: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference 8-bit blockwise dequantization: dtype(code[q] * absmax[i // blocksize]); q's shape."""
    if code is None:
        code = dynamic_map(True, q.device)
    n = q.numel()
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    return (code.to(q.device)[q.reshape(-1).long()] * scale).to(dtype).reshape(q.shape)


NESTED_BLOCKSIZE = 256


def double_quantize_ref(absmax: torch.Tensor):
    """Nested 8-bit quantization of a 4-bit absmax vector (bitsandbytes compress_statistics=True).

    absmax: (nblocks,) fp32. Returns (qabsmax uint8 (nblocks,), nested_absmax fp32 (ceil(nblocks/256),),
    offset fp32 0-dim) with offset = absmax.mean() and the signed dynamic map.
    """
    offset = absmax.mean()
    q, absmax2 = quantize_blockwise_ref(absmax - offset, dynamic_map(True, absmax.device), NESTED_BLOCKSIZE)
    return q, absmax2, offset


def double_dequantize_ref(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Restore the fp32 absmax: code[q] * absmax2[i >> 8], then + offset as a separate fp32 add (no FMA)."""
    return dequantize_blockwise_ref(qabsmax, nested_absmax, dynamic_map(True, qabsmax.device),
                                    NESTED_BLOCKSIZE) + offset.to(torch.float32)
