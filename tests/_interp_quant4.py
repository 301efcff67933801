"""Worker for tests/test_quant4_interpret.py: runs kernels/quant4.py under the Triton CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, which a shared pytest process cannot promise,
so the test module runs this file in a fresh subprocess per group: `python tests/_interp_quant4.py GROUP`.
It prints one JSON line: {"group", "cases", "nfail", "failures" (first 20), "facts"}. Every comparison is
bit-exact against the reference in qlora_core/ops/quant4.py (the spec); "facts" lets the test assert that the
inputs really exercised the edge cases (zero blocks, exact ties, odd tails).
"""
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import warnings  # noqa: E402

import torch  # noqa: E402

from qlora_core import backend  # noqa: E402
from qlora_core.formats import code_table, dequant_table, dynamic_map, fp4_thresholds, nf4_thresholds  # noqa: E402
from qlora_core.ops import quant4 as ops  # noqa: E402
from qlora_core.kernels import quant4  # noqa: E402
from qlora_core.kernels.common import forced_tiling  # noqa: E402

warnings.filterwarnings("ignore")  # numpy's divide-by-zero / 0*inf warnings: zero blocks do that on purpose
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((1,), (2,), (3, 5), (7, 129), (130, 64), (33, 65))
BLOCKSIZES = (32, 64, 256, 4096)
THR = nf4_thresholds()  # the tables ops/quant4.py passes to the kernels


def _tables(q):
    return dequant_table(q.quant_type), dynamic_map(True)


def _threshold_values() -> torch.Tensor:
    """fp32 values exactly on every NF4/FP4 threshold and one ulp either side, both signs, plus 1.0 first
    so that a block starting with them has absmax 1 and r = 1 (xn == x exactly)."""
    t = torch.cat([nf4_thresholds(), fp4_thresholds()[0], -fp4_thresholds()[0]])
    vals = torch.cat([t, torch.nextafter(t, torch.tensor(2.0)), torch.nextafter(t, torch.tensor(-2.0))])
    return torch.cat([torch.ones(1), vals])


def make_input(shape, dtype, kind: str, blocksize: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3.0
    flat = x.view(-1)
    if kind == "special":
        n = flat.numel()
        flat[::7] = 0.0                 # exact zeros inside non-zero blocks
        flat[3::11] = -0.0
        nblocks = -(-n // blocksize)
        for b in range(1, nblocks, 3):  # whole zero blocks (absmax 0 -> NaN -> code 0), tail block included
            flat[b * blocksize:(b + 1) * blocksize] = 0.0
        if dtype == torch.float32 and n > 2:
            tv = _threshold_values()[: min(n, blocksize)]
            flat[: tv.numel()] = tv     # block 0: exact thresholds with absmax 1
        if n > 2 * blocksize and dtype == torch.float32:
            flat[blocksize + 1: blocksize + 5] = torch.tensor([1e-40, -1e-40, 3e-39, -1.2e-38])  # subnormals
    return x.to(dtype)


def _eq(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8),
                                                                     b.view(-1).view(torch.uint8))


def group_quant4(res):
    seed = 0
    for shape in SHAPES:
        for dtype in DTYPES:
            for qt in ("nf4", "fp4"):
                for bs in BLOCKSIZES:
                    for kind in ("randn", "special"):
                        seed += 1
                        x = make_input(shape, dtype, kind, bs, seed)
                        p, a = quant4.quantize_4bit(x, bs, qt, THR)
                        pr, ar = ops.quantize_4bit_ref(x, bs, qt)
                        res.check(_eq(p, pr) and _eq(a, ar), f"quantize {shape} {dtype} {qt} bs{bs} {kind}")
                        res.facts["zero_blocks"] += int((ar == 0).sum())
                        if x.numel() % 2:
                            res.facts["odd_tails"] += 1
                        if kind == "special" and dtype == torch.float32 and x.numel() > 2 and bs >= 64:
                            res.facts["threshold_blocks"] += 1


def group_dequant(res):
    seed = 100
    variants = [(16, True), (256, True), (64, False), (1024, True)]
    for shape in SHAPES:
        for dtype in DTYPES:
            for qt in ("nf4", "fp4"):
                for bs in BLOCKSIZES:
                    for dq in (False, True):
                        seed += 1
                        x = make_input(shape, dtype, "special", bs, seed)
                        with backend.forced("reference"):
                            q = ops.quantize(x, qt, bs, dq)
                        bb, join = variants[seed % len(variants)]
                        if x.numel() > 1000 and bb < 256:
                            bb *= 16  # tiny tiles on big shapes only cost interpreter time
                        y = quant4.dequantize_4bit(q, *_tables(q), block_bytes=bb, join=join)
                        yr = ops.dequantize_4bit_ref(q.data, q.absmax_fp32(), q.shape, q.dtype, bs, qt)
                        res.check(_eq(y, yr), f"dequantize {shape} {dtype} {qt} bs{bs} dq={dq} bb{bb} join={join}")


def _tie_values() -> torch.Tensor:
    """1.0 (absmax), every signed-map entry, every fp32 midpoint (a+b)*0.5 (exact ties) and their neighbours."""
    code = dynamic_map(True)
    mids = (code[:-1] + code[1:]) * 0.5
    return torch.cat([torch.ones(1), code, mids, torch.nextafter(mids, torch.tensor(2.0)),
                      torch.nextafter(mids, torch.tensor(-2.0))])


def group_blockwise(res):
    code = dynamic_map(True)
    seed = 200
    for n in (1, 7, 255, 256, 257, 1000, 3001):
        for bs in (64, 256, 4096):
            for kind in ("randn", "zeros", "ties"):
                seed += 1
                x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
                if kind == "zeros":
                    x[::5] = 0.0
                    x[bs: 2 * bs] = 0.0
                if kind == "ties":
                    tv = _tie_values()
                    for start in range(0, n, bs):  # every block starts with absmax 1 followed by ties
                        m = min(bs, n - start, tv.numel())
                        x[start:start + m] = tv[:m]
                q, a = quant4.quantize_blockwise(x, code, bs)
                qr, ar = ops.quantize_blockwise_ref(x, code, bs)
                res.check(_eq(q, qr) and _eq(a, ar), f"quantize_blockwise n{n} bs{bs} {kind}")
    # The tie input must actually exercise the CUDA rule (ties -> the even final pivot), which a nearest
    # search with ties to the lower index would not reproduce.
    tv = _tie_values()
    mids = tv[257:512]
    codes = ops.encode_8bit(mids, code).long()
    res.facts["ties_not_lower"] = int((codes != torch.arange(255)).sum())


def group_pipeline(res):
    seed = 300
    for shape in ((7, 129), (130, 64), (64, 300)):
        for dtype in DTYPES:
            for qt in ("nf4", "fp4"):
                for bs in (32, 64, 4096):
                    seed += 1
                    x = make_input(shape, dtype, "special", bs, seed)
                    with backend.forced("triton"):
                        q = ops.quantize(x, qt, bs, True)
                        y = ops.dequantize(q)
                    with backend.forced("reference"):
                        qr = ops.quantize(x, qt, bs, True)
                        yr = ops.dequantize(qr)
                    ok = (_eq(q.data, qr.data) and _eq(q.absmax, qr.absmax) and _eq(q.nested_absmax, qr.nested_absmax)
                          and _eq(q.offset, qr.offset) and _eq(y, yr))
                    res.check(ok, f"pipeline dq {shape} {dtype} {qt} bs{bs}")


def group_errors(res):
    x = torch.randn(64)
    cases = [
        (lambda: quant4.quantize_4bit(x, 48, "nf4", THR), ValueError, "power of two"),
        (lambda: quant4.quantize_4bit(x, 8192, "nf4", THR), ValueError, "power of two"),
        (lambda: quant4.quantize_4bit(x.to(torch.int32), 64, "nf4", THR), TypeError, "float32"),
        (lambda: quant4.quantize_4bit(torch.empty(0), 64, "nf4", THR), ValueError, "numel"),
        (lambda: quant4.quantize_4bit(torch.randn(8, 8).t(), 64, "nf4", THR), ValueError, "contiguous"),
        (lambda: quant4.quantize_4bit(x, 64, "int4", THR), ValueError, "quant_type"),
        (lambda: quant4.quantize_blockwise(x.view(8, 8), dynamic_map(True), 256), ValueError, "1-D"),
        (lambda: quant4.quantize_blockwise(x, dynamic_map(True)[:255], 256), ValueError, "(256,)"),
    ]
    for fn, exc, words in cases:
        try:
            fn()
            res.check(False, f"no error raised, expected {exc.__name__} mentioning {words!r}")
        except exc as e:
            res.check(words in str(e), f"{exc.__name__} message {str(e)!r} lacks {words!r}")
    with backend.forced("reference"):
        q = ops.quantize(x, "nf4", 64, False)
    q.data = q.data[:-1]
    try:
        quant4.dequantize_4bit(q, *_tables(q))
        res.check(False, "dequantize accepted truncated packed data")
    except ValueError as e:
        res.check("(n+1)//2" in str(e), f"dequantize message {str(e)!r}")


FLT_MIN = torch.finfo(torch.float32).tiny


def _ftz(v: torch.Tensor) -> torch.Tensor:
    """-ftz: subnormal -> zero of the same sign (bitsandbytes CUDA gives -0.0 for NF4 code 0 in a zero block)."""
    return torch.where(v.abs() < FLT_MIN, v * 0.0, v)


def bnb_cuda_quantize(x: torch.Tensor, bs: int, qt: str):
    """What bitsandbytes' CUDA kernels compute (fast-math: -ftz, nvcc-rounded NF4 literals), except that the
    reciprocal here is IEEE (the interpreter has no rcp.approx). Written from the CUDA semantics, not from
    the kernel: flush subnormal inputs, absmax, xn = flush(x * (1/absmax)), then the trees."""
    flat = _ftz(x.reshape(-1).float())
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, (-n) % bs)).view(-1, bs)
    absmax = blocks.abs().amax(dim=1)
    xn = _ftz(blocks * (1.0 / absmax)[:, None]).reshape(-1)[:n]
    if qt == "nf4":
        codes = torch.bucketize(xn, nf4_thresholds(), right=False)
    else:
        thr, bucket_codes = fp4_thresholds()
        codes = bucket_codes[torch.bucketize(xn.abs(), thr, right=False)].long() | torch.where(xn < 0, 8, 0)
    codes = torch.where(torch.isnan(xn), 0, codes).to(torch.uint8)
    return ops.pack_nibbles(codes, qt), absmax


def bnb_cuda_dequantize(q) -> torch.Tensor:
    """bitsandbytes CUDA dequant: nested restore ftz(code*absmax2) + offset, then ftz(lut * ftz(absmax));
    FP4 code 8 is 0 * absmax * -1 = -0.0."""
    if q.double_quant:
        scale = _ftz(dynamic_map(True)[q.absmax.long()] * _ftz(q.nested_absmax).repeat_interleave(256)[:q.nblocks])
        scale = scale + q.offset
    else:
        scale = q.absmax
    lut = code_table(q.quant_type).clone()
    if q.quant_type == "fp4":
        lut[8] = -0.0
    codes = ops.unpack_nibbles(q.data, q.numel).long()
    vals = _ftz(lut[codes] * _ftz(scale).repeat_interleave(q.blocksize)[:q.numel])
    return vals.to(q.dtype).reshape(q.shape)


def group_bnbmode(res):
    """mode="bnb" (GPU default) in the interpreter against bnb_cuda_quantize / bnb_cuda_dequantize."""
    seed, differs = 400, 0
    for shape in ((3, 5), (7, 129), (130, 64)):
        for dtype in DTYPES:
            for qt in ("nf4", "fp4"):
                for bs in (32, 256):
                    seed += 1
                    x = make_input(shape, dtype, "special", bs, seed).float()
                    flat = x.view(-1)
                    if flat.numel() > 3 * bs:  # subnormal inputs, an all-subnormal block, subnormal xn
                        flat[5::17] = 1e-39 * torch.randn(flat[5::17].shape)
                        flat[2 * bs:3 * bs] = -3e-39
                        flat[bs:bs + 8] = torch.tensor([4.0, -2e-38, 2e-38, -1.3e-38, 0.5, -0.5, 1e-3, -1e-3])
                    x = x.to(dtype)
                    p, a = quant4.quantize_4bit(x, bs, qt, THR, mode="bnb")
                    pe, ae = bnb_cuda_quantize(x, bs, qt)
                    res.check(_eq(p, pe) and _eq(a, ae), f"bnb-mode quantize {shape} {dtype} {qt} bs{bs}")
                    pr, _ = ops.quantize_4bit_ref(x, bs, qt)
                    differs += int(not _eq(p, pr))
                    for dq in (False, True):
                        with backend.forced("reference"):
                            q = ops.quantize(x, qt, bs, dq)
                        y = quant4.dequantize_4bit(q, *_tables(q), mode="bnb", block_bytes=64)
                        res.check(_eq(y, bnb_cuda_dequantize(q)),
                                  f"bnb-mode dequantize {shape} {dtype} {qt} bs{bs} dq={dq}")
                        res.facts["neg_zero_outputs"] = res.facts.get("neg_zero_outputs", 0) + int(
                            ((y == 0) & torch.signbit(y)).sum())
    res.facts["bnb_differs_from_reference"] = differs


class Result:
    def __init__(self, group):
        self.group, self.cases, self.failures = group, 0, []
        self.facts = {"zero_blocks": 0, "odd_tails": 0, "threshold_blocks": 0}

    def check(self, ok: bool, what: str):
        self.cases += 1
        if not ok:
            self.failures.append(what)


def group_gputiles(res):
    """quantize_4bit and quantize_blockwise with the tiles a GPU runs (kernels/common.TILING: 4096 and 2048 elements
    a program instead of 512), bit for bit against the reference as above, on shapes of more than one GPU tile with
    a partial last one (a few cases: the interpreter tiles ran the full grid in the groups above)."""
    seed = 400
    with forced_tiling("gpu"):
        for shape in ((130, 64), (33, 129)):
            for dtype in (torch.float32, torch.float16):
                for qt in ("nf4", "fp4"):
                    for bs in (32, 256):
                        seed += 1
                        x = make_input(shape, dtype, "special", bs, seed)
                        p, a = quant4.quantize_4bit(x, bs, qt, THR)
                        pr, ar = ops.quantize_4bit_ref(x, bs, qt)
                        res.check(_eq(p, pr) and _eq(a, ar), f"gpu tiles quantize {shape} {dtype} {qt} bs{bs}")
        code = dynamic_map(True)
        for n, bs in ((3001, 64), (5000, 256)):
            x = torch.randn(n, generator=torch.Generator().manual_seed(n))
            q, a = quant4.quantize_blockwise(x, code, bs)
            qr, ar = ops.quantize_blockwise_ref(x, code, bs)
            res.check(_eq(q, qr) and _eq(a, ar), f"gpu tiles quantize_blockwise n{n} bs{bs}")


GROUPS = {"quant4": group_quant4, "dequant": group_dequant, "blockwise": group_blockwise,
          "pipeline": group_pipeline, "errors": group_errors, "bnbmode": group_bnbmode, "gputiles": group_gputiles}

if __name__ == "__main__":
    res = Result(sys.argv[1])
    GROUPS[sys.argv[1]](res)
    print(json.dumps({"group": res.group, "cases": res.cases, "nfail": len(res.failures),
                      "failures": res.failures[:20], "facts": res.facts}))
