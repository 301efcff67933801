"""Triton kernels for bitsandbytes' 4-bit blockwise format: quantize (NF4/FP4), the nested 8-bit absmax
quantizer, and dequantize (with the nested absmax restored in-kernel). The spec is the PyTorch reference of
qlora_core/ops/quant4.py, which also makes the one reference-vs-Triton choice and passes the tables in: the NF4
thresholds, the dequantize levels and the 8-bit dynamic map come from the caller (this folder imports nothing
from qlora_core).

Layout of the work:
  * quantize: one program owns ROWS whole blocks of the flattened tensor (blocks may straddle rows of the
    original shape; the tail block is masked). absmax = max|x| in fp32, r = 1/absmax once per block,
    xn = x*r, then bitsandbytes' decision trees (strict `>`; NF4 4 levels, FP4 3 levels + sign), which
    equal "number of thresholds strictly below xn". NaN (all-zero block) -> code 0. Element 2j -> high
    nibble; the odd tail's pad nibble is 7 (nf4) / 0 (fp4). One pass: read x, write bytes + absmax.
  * 8-bit (nested absmax): the same normalisation, then CUDA's 7-step binary search (ops/quant4.encode_8bit).
  * dequantize: a program walks BLOCK_BYTES packed bytes as rows of BPR bytes, BPR chosen so one row gives
    16 output bytes (4 for bf16/fp16, 2 for fp32): each thread stores 16 contiguous bytes straight from
    registers (tl.join + reshape; strided even/odd stores were 4.5x slower, they go through shared memory).
    A row lies in one absmax block (blocksize >= 32), so its scale is loaded once: code256[q] * absmax2,
    then + offset as two fp32 ops. Contraction into an FMA is switched off at launch
    (enable_fp_fusion=False); with it on (and FTZ off), 2.4M of 58.7M fp32 outputs differed from bitsandbytes.

Two arithmetic modes, both byte-exact against their spec:
  * "reference" = the ops/quant4.py reference: IEEE 1/absmax, no flushing. The CPU interpreter always runs
    this mode (the tests compare it with the reference bit for bit).
  * "bnb" = bitsandbytes 0.50.2's CUDA kernels, which are built with --use_fast_math (GPU default):
    r = rcp.approx.ftz.f32 (inline asm) and fp32 subnormals flushed to zero (-ftz).
Both use bitsandbytes CUDA's NF4 thresholds (its decimal literals rounded by nvcc straight to fp32; 4 of
the 15 sit one ulp from the fp32 midpoints: formats.NF4_THRESHOLD_BITS, passed in as `thresholds`) and
dequantize FP4 code 8 to -0.0 (0 * absmax * -1, the `lut` the caller passes), as the reference does. The two
modes differ only for elements within ~1 ulp of a threshold and subnormal inputs; tests/test_gpu_quant4.py
checks that characterization, docs/benchmarks.md lists the counts.
Limits: n < 2**31 (int32 offsets, as in bitsandbytes); blocksize a power of two in [32, 4096].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import TILING, cast_rne, interpreting

__all__ = ["quantize_4bit", "quantize_blockwise", "dequantize_4bit", "encode_8bit", "MODE_BRANCHES"]
MODE_BRANCHES = ("bnb", "reference")  # the device picks one (_resolve), mode= forces one
RCP_NAMES = {"ieee": 0, "div": 1, "approx": 2}  # 1 = Triton's `/` (div.full.f32), kept for the measurement
# Quantize tile on a GPU: elements per program (whole blocks) and warps; from bench_quant4.py --sweep.
QUANT_ELEMS, QUANT_WARPS = 4096, 4


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
    # -ftz: a subnormal operand or result becomes a zero of the same sign (v * 0.0). The sign matters for
    # dequantized outputs: NF4 code 0 in an all-zero block is -1.0 * 0 = -0.0 in bitsandbytes.
    if FTZ:
        return tl.where(tl.abs(v) < 1.1754943508222875e-38, v * 0.0, v)
    else:
        return v


@triton.jit
def _nf4_code(xn, thr_ptr):
    # bitsandbytes' dQuantizeNF4 tree: code bits b3 b2 b1 b0, each a strict `>` against the threshold
    # picked by the bits above it. Equals "count of thresholds < xn"; NaN fails every test -> code 0.
    t0 = tl.load(thr_ptr + 0)
    t1 = tl.load(thr_ptr + 1)
    t2 = tl.load(thr_ptr + 2)
    t3 = tl.load(thr_ptr + 3)
    t4 = tl.load(thr_ptr + 4)
    t5 = tl.load(thr_ptr + 5)
    t6 = tl.load(thr_ptr + 6)
    t7 = tl.load(thr_ptr + 7)
    t8 = tl.load(thr_ptr + 8)
    t9 = tl.load(thr_ptr + 9)
    t10 = tl.load(thr_ptr + 10)
    t11 = tl.load(thr_ptr + 11)
    t12 = tl.load(thr_ptr + 12)
    t13 = tl.load(thr_ptr + 13)
    t14 = tl.load(thr_ptr + 14)
    b3 = xn > t7
    b2 = xn > tl.where(b3, t11, t3)
    b1 = xn > tl.where(b3, tl.where(b2, t13, t9), tl.where(b2, t5, t1))
    b0 = xn > tl.where(b3, tl.where(b2, tl.where(b1, t14, t12), tl.where(b1, t10, t8)),
                       tl.where(b2, tl.where(b1, t6, t4), tl.where(b1, t2, t0)))
    return (b3.to(tl.int32) << 3) | (b2.to(tl.int32) << 2) | (b1.to(tl.int32) << 1) | b0.to(tl.int32)


@triton.jit
def _fp4_code(xn, FTZ: tl.constexpr):
    # bitsandbytes' dQuantizeFP4 tree on |xn| with its literal thresholds (exact fp32 values here; FP4's
    # literals round the same via double or directly). Buckets c1 c2 c3 -> magnitude code
    # ((c1 ^ c2) << 2) | (c2 << 1) | c3, i.e. 000,001,110,111,100,101,010,011 in ascending order.
    a = tl.abs(xn)
    c1 = a > 0.2916666567325592
    c2 = a > tl.where(c1, 0.5833330154418945, 0.0859375)
    c3 = a > tl.where(c1, tl.where(c2, 0.8333333134651184, 0.4166666865348816),
                      tl.where(c2, 0.2083333283662796, 0.0026041700039058924))
    code = ((c1 ^ c2).to(tl.int32) << 2) | (c2.to(tl.int32) << 1) | c3.to(tl.int32)
    if FTZ:
        neg = xn <= -1.1754943508222875e-38  # a subnormal negative xn is flushed to -0: no sign bit
    else:
        neg = xn < 0
    return code | tl.where(neg, 8, 0)


@triton.jit
def _quantize_4bit_kernel(x_ptr, thr_ptr, packed_ptr, absmax_ptr, n, nbytes, nblocks,
                          BS: tl.constexpr, ROWS: tl.constexpr, NF4: tl.constexpr, RCP: tl.constexpr,
                          FTZ: tl.constexpr):
    # One program = ROWS consecutive blocks of BS elements: x tile (ROWS, BS) -> bytes (ROWS, BS // 2).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < nblocks
    rem = n - rows * BS  # valid elements from each block's start (>= 1 for valid rows, no int32 overflow)
    cols = tl.arange(0, BS)
    mask = row_ok[:, None] & (cols[None, :] < rem[:, None])
    x = _flush(tl.load(x_ptr + rows[:, None] * BS + cols[None, :], mask=mask, other=0.0).to(tl.float32), FTZ)
    absmax = tl.max(tl.abs(x), axis=1)
    tl.store(absmax_ptr + rows, absmax, mask=row_ok)
    xn = x * _reciprocal(absmax, RCP)[:, None]  # zero block: 0 * inf = NaN -> code 0
    if NF4:
        code = tl.where(mask, _nf4_code(xn, thr_ptr), 7)
    else:
        code = tl.where(mask, _fp4_code(xn, FTZ), 0)
    hi, lo = tl.split(tl.reshape(code, [ROWS, BS // 2, 2]))
    byte = ((hi << 4) | lo).to(tl.uint8)
    bcols = tl.arange(0, BS // 2)
    brem = nbytes - rows * (BS // 2)  # bytes left (pad nibble included); divisible by 16 keeps stores wide
    tl.store(packed_ptr + rows[:, None] * (BS // 2) + bcols[None, :], byte,
             mask=row_ok[:, None] & (bcols[None, :] < brem[:, None]))


@triton.jit
def encode_8bit(x, code_ptr):
    """ops/quant4.encode_8bit in Triton (also used by kernels/adamw.py): 7-step binary search over the
    sorted 256-entry map from pivot 127, then the midpoint test against the bracketing probes; exact ties
    stay on the (even) pivot; NaN compares false everywhere and walks left to index 0."""
    pivot = tl.zeros(x.shape, tl.int32) + 127
    lower_pivot = tl.zeros(x.shape, tl.int32)
    upper_pivot = tl.zeros(x.shape, tl.int32) + 255
    val = tl.load(code_ptr + pivot)
    for i in tl.static_range(7):
        step = 64 >> i
        right = x > val
        lower_pivot = tl.where(right, pivot, lower_pivot)
        upper_pivot = tl.where(right, upper_pivot, pivot)
        pivot = tl.where(right, pivot + step, pivot - step)
        val = tl.load(code_ptr + pivot)
    lower = tl.load(code_ptr + lower_pivot)
    upper = tl.load(code_ptr + upper_pivot)
    go_up = (x > val) & (x > (upper + val) * 0.5)
    go_down = (x <= val) & (x < (lower + val) * 0.5)
    return tl.where(go_up, upper_pivot, tl.where(go_down, lower_pivot, pivot))


@triton.jit
def _quantize_8bit_kernel(x_ptr, code_ptr, q_ptr, absmax_ptr, n, nblocks,
                          BS: tl.constexpr, ROWS: tl.constexpr, RCP: tl.constexpr, FTZ: tl.constexpr):
    # Same blocking as the 4-bit kernel; codes follow CUDA's dQuantize<0> (see ops/quant4.encode_8bit).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < nblocks
    rem = n - rows * BS
    cols = tl.arange(0, BS)
    mask = row_ok[:, None] & (cols[None, :] < rem[:, None])
    offs = rows[:, None] * BS + cols[None, :]
    x = _flush(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), FTZ)
    absmax = tl.max(tl.abs(x), axis=1)
    tl.store(absmax_ptr + rows, absmax, mask=row_ok)
    xn = _flush(x * _reciprocal(absmax, RCP)[:, None], FTZ)  # here a subnormal xn vs code 0.0 matters
    q = encode_8bit(xn, code_ptr)
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_4bit_kernel(packed_ptr, absmax_ptr, code256_ptr, absmax2_ptr, offset_ptr, lut_ptr, out_ptr,
                            n, nbytes, LOG2_BS: tl.constexpr, DOUBLE: tl.constexpr, BPR: tl.constexpr,
                            BLOCK_BYTES: tl.constexpr, JOIN: tl.constexpr,
                            FTZ: tl.constexpr):
    # Tile (ROWS, BPR) packed bytes -> (ROWS, 2*BPR) outputs (see the header for the layout argument).
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
    hi = cast_rne(hi, out_ptr.dtype.element_ty)
    lo = cast_rne(lo, out_ptr.dtype.element_ty)
    if JOIN:
        out = tl.reshape(tl.join(hi, lo), [ROWS, 2 * BPR])
        ooffs = seg[:, None] * (2 * BPR) + tl.arange(0, 2 * BPR)[None, :]
        tl.store(out_ptr + ooffs, out, mask=ooffs < n)
    else:
        tl.store(out_ptr + 2 * boffs, hi, mask=2 * boffs < n)
        tl.store(out_ptr + 2 * boffs + 1, lo, mask=2 * boffs + 1 < n)


# ---------------------------------------------------------------------------------------------------------
# Launchers: validate, allocate, pick the tile, launch. Dequantize is autotuned on a GPU over a few tile
# sizes (keyed on n, blocksize and double quant); the interpreter uses a small fixed tile, since
# autotuning there would time every config in Python. `mode` picks the arithmetic (header); `rcp`/`ftz`
# override single parts of it (benchmarks/bench_quant4.py --probe measures each against bitsandbytes).

_tuned: dict = {}


def _dequant_tuned():
    if "dq" not in _tuned:
        configs = [triton.Config({"BLOCK_BYTES": bb, "JOIN": True}, num_warps=w)
                   for bb, w in ((2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 8))]
        _tuned["dq"] = triton.autotune(configs, key=["n", "LOG2_BS", "DOUBLE"])(_dequantize_4bit_kernel)
    return _tuned["dq"]


def _resolve(device: torch.device, mode: str | None, rcp: str | None, ftz: bool | None) -> tuple[str, int, bool]:
    """(mode, RCP, FTZ) for a launch. GPU default "bnb"; CPU default "reference"; the interpreter has no
    inline asm, so "bnb" there keeps its thresholds / FTZ / -0.0 but uses the IEEE reciprocal."""
    on_gpu = device.type == "cuda"
    mode = mode or ("bnb" if on_gpu else "reference")
    if mode not in MODE_BRANCHES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODE_BRANCHES}")
    r = rcp or ("approx" if mode == "bnb" and on_gpu else "ieee")
    if r not in RCP_NAMES or (r != "ieee" and not on_gpu):
        raise ValueError(f"rcp={r!r} is not available on {device.type}")
    return mode, RCP_NAMES[r], (mode == "bnb") if ftz is None else bool(ftz)


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
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


def quantize_4bit(w: torch.Tensor, blocksize: int, quant_type: str, thresholds: torch.Tensor, *,
                  mode: str | None = None, rcp: str | None = None, ftz: bool | None = None,
                  elems: int | None = None, num_warps: int | None = None):
    """Triton twin of ops/quant4.quantize_4bit_ref: w (contiguous, any shape, fp32/fp16/bf16) ->
    (packed uint8 ((n+1)//2, 1), absmax fp32 (ceil(n/blocksize),)).

    thresholds: the 15 fp32 NF4 decision thresholds on w's device (formats.nf4_thresholds; FP4's are literals).
    mode: "bnb" (GPU default) or "reference" (CPU default), see the header; rcp ("ieee"|"div"|"approx")
    and ftz override parts of it. elems (elements per program, whole blocks) / num_warps: tile override.
    """
    _check_input(w, blocksize)
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"unknown quant_type {quant_type!r}; expected 'nf4' or 'fp4'")
    _, rcp_id, flush = _resolve(w.device, mode, rcp, ftz)
    n = w.numel()
    nblocks = triton.cdiv(n, blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty((nblocks,), dtype=torch.float32, device=w.device)
    gpu_tiles = TILING[-1] == "gpu"  # kernels/common.py: the interpreter's tests force the GPU's too
    rows = max(1, (elems or (QUANT_ELEMS if gpu_tiles else 512)) // blocksize)
    _quantize_4bit_kernel[(triton.cdiv(nblocks, rows),)](
        w.reshape(-1), thresholds, packed, absmax, n, (n + 1) // 2, nblocks,
        BS=blocksize, ROWS=rows, NF4=quant_type == "nf4", RCP=rcp_id, FTZ=flush,
        num_warps=num_warps or (QUANT_WARPS if gpu_tiles else 4))
    return packed, absmax


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int, *, mode: str | None = None,
                       rcp: str | None = None, ftz: bool | None = None):
    """Triton twin of ops/quant4.quantize_blockwise_ref (8-bit, CUDA tie rule) for the nested absmax:
    x fp32 1-D, code fp32 (256,) sorted -> (uint8 codes x.shape, absmax fp32 (ceil(n/blocksize),))."""
    if x.dim() != 1 or x.dtype != torch.float32:
        raise ValueError(f"quantize_blockwise expects a 1-D float32 tensor, got {x.dtype} {tuple(x.shape)}")
    if code.shape != (256,) or code.dtype != torch.float32:
        raise ValueError(f"code must be a float32 (256,) map, got {code.dtype} {tuple(code.shape)}")
    x = x.contiguous()
    _check_input(x, blocksize)
    _, rcp_id, flush = _resolve(x.device, mode, rcp, ftz)
    n = x.numel()
    nblocks = triton.cdiv(n, blocksize)
    q = torch.empty_like(x, dtype=torch.uint8)
    absmax = torch.empty((nblocks,), dtype=torch.float32, device=x.device)
    rows = max(1, (2048 if TILING[-1] == "gpu" else 512) // blocksize)
    _quantize_8bit_kernel[(triton.cdiv(nblocks, rows),)](
        x, code.to(x.device).contiguous(), q, absmax, n, nblocks, BS=blocksize, ROWS=rows, RCP=rcp_id,
        FTZ=flush, num_warps=4)
    return q, absmax


def dequantize_4bit(q, lut: torch.Tensor, code256: torch.Tensor, *, dtype: torch.dtype | None = None,
                    mode: str | None = None, ftz: bool | None = None, block_bytes: int | None = None,
                    join: bool = True, num_warps: int | None = None, fp_fusion: bool = False,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of ops/quant4.dequantize_as for a QuantizedTensor -> Tensor(q.shape, dtype or q.dtype).

    lut: the 16 fp32 levels of q's quant type (formats.dequant_table: FP4 code 8 is -0.0); code256: the signed
    8-bit dynamic map (formats.dynamic_map), read only with double quant; both on q's device.
    dtype: the output dtype (default q.dtype); nf4_linear's dequantize-then-cuBLAS path asks for x's dtype.
    out: a contiguous tensor of q.numel elements to write into instead of a new one (its dtype is the output
    dtype); the grouped LoRA linear dequantizes several weights into row ranges of one buffer this way.
    Reads the packed codes and, with double quant, the uint8 absmax, nested_absmax and offset directly.
    mode/ftz as in quantize_4bit. block_bytes/join/num_warps: a fixed tile instead of autotuning.
    fp_fusion=True lets the compiler contract the nested restore into an FMA (only to measure that it
    breaks exactness).
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
    _, _, flush = _resolve(dev, mode, None, ftz)
    if out is None:
        out = torch.empty(q.shape, dtype=dtype or q.dtype, device=dev)
    elif not out.is_contiguous() or out.numel() != n or out.device != dev or (dtype and dtype != out.dtype):
        raise ValueError(f"out must be a contiguous {dtype or ''} tensor of {n} elements on {dev}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if q.double_quant:
        if q.absmax.dtype != torch.uint8:
            raise ValueError(f"double-quantized absmax must be uint8, got {q.absmax.dtype}")
        absmax, absmax2, offset = q.absmax, q.nested_absmax, q.offset
    else:
        absmax = q.absmax
        code256 = absmax2 = offset = absmax  # unused by the kernel when DOUBLE is off
    nbytes = data.numel()
    args = (data, absmax, code256, absmax2, offset, lut, out.view(-1), n, nbytes)
    meta = dict(LOG2_BS=q.blocksize.bit_length() - 1, DOUBLE=bool(q.double_quant), BPR=8 // out.element_size(),
                FTZ=flush, enable_fp_fusion=fp_fusion)
    if dev.type == "cuda" and block_bytes is None:
        _dequant_tuned()[lambda m: (triton.cdiv(nbytes, m["BLOCK_BYTES"]),)](*args, **meta)
    else:
        block_bytes = block_bytes or 256
        _dequantize_4bit_kernel[(triton.cdiv(nbytes, block_bytes),)](
            *args, BLOCK_BYTES=block_bytes, JOIN=join, num_warps=num_warps or 4, **meta)
    return out
