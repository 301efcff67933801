"""Triton kernels for bitsandbytes' 4-bit blockwise format: quantize (NF4/FP4), the nested 8-bit absmax
quantizer, and dequantize (with the nested absmax restored in-kernel).

The spec is qlora_core/reference.py (`*_ref` below); every kernel reproduces it byte for byte:
  * quantize: one program owns ROWS whole blocks of the flattened tensor (blocks may straddle rows of the
    original shape; the tail block is masked). absmax = max|x| in fp32, r = 1/absmax once per block,
    xn = x*r, NF4 code = number of thresholds strictly below xn, FP4 = literal thresholds on |xn| plus a
    sign bit; NaN (all-zero block) -> code 0; element 2j -> high nibble; pad nibble 7 (nf4) / 0 (fp4).
  * 8-bit: the same normalisation, then CUDA's 7-step binary search over the sorted 256-entry map.
  * dequantize: programs walk the packed bytes as rows of 16 (one 16-byte load per thread, 32 outputs);
    16 bytes never straddle an absmax block (blocksize >= 32), so each row needs one absmax, restored as
    code256[q] * absmax2 and then + offset in two fp32 ops. Fusion into an FMA is switched off at launch
    (enable_fp_fusion=False): an FMA rounds once and changes the last ulp of ~1/4 of the absmax values.
    Output = dtype(lut[nibble] * absmax), one fp32 multiply and a round-to-nearest cast.

The reciprocal. CUDA bitsandbytes is built with --use_fast_math, so its `1.0f/absmax` is
rcp.approx.ftz.f32 (~1 ulp); the reference uses IEEE 1/absmax. The kernels take RCP: 0 = IEEE (div_rn),
1 = Triton's `/` (div.full.f32), 2 = inline-asm rcp.approx.ftz.f32. The interpreter (CPU) always uses 0
and matches the reference exactly; on a GPU the default is the one measured byte-identical to bitsandbytes
CUDA (docs/benchmarks.md records the mismatch counts of each choice). Only elements whose xn lies within
~1 ulp of a threshold can differ between the two; tests/test_gpu_quant4.py checks exactly that.
Limits: n < 2**31 (int32 offsets, as in bitsandbytes); blocksize a power of two in [32, 4096].
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qlora_core import backend
from qlora_core.formats import code_table, dynamic_map
from qlora_core.reference import (  # noqa: F401  (the spec these kernels obey; tests import it from here too)
    dequantize_4bit_ref,
    quantize_4bit_ref,
    quantize_blockwise_ref,
)

# RCP modes (see header). GPU default: measured on H100 against bitsandbytes 0.50.2 CUDA (docs/benchmarks.md).
RCP_IEEE, RCP_DIV, RCP_APPROX = 0, 1, 2
RCP_NAMES = {"ieee": RCP_IEEE, "div": RCP_DIV, "approx": RCP_APPROX}
GPU_RCP = RCP_NAMES[os.environ.get("QLORA_CORE_RCP", "approx")]
GPU_FTZ = os.environ.get("QLORA_CORE_FTZ", "1") == "1"
# Quantize tile on a GPU: elements per program (whole blocks) and warps; chosen in benchmarks/bench_quant.py.
QUANT_ELEMS, QUANT_WARPS = 4096, 8


@triton.jit
def _reciprocal(a, RCP: tl.constexpr):
    if RCP == 2:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [a], dtype=tl.float32,
                                         is_pure=True, pack=1)
    elif RCP == 1:
        return 1.0 / a
    else:
        return tl.math.div_rn(tl.full(a.shape, 1.0, tl.float32), a)


@triton.jit
def _flush(v, FTZ: tl.constexpr):
    # Emulates CUDA's -ftz=true (part of --use_fast_math): subnormal fp32 operands/results become zero
    # (keeping the sign: v * 0.0). Only subnormal inputs or results below 2**-126 are affected.
    if FTZ:
        return tl.where(tl.abs(v) < 1.1754943508222875e-38, v * 0.0, v)
    else:
        return v


@triton.jit
def _nf4_code(xn):
    # Count of the 15 fp32 NF4 midpoints strictly below xn (NaN compares false everywhere -> 0). The literals
    # are the exact fp32 values of formats.nf4_thresholds(), so their conversion to fp32 is exact.
    c = (xn > -0.8480963706970215).to(tl.int32)
    c += (xn > -0.6106328964233398).to(tl.int32)
    c += (xn > -0.4599952697753906).to(tl.int32)
    c += (xn > -0.33967941999435425).to(tl.int32)
    c += (xn > -0.23460739850997925).to(tl.int32)
    c += (xn > -0.13791173696517944).to(tl.int32)
    c += (xn > -0.045525018125772476).to(tl.int32)
    c += (xn > 0.03979014977812767).to(tl.int32)
    c += (xn > 0.120255246758461).to(tl.int32)
    c += (xn > 0.2035212516784668).to(tl.int32)
    c += (xn > 0.2920137643814087).to(tl.int32)
    c += (xn > 0.3893125355243683).to(tl.int32)
    c += (xn > 0.5016634464263916).to(tl.int32)
    c += (xn > 0.6427869200706482).to(tl.int32)
    c += (xn > 0.8614784479141235).to(tl.int32)
    return c


@triton.jit
def _fp4_code(xn):
    # Bucket b = count of CUDA's literal thresholds below |xn| (exact fp32 values of formats.fp4_thresholds);
    # buckets 0..7 carry magnitude codes 000,001,110,111,100,101,010,011 = b ^ ((b & 2) << 1).
    a = tl.abs(xn)
    b = (a > 0.0026041700039058924).to(tl.int32)
    b += (a > 0.0859375).to(tl.int32)
    b += (a > 0.2083333283662796).to(tl.int32)
    b += (a > 0.2916666567325592).to(tl.int32)
    b += (a > 0.4166666865348816).to(tl.int32)
    b += (a > 0.5833330154418945).to(tl.int32)
    b += (a > 0.8333333134651184).to(tl.int32)
    code = b ^ ((b & 2) << 1)
    return code | tl.where(xn < 0, 8, 0)


@triton.jit
def _quantize_4bit_kernel(x_ptr, packed_ptr, absmax_ptr, n, nbytes, nblocks,
                          BS: tl.constexpr, ROWS: tl.constexpr, NF4: tl.constexpr, RCP: tl.constexpr,
                          FTZ: tl.constexpr):
    # One program = ROWS consecutive blocks of BS elements: x tile (ROWS, BS) -> bytes (ROWS, BS // 2).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < nblocks
    rem = n - rows * BS  # valid elements left from each block's start (>= 1 for valid rows, no int32 overflow)
    cols = tl.arange(0, BS)
    mask = row_ok[:, None] & (cols[None, :] < rem[:, None])
    x = _flush(tl.load(x_ptr + rows[:, None] * BS + cols[None, :], mask=mask, other=0.0).to(tl.float32), FTZ)
    absmax = tl.max(tl.abs(x), axis=1)
    tl.store(absmax_ptr + rows, absmax, mask=row_ok)
    xn = _flush(x * _reciprocal(absmax, RCP)[:, None], FTZ)  # zero block: 0 * inf = NaN -> code 0
    if NF4:
        code = tl.where(mask, _nf4_code(xn), 7)
    else:
        code = tl.where(mask, _fp4_code(xn), 0)
    hi, lo = tl.split(tl.reshape(code, [ROWS, BS // 2, 2]))
    byte = ((hi << 4) | lo).to(tl.uint8)
    bcols = tl.arange(0, BS // 2)
    brem = nbytes - rows * (BS // 2)  # bytes left (pad nibble included); divisible by 16 keeps stores wide
    bmask = row_ok[:, None] & (bcols[None, :] < brem[:, None])
    tl.store(packed_ptr + rows[:, None] * (BS // 2) + bcols[None, :], byte, mask=bmask)


@triton.jit
def _quantize_8bit_kernel(x_ptr, code_ptr, q_ptr, absmax_ptr, n, nblocks,
                          BS: tl.constexpr, ROWS: tl.constexpr, RCP: tl.constexpr, FTZ: tl.constexpr):
    # Same blocking as the 4-bit kernel; codes follow CUDA's dQuantize<0> (see reference.encode_8bit).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < nblocks
    rem = n - rows * BS
    cols = tl.arange(0, BS)
    mask = row_ok[:, None] & (cols[None, :] < rem[:, None])
    offs = rows[:, None] * BS + cols[None, :]
    x = _flush(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), FTZ)
    absmax = tl.max(tl.abs(x), axis=1)
    tl.store(absmax_ptr + rows, absmax, mask=row_ok)
    xn = _flush(x * _reciprocal(absmax, RCP)[:, None], FTZ)
    pivot = tl.full([ROWS, BS], 127, tl.int32)
    lower_pivot = tl.zeros([ROWS, BS], tl.int32)
    upper_pivot = tl.full([ROWS, BS], 255, tl.int32)
    val = tl.load(code_ptr + pivot)
    for i in tl.static_range(7):
        step = 64 >> i
        right = xn > val
        lower_pivot = tl.where(right, pivot, lower_pivot)
        upper_pivot = tl.where(right, upper_pivot, pivot)
        pivot = tl.where(right, pivot + step, pivot - step)
        val = tl.load(code_ptr + pivot)
    lower = tl.load(code_ptr + lower_pivot)
    upper = tl.load(code_ptr + upper_pivot)
    above = xn > val
    go_up = above & (xn > (upper + val) * 0.5)
    go_down = (xn <= val) & (xn < (lower + val) * 0.5)  # NaN: both false -> the final pivot, 0
    q = tl.where(go_up, upper_pivot, tl.where(go_down, lower_pivot, pivot))
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=mask)


@triton.jit
def _cast_out(v, dtype: tl.constexpr, MANUAL_RNE: tl.constexpr):
    # fp32 -> dtype, round to nearest even. Triton 3.7's interpreter truncates fp32 -> bf16 (and its rounding
    # flag rounds half up without carrying), so there we round by hand on the bits; GPUs use cvt.rn.
    if MANUAL_RNE:
        u = v.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _dequantize_4bit_kernel(packed_ptr, absmax_ptr, code256_ptr, absmax2_ptr, offset_ptr, lut_ptr, out_ptr,
                            n, nbytes, LOG2_BS: tl.constexpr, DOUBLE: tl.constexpr, BPR: tl.constexpr,
                            BLOCK_BYTES: tl.constexpr, JOIN: tl.constexpr, MANUAL_RNE: tl.constexpr,
                            FTZ: tl.constexpr):
    # Tile (ROWS, BPR) packed bytes -> (ROWS, 2*BPR) outputs, BPR = bytes per row = 16 output bytes
    # (4 for bf16/fp16, 2 for fp32). A row lies inside one absmax block (blocksize >= 32 = 16 bytes), so
    # its scale is loaded once. With JOIN the (ROWS, BPR, 2) join reshapes to the store layout in
    # registers, each thread storing 16 contiguous bytes; measured against strided even/odd stores.
    ROWS: tl.constexpr = BLOCK_BYTES // BPR
    seg = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BPR)
    boffs = seg[:, None] * BPR + cols[None, :]
    b = tl.load(packed_ptr + boffs, mask=boffs < nbytes, other=0)
    seg_ok = seg < tl.cdiv(nbytes, BPR)
    blk = (seg * (2 * BPR)) >> LOG2_BS
    if DOUBLE:
        qa = tl.load(absmax_ptr + blk, mask=seg_ok, other=0)
        a2 = _flush(tl.load(absmax2_ptr + (blk >> 8), mask=seg_ok, other=0.0), FTZ)
        scale = _flush(tl.load(code256_ptr + qa.to(tl.int32)) * a2, FTZ)
        scale = scale + tl.load(offset_ptr)  # separate add (torch's `absmax += offset`): fusion is off at launch
    else:
        scale = tl.load(absmax_ptr + blk, mask=seg_ok, other=0.0)
    scale = _flush(scale, FTZ)[:, None]
    hi = _flush(tl.load(lut_ptr + (b >> 4).to(tl.int32)) * scale, FTZ)
    lo = _flush(tl.load(lut_ptr + (b & 15).to(tl.int32)) * scale, FTZ)
    hi = _cast_out(hi, out_ptr.dtype.element_ty, MANUAL_RNE)
    lo = _cast_out(lo, out_ptr.dtype.element_ty, MANUAL_RNE)
    if JOIN:
        out = tl.reshape(tl.join(hi, lo), [ROWS, 2 * BPR])
        ooffs = seg[:, None] * (2 * BPR) + tl.arange(0, 2 * BPR)[None, :]
        tl.store(out_ptr + ooffs, out, mask=ooffs < n)
    else:
        tl.store(out_ptr + 2 * boffs, hi, mask=2 * boffs < n)
        tl.store(out_ptr + 2 * boffs + 1, lo, mask=2 * boffs + 1 < n)


# ---------------------------------------------------------------------------------------------------------
# Launchers: validate, allocate, pick the tile, launch. Dequantize is autotuned on a GPU over a few tile
# sizes (keyed on n, blocksize and double quant); in the interpreter a small fixed tile is used, since
# autotuning there would time every config in Python. `rcp` / `ftz` override the GPU arithmetic mode
# (benchmarks/bench_quant.py measures each against bitsandbytes); on the CPU they are always IEEE / off.

_tuned: dict = {}


def _dequant_tuned():
    if "dq" not in _tuned:
        configs = [triton.Config({"BLOCK_BYTES": bb, "JOIN": True}, num_warps=w)
                   for bb, w in ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16))]
        _tuned["dq"] = triton.autotune(configs, key=["n", "LOG2_BS", "DOUBLE"])(_dequantize_4bit_kernel)
    return _tuned["dq"]


def _mode(device: torch.device, rcp: str | None, ftz: bool | None) -> tuple[int, bool]:
    if device.type != "cuda":
        return RCP_IEEE, False  # no inline asm in the interpreter; numpy is IEEE without FTZ, as the reference
    return (GPU_RCP if rcp is None else RCP_NAMES[rcp]), (GPU_FTZ if ftz is None else bool(ftz))


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not backend.interpreting():
        raise RuntimeError(f"Triton kernels need a CUDA tensor or TRITON_INTERPRET=1 (got a {t.device.type} tensor)")


def _check_input(x: torch.Tensor, blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"expected float32/float16/bfloat16 input, got {x.dtype}")
    if x.numel() == 0 or x.numel() >= 2**31:
        raise ValueError(f"need 0 < numel < 2**31 (int32 offsets), got {x.numel()}")
    if not x.is_contiguous():
        raise ValueError("input must be contiguous")
    _check_device(x)


def quantize_4bit(w: torch.Tensor, blocksize: int, quant_type: str, *, rcp: str | None = None,
                  ftz: bool | None = None, elems: int | None = None, num_warps: int | None = None):
    """Triton twin of quantize_4bit_ref: w (contiguous, any shape, fp32/fp16/bf16) ->
    (packed uint8 ((n+1)//2, 1), absmax fp32 (ceil(n/blocksize),)).

    rcp ("ieee" | "div" | "approx") and ftz override the GPU arithmetic; elems (elements per program,
    rounded to whole blocks) and num_warps override the tile.
    """
    _check_input(w, blocksize)
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"unknown quant_type {quant_type!r}; expected 'nf4' or 'fp4'")
    n = w.numel()
    nblocks = triton.cdiv(n, blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty((nblocks,), dtype=torch.float32, device=w.device)
    on_gpu = w.device.type == "cuda"
    rows = max(1, (elems or (QUANT_ELEMS if on_gpu else 512)) // blocksize)
    rcp_mode, flush = _mode(w.device, rcp, ftz)
    _quantize_4bit_kernel[(triton.cdiv(nblocks, rows),)](
        w.reshape(-1), packed, absmax, n, (n + 1) // 2, nblocks, BS=blocksize, ROWS=rows, NF4=quant_type == "nf4",
        RCP=rcp_mode, FTZ=flush, num_warps=num_warps or (QUANT_WARPS if on_gpu else 4))
    return packed, absmax


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int, *, rcp: str | None = None,
                       ftz: bool | None = None):
    """Triton twin of quantize_blockwise_ref (8-bit, CUDA tie rule) for the nested absmax:
    x fp32 1-D, code fp32 (256,) sorted -> (uint8 codes x.shape, absmax fp32 (ceil(n/blocksize),))."""
    if x.dim() != 1 or x.dtype != torch.float32:
        raise ValueError(f"quantize_blockwise expects a 1-D float32 tensor, got {x.dtype} {tuple(x.shape)}")
    if code.shape != (256,) or code.dtype != torch.float32:
        raise ValueError(f"code must be a float32 (256,) map, got {code.dtype} {tuple(code.shape)}")
    x = x.contiguous()
    _check_input(x, blocksize)
    n = x.numel()
    nblocks = triton.cdiv(n, blocksize)
    q = torch.empty_like(x, dtype=torch.uint8)
    absmax = torch.empty((nblocks,), dtype=torch.float32, device=x.device)
    rows = max(1, (2048 if x.device.type == "cuda" else 512) // blocksize)
    rcp_mode, flush = _mode(x.device, rcp, ftz)
    _quantize_8bit_kernel[(triton.cdiv(nblocks, rows),)](
        x, code.to(x.device).contiguous(), q, absmax, n, nblocks, BS=blocksize, ROWS=rows, RCP=rcp_mode,
        FTZ=flush, num_warps=4)
    return q, absmax


def dequantize_4bit(q, *, ftz: bool | None = None, block_bytes: int | None = None, join: bool = True,
                    num_warps: int | None = None, fp_fusion: bool = False) -> torch.Tensor:
    """Triton twin of dequantize_4bit_ref for a QuantizedTensor -> Tensor(q.shape, q.dtype).

    Reads the packed codes and, with double quant, the uint8 absmax, nested_absmax and offset directly.
    block_bytes / join / num_warps: a fixed tile instead of autotuning (benchmarks, interpreter).
    """
    data = q.data.reshape(-1)
    n = q.numel
    if data.dtype != torch.uint8 or data.numel() != (n + 1) // 2:
        raise ValueError(f"packed data must be uint8 with (n+1)//2 = {(n + 1) // 2} bytes, "
                         f"got {data.dtype} with {data.numel()}")
    if q.blocksize < 32 or q.blocksize & (q.blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 32, got {q.blocksize}")
    _check_device(data)
    dev = data.device
    out = torch.empty(q.shape, dtype=q.dtype, device=dev)
    lut = code_table(q.quant_type, dev)
    if q.double_quant:
        if q.absmax.dtype != torch.uint8:
            raise ValueError(f"double-quantized absmax must be uint8, got {q.absmax.dtype}")
        absmax, code256 = q.absmax, dynamic_map(True, dev)
        absmax2, offset = q.nested_absmax, q.offset.reshape(1).to(torch.float32)
    else:
        absmax = q.absmax.to(torch.float32)
        code256 = absmax2 = offset = absmax  # unused by the kernel when DOUBLE is off
    nbytes = data.numel()
    args = (data, absmax, code256, absmax2, offset, lut, out.reshape(-1), n, nbytes)
    meta = dict(LOG2_BS=q.blocksize.bit_length() - 1, DOUBLE=bool(q.double_quant), BPR=8 // out.element_size(), FTZ=_mode(dev, None, ftz)[1],
                MANUAL_RNE=dev.type != "cuda" and q.dtype == torch.bfloat16, enable_fp_fusion=fp_fusion)
    if dev.type == "cuda" and block_bytes is None:
        _dequant_tuned()[lambda m: (triton.cdiv(nbytes, m["BLOCK_BYTES"]),)](*args, **meta)
    else:
        block_bytes = block_bytes or 256
        _dequantize_4bit_kernel[(triton.cdiv(nbytes, block_bytes),)](
            *args, BLOCK_BYTES=block_bytes, JOIN=join, num_warps=num_warps or 4, **meta)
    return out
