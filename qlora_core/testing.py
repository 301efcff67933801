"""Property tests for 4-bit quantizers: hypothesis strategies for weights, blocksizes and quant types, and the
properties our own quantizer is tested with, as plain functions that raise AssertionError (usable with pytest).

For people testing their own quantizer or kernel against ours: every `check_*` takes the quantize function to test
(default ours, `qlora_core.quantize`); a replacement must take (w, quant_type, blocksize, double_quant) and return a
QuantizedTensor (build one with `QuantizedTensor(data, absmax, ...)` around your own bytes). Needs hypothesis
(`pip install qlora-core[testing]`); `import qlora_core` does not.

Strategies: `quant_types()`, `blocksizes()`, `dtypes()`, `weights(...)` (tensors with exact zeros, all-zero blocks,
values within a few ulps of the NF4/FP4 decision thresholds, subnormals, blocks that straddle rows) and `cases()`
(a dict: w, quant_type, blocksize, double_quant).
Properties: `check_error_bound`, `check_idempotent`, `check_state_dict_round_trip`, `check_matches_reference`
(bitsandbytes' CUDA semantics as ops/quant4.py's reference path computes them: fp32 reciprocal per block, the
CUDA threshold tree, one fp32 multiply on the way back), and `check_all`.
"""
from __future__ import annotations

from typing import Callable

import torch
from hypothesis import strategies as st

from .defaults import FLOAT_DTYPES
from .formats import QUANT_TYPES, code_table, dynamic_map, fp4_thresholds, nf4_thresholds
from .ops import quant4
from .ops.quant4 import QuantizedTensor, dequantize, quantize

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
Quantizer = Callable[[torch.Tensor, str, int, bool], QuantizedTensor]


def quant_types() -> st.SearchStrategy[str]:
    """"nf4" or "fp4"."""
    return st.sampled_from(QUANT_TYPES)


def blocksizes(max_blocksize: int = 4096) -> st.SearchStrategy[int]:
    """Powers of two 32..max_blocksize (bitsandbytes' 4-bit blocksizes)."""
    return st.sampled_from([b for b in BLOCKSIZES if b <= max_blocksize])


def dtypes() -> st.SearchStrategy[torch.dtype]:
    """float32, float16 or bfloat16."""
    return st.sampled_from(list(FLOAT_DTYPES))


def thresholds(quant_type: str) -> torch.Tensor:
    """The fp32 decision thresholds on the normalized value xn in [-1, 1] (FP4's mirrored to negative xn)."""
    if quant_type == "nf4":
        return nf4_thresholds().clone()
    t = fp4_thresholds()[0]
    return torch.cat([-t.flip(0), t])


@st.composite
def weights(draw, dtype: torch.dtype | None = None, quant_type: str | None = None, blocksize: int | None = None,
            max_rows: int = 12, max_cols: int = 300) -> torch.Tensor:
    """A 1-D or 2-D finite weight tensor (dtype drawn unless given) that exercises the corner cases: a scale of
    10**(-3..3), exact zeros, an all-zero block, values a few ulps either side of a decision threshold times the
    block's absmax, subnormals of the dtype, and column counts that are not multiples of the blocksize (blocks
    straddling rows). quant_type / blocksize aim the threshold values (drawn unless given)."""
    dtype = dtype or draw(dtypes())
    quant_type = quant_type or draw(quant_types())
    blocksize = blocksize or draw(blocksizes())
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** draw(st.floats(-3, 3))
    x = (torch.randn(rows * cols, generator=g, dtype=torch.float64) * scale)
    n = x.numel()
    if draw(st.booleans()):  # exact zeros
        x[torch.rand(n, generator=g) < 0.2] = 0.0
    if n > blocksize and draw(st.booleans()):  # an all-zero block
        b = draw(st.integers(0, n // blocksize - 1))
        x[b * blocksize:(b + 1) * blocksize] = 0.0
    x = x.to(dtype)
    if draw(st.booleans()):  # values within a few ulps of the decision thresholds of the first block
        blk = x[:blocksize].double()
        amax = float(blk.abs().max())
        if amax > 0:
            t = thresholds(quant_type).double()
            k = min(blocksize, n) - 1
            idx = torch.randint(0, len(t), (k,), generator=g)
            v = (t[idx] * amax).to(dtype)
            for _ in range(draw(st.integers(-3, 3)) % 4):
                v = torch.nextafter(v, torch.full_like(v, draw(st.sampled_from([-1.0, 1.0])) * float("inf")))
            keep = x[:blocksize].abs().argmax()
            pos = torch.tensor([i for i in range(min(blocksize, n)) if i != keep][:k], dtype=torch.long)
            x[pos] = v[:len(pos)]
    if draw(st.booleans()):  # subnormals of the dtype
        tiny = torch.finfo(dtype).tiny
        m = torch.rand(n, generator=g) < 0.1
        x[m] = (torch.rand(int(m.sum()), generator=g, dtype=torch.float64) * tiny).to(dtype)
    return x.reshape(rows, cols) if draw(st.booleans()) else x


@st.composite
def cases(draw, max_blocksize: int = 4096) -> dict:
    """{"w": weights(...), "quant_type", "blocksize", "double_quant"}: one quantize call's arguments."""
    quant_type, blocksize = draw(quant_types()), draw(blocksizes(max_blocksize))
    return {"w": draw(weights(quant_type=quant_type, blocksize=blocksize)), "quant_type": quant_type,
            "blocksize": blocksize, "double_quant": draw(st.booleans())}


def _codes(q: QuantizedTensor) -> torch.Tensor:
    return quant4.unpack_nibbles(q.data, int(torch.Size(q.shape).numel()))


def code_gap(quant_type: str) -> torch.Tensor:
    """(16,) float64: for each code, the largest |level - xn| over the normalized values xn that encode to it (the
    farther edge of its bucket): the quantization error bound per code, in units of the block absmax."""
    t = thresholds(quant_type)
    edges = torch.cat([torch.tensor([-1.0, 1.0]), t, torch.nextafter(t, torch.full_like(t, 2.0)),
                       torch.nextafter(t, torch.full_like(t, -2.0))]).float()
    codes = quant4.encode_4bit(edges, quant_type).long()
    err = (code_table(quant_type).double()[codes] - edges.double()).abs()
    gap = torch.zeros(16, dtype=torch.float64)
    return gap.scatter_reduce(0, codes, err, "amax")


def check_error_bound(w: torch.Tensor, q: QuantizedTensor) -> None:
    """Every element: |dequantize(q) - w| <= absmax_b * code_gap[code] + |absmax_b - true absmax_b| + half an ulp
    of the dtype at the result (+ fp32 normalization rounding), with absmax_b the (de-nested) absmax q stores."""
    n, bs = w.numel(), q.blocksize
    x = w.reshape(-1).double()
    y = dequantize(q).reshape(-1).double()
    used = q.absmax_fp32().double().repeat_interleave(bs)[:n]
    true = x.abs().reshape(-1)
    true = torch.nn.functional.pad(true, (0, (-n) % bs)).view(-1, bs).amax(1).repeat_interleave(bs)[:n]
    gap = code_gap(q.quant_type)[_codes(q).long()]
    ulp = torch.finfo(q.dtype).eps * y.abs() + torch.finfo(q.dtype).tiny * torch.finfo(q.dtype).eps
    bound = used * gap + (used - true).abs() + ulp + 4 * torch.finfo(torch.float32).eps * true
    bad = (y - x).abs() > bound
    assert not bool(bad.any()), (f"{int(bad.sum())} element(s) beyond the error bound; first at flat index "
                                 f"{int(bad.nonzero()[0])}: w={float(x[bad][0])!r} got {float(y[bad][0])!r} "
                                 f"bound {float(bound[bad][0])!r}")


def check_idempotent(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool,
                     quantize_fn: Quantizer = quantize) -> None:
    """quantize(dequantize(quantize(w))) gives the same codes (FP4's -0 code 8 counted as code 0, since it
    dequantizes to +0), and without double quant the same absmax; with it the absmax within the 8-bit map's half gap
    times the nested absmax plus an ulp of the dtype (a subnormal ulp at the smallest absmax)."""
    q1 = quantize_fn(w, quant_type, blocksize, double_quant)
    q2 = quantize_fn(dequantize(q1), quant_type, blocksize, double_quant)
    c1, c2 = _codes(q1), _codes(q2)
    if quant_type == "fp4":
        c1 = torch.where(c1 == 8, 0, c1)
    assert torch.equal(c1, c2), f"codes changed on requantization at {int((c1 != c2).nonzero()[0])}"
    if not double_quant:
        assert torch.equal(q1.absmax, q2.absmax), "absmax changed on requantization"
    else:
        r1, r2 = q1.absmax_fp32(), q2.absmax_fp32()
        half_gap = dynamic_map(True).diff().max().item() / 2
        bound = (half_gap * q2.nested_absmax.repeat_interleave(256)[: r1.numel()] * (1 + 1e-5)
                 + torch.finfo(w.dtype).eps * r1.abs() + torch.finfo(w.dtype).tiny * torch.finfo(w.dtype).eps)
        assert bool(((r2 - r1).abs() <= bound).all()), "double-quant absmax moved beyond the 8-bit map's gap"


def check_state_dict_round_trip(q: QuantizedTensor, prefix: str = "layer.") -> None:
    """QuantizedTensor.from_state_dict(q.state_dict(prefix)) is q byte for byte: tensors, dtypes and settings."""
    q2 = QuantizedTensor.from_state_dict(q.state_dict(prefix), prefix)
    for f in ("data", "absmax", "nested_absmax", "offset"):
        a, b = getattr(q, f), getattr(q2, f)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), f"{f} differs"
    assert (q.shape, q.dtype, q.blocksize, q.quant_type, q.double_quant) == \
        (q2.shape, q2.dtype, q2.blocksize, q2.quant_type, q2.double_quant)
    assert torch.equal(dequantize(q), dequantize(q2))


def check_matches_reference(w: torch.Tensor, q: QuantizedTensor) -> None:
    """q (a quantization of w) has the codes of the reference of bitsandbytes' CUDA semantics
    (ops/quant4.quantize_4bit_ref: fp32 reciprocal per block, CUDA's threshold tree) and, without double quant, its
    absmax; and it dequantizes as the reference does from q's bytes and de-nested absmax (dequantize_4bit_ref: one
    fp32 multiply, rounded to the dtype). The double-quant absmax itself is checked by check_idempotent's bound."""
    data, absmax = quant4.quantize_4bit_ref(w, q.blocksize, q.quant_type)
    assert torch.equal(_codes(q), quant4.unpack_nibbles(data, w.numel())), "codes differ from the reference"
    if not q.double_quant:
        assert torch.equal(q.absmax.float(), absmax), "absmax differs from the reference"
    ref = quant4.dequantize_4bit_ref(q.data, q.absmax_fp32(), q.shape, q.dtype, q.blocksize, q.quant_type)
    assert torch.equal(dequantize(q), ref), "dequantized values differ from the reference"


def check_all(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool,
              quantize_fn: Quantizer = quantize) -> None:
    """The four properties above on one case."""
    q = quantize_fn(w, quant_type, blocksize, double_quant)
    check_error_bound(w, q)
    check_idempotent(w, quant_type, blocksize, double_quant, quantize_fn)
    check_state_dict_round_trip(q)
    check_matches_reference(w, q)


__all__ = ["quant_types", "blocksizes", "dtypes", "weights", "cases", "thresholds", "code_gap", "check_error_bound",
           "check_idempotent", "check_state_dict_round_trip", "check_matches_reference", "check_all"]
