"""The quant4 op: bitsandbytes' 4-bit blockwise format (NF4 / FP4, optional double quant) as `QuantizedTensor`,
with `quantize` / `dequantize` / `dequantize_into`, the PyTorch reference that is the spec, and the custom ops.

A QuantizedTensor is the packed codes plus the absmax state, laid out exactly as bitsandbytes' `QuantState`
and `Linear4bit` state dict (docs/format.md), so a checkpoint written by either loads in the other.

The reference (the `*_ref` functions and the encoders below) follows bitsandbytes' CUDA kernels, which is what
produced nearly every bnb-4bit checkpoint in circulation:
  * blocks run over the flattened, row-major tensor; absmax is the fp32 max |x| of each block;
  * xn = x * (1/absmax) with one fp32 reciprocal per block (a multiply, not a divide);
  * NF4 code = number of CUDA's fp32 thresholds strictly below xn (a tie goes to the lower code; 4 of the 15
    thresholds are one ulp off the midpoints, formats.NF4_THRESHOLD_BITS);
  * FP4 uses the CUDA literal thresholds on |xn| plus a sign bit;
  * an all-zero block has absmax 0, xn = 0*inf = NaN, and NaN takes code 0 (NF4 -1.0, dequantizing to -0.0);
  * dequantization multiplies by the table, except FP4 code 8 gives -0.0 (CUDA's sign handling);
  * element 2j goes in the high nibble of byte j; an odd tail is padded with NF4 zero (7) / FP4 +0 (0).
The 8-bit quantizer (double quant's nested absmax, and the 8-bit optimizer states of ops/adamw.py) emulates the
CUDA binary search over the 256-entry map, so exact ties resolve as CUDA resolves them (to the even index), not
as a nearest-neighbour search would. The references take CPU or CUDA tensors and work in fp32 internally.

Two known differences from CUDA, both invisible on ordinary weights: CUDA is built with --use_fast_math,
so its reciprocal is approximate (~1 ulp) and denormal inputs flush to zero. An element within ~1 ulp of a
threshold can therefore take the neighbouring code on CUDA (kernels/quant4.py reproduces both behaviours, its
"bnb" mode). bitsandbytes' own CPU backend differs more (it divides in the tail block and gives all-zero blocks
code 7); tests/test_bnb_compat.py spells it out.

Dispatch: `backend.choose` picks the reference or the Triton launchers of kernels/quant4.py (which are passed the
thresholds and tables from formats.py). Under torch.compile quantize / dequantize / dequantize_into call the custom
ops registered at the end of this file (`qlora_core::quantize_4bit`, `dequantize_4bit`, `dequantize_4bit_into`),
which take a QuantizedTensor's fields; eager calls run the same bodies directly (docs/backends.md).
"""
from __future__ import annotations

import dataclasses
import json
import math

import torch

from .. import backend
from ..defaults import FLOAT_DTYPES
from ..errors import FileLoadError
from ..formats import (FP4_PAD_NIBBLE, NF4_PAD_NIBBLE, QUANT_TYPES, code_table, dequant_table, dynamic_map,
                       fp4_thresholds, nf4_thresholds)

NESTED_BLOCKSIZE = 256  # double quant: absmax values per nested 8-bit block
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# -- the reference: the format's spec in PyTorch -----------------------------------------------------------------------
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


def double_dequantize_ref(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Restore the fp32 absmax: code[q] * absmax2[i >> 8], then + offset as a separate fp32 add (no FMA)."""
    return dequantize_blockwise_ref(qabsmax, nested_absmax, dynamic_map(True, qabsmax.device),
                                    NESTED_BLOCKSIZE) + offset.to(torch.float32)


# -- QuantizedTensor ---------------------------------------------------------------------------------------------------
class QuantStateError(FileLoadError, ValueError):
    """A state dict or blob that does not describe a valid bitsandbytes 4-bit tensor."""


@dataclasses.dataclass(repr=False)
class QuantizedTensor:
    """A 4-bit blockwise-quantized tensor in bitsandbytes' layout.

    Fields (n = prod(shape), nblocks = ceil(n / blocksize)):
      data:          uint8 ((n+1)//2, 1): packed codes, element 2j in the high nibble of byte j.
      absmax:        fp32 (nblocks,) without double quant; uint8 (nblocks,) codes of absmax-offset with it.
      shape, dtype:  the original tensor's shape and dtype (also the dequantized output's).
      blocksize:     elements per absmax block (power of two, 32..4096).
      quant_type:    "nf4" or "fp4".
      double_quant:  whether absmax is 8-bit quantized (bitsandbytes compress_statistics=True).
      nested_absmax: fp32 (ceil(nblocks/256),) absmax of the nested blocks, or None.
      offset:        fp32 0-dim tensor, mean of the fp32 absmax, or None.
    """
    data: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    double_quant: bool
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    # -- derived sizes ---------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Elements of the original tensor, prod(shape)."""
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        """Absmax blocks, ceil(numel / blocksize)."""
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        """Device of the packed codes (the other state tensors live there too)."""
        return self.data.device

    @property
    def code(self) -> torch.Tensor:
        """The 16-entry fp32 table (`quant_map`)."""
        return code_table(self.quant_type, self.device)

    def bits_per_parameter(self) -> float:
        """Storage cost per original element, counting codes and every absmax byte."""
        nbytes = self.data.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            nbytes += self.nested_absmax.numel() * 4 + 4
        return 8.0 * nbytes / self.numel

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block fp32 absmax (nblocks,), restoring it from the nested 8-bit state when double quantized."""
        if not self.double_quant:
            return self.absmax
        return double_dequantize_ref(self.absmax, self.nested_absmax, self.offset)

    def to(self, *args, **kwargs) -> "QuantizedTensor":
        """A copy moved and/or retyped as `Tensor.to` would be: `q.to("cuda")`, `q.to(torch.float16)`,
        `q.to(device=..., dtype=..., non_blocking=...)`, `q.to(other_tensor)`.

        A device moves every state tensor; nothing is requantized. A dtype changes only `self.dtype`, the dtype
        that dequantize() returns: the packed codes stay uint8 and the absmax keeps its own dtype, because
        casting those (as a blanket `.to(float16)` would) silently corrupts the weight. TypeError for a dtype
        that is not float32 / float16 / bfloat16.
        """
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"QuantizedTensor.to: the dequantized dtype must be float32, float16 or bfloat16, "
                            f"got {dtype}; the packed 4-bit state itself is never cast")
        out = self
        if device is not None:
            move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
            out = dataclasses.replace(out, data=move(self.data), absmax=move(self.absmax),
                                      nested_absmax=move(self.nested_absmax), offset=move(self.offset))
        if dtype is not None and dtype != out.dtype:
            out = dataclasses.replace(out, dtype=dtype)
        return out

    def __repr__(self) -> str:
        """Shape, dtype and format, and each state tensor as dtype(shape): never the tensors' values."""
        def t(x):
            return "None" if x is None else f"{str(x.dtype).removeprefix('torch.')}{tuple(x.shape)}"
        return (f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, quant_type={self.quant_type!r}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, device={self.device}, "
                f"data={t(self.data)}, absmax={t(self.absmax)}, nested_absmax={t(self.nested_absmax)}, "
                f"offset={t(self.offset)})")

    def dequantize(self) -> torch.Tensor:
        """Same as `qlora_core.dequantize(self)`."""
        return dequantize(self)

    # -- bitsandbytes Linear4bit state dict ------------------------------------------------------
    def _blob(self) -> bytes:
        meta = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "dtype": _DTYPE_NAMES[self.dtype], "shape": list(self.shape)}
        if self.double_quant:
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                        nested_offset=self.offset.item())
        return json.dumps(meta).encode("utf-8")

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors under bitsandbytes' `Linear4bit` keys: `{prefix}weight`, `{prefix}weight.absmax`, ...

        Keys, dtypes and shapes: weight uint8 ((n+1)//2, 1); weight.absmax uint8 or fp32 (nblocks,);
        weight.quant_map fp32 (16,); with double quant weight.nested_absmax fp32 and weight.nested_quant_map
        fp32 (256,); weight.quant_state.bitsandbytes__{nf4|fp4} uint8 (len(json),), the JSON metadata blob.
        """
        w = prefix + "weight"
        sd = {w: self.data, w + ".absmax": self.absmax, w + ".quant_map": self.code.clone()}
        if self.double_quant:
            sd[w + ".nested_absmax"] = self.nested_absmax
            sd[w + ".nested_quant_map"] = dynamic_map(True, self.device).clone()
        blob = torch.frombuffer(bytearray(self._blob()), dtype=torch.uint8).to(self.device)
        sd[f"{w}.quant_state.bitsandbytes__{self.quant_type}"] = blob
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "") -> "QuantizedTensor":
        """Rebuild from a `Linear4bit` state dict (ours or bitsandbytes'); validates every key against the blob.

        Any malformed field (blob JSON, shape, blocksize, dtype, nested_offset, a tensor's dtype / shape / table)
        raises QuantStateError naming the key; the tensors' values (absmax finiteness) are load_llama's to check.
        """
        w = prefix + "weight"
        blobs = [k for k in sd if k.startswith(w + ".quant_state.bitsandbytes__")]
        if len(blobs) != 1:
            raise QuantStateError(f"expected exactly one key '{w}.quant_state.bitsandbytes__nf4|fp4', found {blobs}")
        if w not in sd:
            raise QuantStateError(f"missing key '{w}' (the packed 4-bit codes)")
        raw = sd[blobs[0]]
        if not isinstance(raw, torch.Tensor) or raw.dim() != 1:
            raise QuantStateError(f"'{blobs[0]}' must be a 1-D uint8 tensor holding a JSON blob")
        try:
            meta = json.loads(bytes(raw.cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise QuantStateError(f"'{blobs[0]}' is not a UTF-8 JSON blob: {e}") from None
        if not isinstance(meta, dict):
            raise QuantStateError(f"'{blobs[0]}' must hold a JSON object, got {type(meta).__name__}")
        quant_type = blobs[0].rsplit("__", 1)[1]
        if quant_type not in QUANT_TYPES:
            raise QuantStateError(f"'{blobs[0]}': unknown quant type {quant_type!r}; expected one of {QUANT_TYPES}")
        for field in ("quant_type", "blocksize", "dtype", "shape"):
            if field not in meta:
                raise QuantStateError(f"'{blobs[0]}' lacks the field {field!r}")
        if meta["quant_type"] != quant_type:
            raise QuantStateError(f"blob key says {quant_type!r} but its JSON says {meta['quant_type']!r}")
        if not isinstance(meta["dtype"], str) or meta["dtype"] not in _DTYPE_NAMES.values():
            raise QuantStateError(f"unsupported dtype {meta['dtype']!r} in '{blobs[0]}'")
        dims = meta["shape"]
        if (not isinstance(dims, list) or not dims
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31 for d in dims)):
            raise QuantStateError(f"'{blobs[0]}': shape must be a non-empty list of positive ints, got {dims!r}")
        double_quant = "nested_offset" in meta
        if double_quant:
            off = meta["nested_offset"]
            if isinstance(off, int) and not isinstance(off, bool):
                off = float(off) if abs(off) < 2**1000 else math.inf  # float() of a larger int overflows
            if not isinstance(off, float) or not math.isfinite(off):
                raise QuantStateError(f"'{blobs[0]}': nested_offset must be a finite number, got {off!r}")
            if meta.get("nested_dtype", "float32") != "float32":
                raise QuantStateError(f"'{blobs[0]}': nested_dtype {meta['nested_dtype']!r} unsupported (only "
                                      f"float32)")
        shape = torch.Size(dims)
        blocksize = meta["blocksize"]
        try:
            _check_blocksize(blocksize)
        except ValueError as e:
            raise QuantStateError(f"'{blobs[0]}': {e}") from None
        if math.prod(shape) >= 2**31:
            raise QuantStateError(f"'{blobs[0]}': shape {dims} has >= 2**31 elements (the format indexes with int32)")
        n = math.prod(shape)
        nblocks = -(-n // blocksize)
        need = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if double_quant else [])
        for s in need:
            if f"{w}.{s}" not in sd:
                raise QuantStateError(f"missing key '{w}.{s}' (double_quant={double_quant})")
        bad = [k for k in [w] + [f"{w}.{x}" for x in need] if not isinstance(sd[k], torch.Tensor)]
        if bad:
            raise QuantStateError(f"{bad} must be tensors")
        data = sd[w]
        if data.dtype != torch.uint8:
            data = data.contiguous().view(torch.uint8).reshape(-1, 1)  # quant_storage other than uint8
        absmax = sd[f"{w}.absmax"]
        expect = [(w, data, ((n + 1) // 2, 1), torch.uint8),
                  (f"{w}.absmax", absmax, (nblocks,), torch.uint8 if double_quant else torch.float32),
                  (f"{w}.quant_map", sd[f"{w}.quant_map"], (16,), torch.float32)]
        nested_absmax = offset = None
        if double_quant:
            nested_absmax = sd[f"{w}.nested_absmax"]
            expect += [(f"{w}.nested_absmax", nested_absmax, (-(-nblocks // NESTED_BLOCKSIZE),), torch.float32),
                       (f"{w}.nested_quant_map", sd[f"{w}.nested_quant_map"], (NESTED_BLOCKSIZE,), torch.float32)]
            if meta.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
                raise QuantStateError(f"'{blobs[0]}': nested_blocksize {meta['nested_blocksize']!r} unsupported "
                                      f"(only 256)")
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=absmax.device)
        for key, t, shp, dt in expect:
            if tuple(t.shape) != tuple(shp) or t.dtype != dt:
                raise QuantStateError(f"'{key}' is {t.dtype} {tuple(t.shape)} but the blob (shape {list(shape)}, "
                                      f"blocksize {blocksize}) needs {dt} {tuple(shp)}")
        if not torch.equal(sd[f"{w}.quant_map"].cpu(), code_table(quant_type)):
            raise QuantStateError(f"'{w}.quant_map' is not the standard {quant_type} table; custom maps are unsupported")
        if double_quant and not torch.equal(sd[f"{w}.nested_quant_map"].cpu(), dynamic_map(True)):
            raise QuantStateError(f"'{w}.nested_quant_map' is not bitsandbytes' signed dynamic map")
        return cls(data=data, absmax=absmax, shape=shape, dtype=getattr(torch, meta["dtype"]),
                   blocksize=blocksize, quant_type=quant_type, double_quant=double_quant,
                   nested_absmax=nested_absmax, offset=offset)


def _check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")


def _check_input(w: torch.Tensor, quant_type: str, blocksize: int) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize supports float32, float16 and bfloat16, got {w.dtype}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {QUANT_TYPES}")
    _check_blocksize(blocksize)
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    if w.is_meta:
        raise ValueError(f"cannot quantize a meta tensor (shape {tuple(w.shape)}, {w.dtype}): it holds no values. "
                         f"Materialize it first (e.g. module.to_empty(device=...) and load the weights)")
    if w.numel() >= 2**31:
        raise ValueError(f"tensor has {w.numel()} elements; the format indexes with int32 (max 2**31-1)")


def _check_finite(w: torch.Tensor) -> None:
    # Inside the op body (not in _check_input): it reads a value on the host, which Dynamo cannot trace.
    # aminmax propagates NaN and exposes +-Inf in one read with no tensor-sized temporary (isfinite(w).all()
    # allocates a bool tensor and read/wrote 3 bytes per element; on an H100 it cost more than the kernel).
    lo, hi = torch.aminmax(w)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"cannot quantize: the tensor holds {bad} NaN/Inf value(s); fix the weights first")


def _quantize(w: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool):
    """The quantize body: contiguous w -> (data, absmax, nested_absmax or None, offset or None)."""
    _check_finite(w)
    if backend.choose(w.device, w.dtype) == "triton":
        from ..kernels import quant4
        data, absmax = quant4.quantize_4bit(w, blocksize, quant_type, nf4_thresholds(w.device))
        quantize_blockwise = quant4.quantize_blockwise
    else:
        data, absmax = quantize_4bit_ref(w, blocksize, quant_type)
        quantize_blockwise = quantize_blockwise_ref
    nested_absmax = offset = None
    if double_quant:
        # offset = absmax.mean() as a torch reduction on w's device, the same call bitsandbytes makes, so
        # the stored offset (and therefore every nested code) is reproduced bit for bit.
        offset = absmax.mean()
        absmax, nested_absmax = quantize_blockwise(absmax - offset, dynamic_map(True, w.device), NESTED_BLOCKSIZE)
    return data, absmax, nested_absmax, offset


def quantize(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
             double_quant: bool = True) -> QuantizedTensor:
    """Quantize `w` to 4 bits, byte-compatible with bitsandbytes `quantize_4bit`.

    w: any shape, float32 / float16 / bfloat16, finite, non-empty, on CPU or CUDA (not meta); a tensor that
    requires grad is detached (the result never carries an autograd graph).
    quant_type: "nf4" or "fp4". blocksize: power of two in [32, 4096]. double_quant: also quantize the
    absmax to 8 bits (blocks of 256, signed dynamic map, offset = mean), as compress_statistics=True does.
    Returns a QuantizedTensor on w's device. Raises TypeError/ValueError naming the problem on bad input.
    """
    _check_input(w, quant_type, blocksize)
    # detach: the quantized state is a frozen copy; without it offset / nested_absmax would carry an autograd
    # graph back into the source weight (and a later backward would write gradients into it)
    w = w.detach().contiguous()
    if backend.compiling():
        data, absmax, nested_absmax, offset = torch.ops.qlora_core.quantize_4bit(w, blocksize, quant_type,
                                                                                 double_quant)
        if not double_quant:
            nested_absmax = offset = None
    else:
        data, absmax, nested_absmax, offset = _quantize(w, blocksize, quant_type, double_quant)
    return QuantizedTensor(data=data, absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                           quant_type=quant_type, double_quant=double_quant,
                           nested_absmax=nested_absmax, offset=offset)


def dequantize_as(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """Reference dequantization of q into `dtype` (q.shape): dtype(lut[code] * absmax_fp32), one rounding."""
    return dequantize_4bit_ref(q.data, q.absmax_fp32(), q.shape, dtype, q.blocksize, q.quant_type)


def _dequantize(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The dequantize body: q -> Tensor(q.shape) in `dtype` (the fp32 product rounded once to dtype)."""
    if backend.choose(q.device, dtype) == "triton":
        from ..kernels import quant4
        return quant4.dequantize_4bit(q, dequant_table(q.quant_type, q.device), dynamic_map(True, q.device),
                                      dtype=dtype)
    return dequantize_as(q, dtype)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Dequantize to q.shape and q.dtype: out[i] = dtype(table[code_i] * absmax[i // blocksize]) (fp32 math).

    With double quant the absmax is first restored as code256[q] * nested_absmax + offset (separate fp32 ops,
    as bitsandbytes' dequantize_4bit does). Output is on q's device.
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize expects a QuantizedTensor, got {type(q).__name__}")
    if backend.compiling():
        return torch.ops.qlora_core.dequantize_4bit(*q_args(q), q.dtype)
    return _dequantize(q, q.dtype)


def dequantize_into(q: QuantizedTensor, out: torch.Tensor) -> None:
    """Write dequantize(q) rounded once to out.dtype into `out` (contiguous, q.numel elements)."""
    if backend.compiling():
        torch.ops.qlora_core.dequantize_4bit_into(out, *q_args(q))
    else:
        _dequantize_into(out, q)


def _dequantize_into(out: torch.Tensor, q: QuantizedTensor) -> None:
    if backend.choose(out.device, out.dtype) == "triton":
        from ..kernels import quant4
        quant4.dequantize_4bit(q, dequant_table(q.quant_type, q.device), dynamic_map(True, q.device), out=out)
    else:
        out.copy_(dequantize_as(q, out.dtype).reshape(out.shape))


# -- torch.library custom ops: what torch.compile sees (docs/backends.md, "torch.compile: the custom ops") -------------
# A QuantizedTensor is not a tensor, so the ops take its fields: q_args(q) gives them in the order below and
# q_from_args rebuilds it. Optional tensors are None without double quant; an op cannot return None, so
# quantize_4bit returns empty (0,) tensors there instead.
def q_args(q: QuantizedTensor) -> tuple:
    """(data, absmax, nested_absmax, offset, shape list, dtype, blocksize, quant_type, double_quant)."""
    return (q.data, q.absmax, q.nested_absmax, q.offset, list(q.shape), q.dtype, q.blocksize, q.quant_type,
            q.double_quant)


def q_from_args(data, absmax, nested_absmax, offset, shape, dtype, blocksize, quant_type, double_quant):
    """The QuantizedTensor that q_args took apart."""
    return QuantizedTensor(data=data, absmax=absmax, shape=torch.Size(shape), dtype=dtype, blocksize=blocksize,
                           quant_type=quant_type, double_quant=double_quant, nested_absmax=nested_absmax,
                           offset=offset)


_T = torch.Tensor
_OptT = torch.Tensor | None


@torch.library.custom_op("qlora_core::quantize_4bit", mutates_args=())
def _quantize_op(w: _T, blocksize: int, quant_type: str, double_quant: bool) -> tuple[_T, _T, _T, _T]:
    data, absmax, nested_absmax, offset = _quantize(w.contiguous(), blocksize, quant_type, double_quant)
    if not double_quant:
        nested_absmax, offset = absmax.new_empty(0), absmax.new_empty(0)
    return data, absmax, nested_absmax, offset


@_quantize_op.register_fake
def _(w, blocksize, quant_type, double_quant):
    n = w.numel()
    nblocks = -(-n // blocksize)
    data = w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    if not double_quant:
        empty = w.new_empty(0, dtype=torch.float32)
        return data, w.new_empty(nblocks, dtype=torch.float32), empty, empty.clone()
    return (data, w.new_empty(nblocks, dtype=torch.uint8),
            w.new_empty(-(-nblocks // NESTED_BLOCKSIZE), dtype=torch.float32), w.new_empty((), dtype=torch.float32))


@torch.library.custom_op("qlora_core::dequantize_4bit", mutates_args=())
def _dequantize_op(data: _T, absmax: _T, nested_absmax: _OptT, offset: _OptT, shape: list[int],
                   dtype: torch.dtype, blocksize: int, quant_type: str, double_quant: bool,
                   out_dtype: torch.dtype) -> _T:
    q = q_from_args(data, absmax, nested_absmax, offset, shape, dtype, blocksize, quant_type, double_quant)
    return _dequantize(q, out_dtype)


@_dequantize_op.register_fake
def _(data, absmax, nested_absmax, offset, shape, dtype, blocksize, quant_type, double_quant, out_dtype):
    return data.new_empty(shape, dtype=out_dtype)


@torch.library.custom_op("qlora_core::dequantize_4bit_into", mutates_args=("out",))
def _dequantize_into_op(out: _T, data: _T, absmax: _T, nested_absmax: _OptT, offset: _OptT, shape: list[int],
                        dtype: torch.dtype, blocksize: int, quant_type: str, double_quant: bool) -> None:
    _dequantize_into(out, q_from_args(data, absmax, nested_absmax, offset, shape, dtype, blocksize, quant_type,
                                      double_quant))


@_dequantize_into_op.register_fake
def _(out, data, absmax, nested_absmax, offset, shape, dtype, blocksize, quant_type, double_quant):
    return None
