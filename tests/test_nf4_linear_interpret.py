"""The Triton kernels of nf4_linear run on the CPU under TRITON_INTERPRET=1, checked against float64 math.

TRITON_INTERPRET must be set before triton is first imported, and other test files may import it first, so
each group of cases runs in a fresh subprocess (`python tests/test_nf4_linear_interpret.py <group>`).
Reference: y64 = x64 @ W64.T + b64 and dx64 = dy64 @ W64 with W64 the exact quantized weight lut[code] * absmax
(the fp32 product of the CPU spec, before any rounding to x's dtype). Tolerance: 2x the error of PyTorch's
own same-dtype F.linear / matmul on dequantize(q) (rounded to x's dtype, as PyTorch users would run it)
against that reference, + DTYPE_ATOL (STYLE.md). Kernels may use the unrounded fp32 W (the M=1 decode path
does) or dequantize(q)'s rounded values (the tensor-core paths); both are held to the same bound.

The register-decode kernels (gemv1, gemv_mma) serve only some layouts (nf4_decode.decodable: bf16/fp16 x,
blocksize >= 64, K % blocksize == 0). DECODE_CASES names the cases they must serve; the test fails when one of
them is refused or when any other case is accepted, and asserts that every named case ran. Every case, served or
not, also goes through nf4_linear's dispatch, which must pick the expected kernel (gemv1 / gemv_mma, else the
generic gemv, and dequantize + matmul for fp32) and give a result within the same bound. Split-K checks assert
that a workspace was really requested, that its tile counters were reset, and that the output is bitwise the
slot-order sum of the partials (tests.helpers.assert_split_k_slot_sum: the fixed order that makes it reproducible).
"""
import sys

import pytest
import torch

GROUPS = ("dequant", "gemv", "gemv1", "gemv_mma", "cublas_fwd", "tiled_dx", "autograd")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (N, K, blocksize, quant_type, double_quant): aligned (K % blocksize == 0) and generic (odd K) layouts.
WEIGHTS = [(37, 192, 64, "nf4", True), (19, 65, 64, "fp4", False), (24, 256, 128, "nf4", False),
           (9, 130, 32, "fp4", True), (8, 128, 64, "fp4", True)]
# (weight, x dtype) cases the register-decode kernels must serve: aligned layouts, 16-bit x, both quant types.
DECODE_CASES = {
    "37x192/64/nf4/dq=True/bfloat16", "37x192/64/nf4/dq=True/float16",
    "24x256/128/nf4/dq=False/bfloat16", "24x256/128/nf4/dq=False/float16",
    "8x128/64/fp4/dq=True/bfloat16", "8x128/64/fp4/dq=True/float16",
}


def _check(name, out, ref64, torch_out, dtype):
    from tests.helpers import DTYPE_ATOL, assert_close_verbose
    assert out.dtype == dtype, f"{name}: dtype {out.dtype} != {dtype}"
    bound = 2.0 * (torch_out.double() - ref64).abs().max().item() + DTYPE_ATOL[dtype]
    assert_close_verbose(out, ref64, atol=bound, rtol=0, name=name)


def _weights(dtype):
    """(tag, q, W = dequantize(q) in dtype, W64 = exact fp32 product lut * absmax as float64)."""
    import qlora_core as qc
    from qlora_core.ops.quant4 import dequantize_as
    for n, k, bs, qt, dq in WEIGHTS:
        q = qc.quantize(torch.randn(n, k, dtype=dtype), quant_type=qt, blocksize=bs, double_quant=dq)
        yield (f"{n}x{k}/{bs}/{qt}/dq={dq}/{str(dtype).removeprefix('torch.')}", q, qc.dequantize(q),
               dequantize_as(q, torch.float32).double())


def _spy(module, name: str, record: list, label) -> None:
    """Replace module.name by a wrapper that appends label (or label(result)) to record: the kernels are called
    through their modules' globals, so this sees every call."""
    real = getattr(module, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        record.append(label(out) if callable(label) else label)
        return out

    setattr(module, name, spy)


def _expected_server(tag: str, m: int) -> str:
    if tag.endswith("/float32"):
        return "cublas"  # choose_path: fp32 always dequantizes and runs torch's matmul
    if tag in DECODE_CASES:
        return "gemv1" if m == 1 else "gemv_mma"
    return "gemv"


def _check_dispatch(x, q, w, w64, tag, served):
    """nf4_linear's default forward dispatch: the expected kernel serves x, within the matmul bound."""
    from qlora_core.kernels import nf4_linear
    from qlora_core.ops.nf4_linear import kernel_tables
    b = torch.randn(q.shape[0], dtype=x.dtype)
    served.clear()
    y = nf4_linear.linear_forward(x, q, kernel_tables(q), b)
    want = _expected_server(tag, x.shape[0])
    assert served == [want], f"dispatch M={x.shape[0]} {tag}: served by {served}, expected {want}"
    _check(f"dispatch M={x.shape[0]} {tag}", y, x.double() @ w64.T + b.double(),
           torch.nn.functional.linear(x, w, b), x.dtype)


def run_group(group: str) -> int:
    import qlora_core as qc
    from qlora_core import backend
    from qlora_core.kernels import nf4_linear, quant4, splitk
    from qlora_core.ops.nf4_linear import kernel_tables
    from qlora_core.ops.quant4 import dequantize_as
    from tests.helpers import assert_split_k_slot_sum, spy_split_k
    assert backend.interpreting()
    torch.manual_seed(0)
    checked = slot_sums = 0
    served, decoded = [], set()
    for name in ("gemv1", "gemv_mma", "gemv"):
        _spy(nf4_linear, name, served, name)
    _spy(quant4, "dequantize_4bit", served, "cublas")
    workspaces = spy_split_k(setattr)
    for dtype in DTYPES:
        for tag, q, w, w64 in _weights(dtype):
            n, k = q.shape
            t = kernel_tables(q)
            if group == "dequant":
                # bit-exact: same fp32 product, same round-to-nearest-even cast
                for out_dtype in DTYPES:
                    out = quant4.dequantize_4bit(q, t.dequant, t.code256, dtype=out_dtype)
                    want = dequantize_as(q, out_dtype)
                    assert torch.equal(out, want), f"quant4.dequantize_4bit(dtype=) differs: {tag} -> {out_dtype}"
                    checked += 1
            elif group == "gemv":
                for m, split in ((1, None), (1, 2), (3, None), (16, 2), (40, None)):
                    x = torch.randn(m, k, dtype=dtype)
                    b = torch.randn(n, dtype=dtype)
                    y64 = x.double() @ w64.T + b.double()
                    workspaces.clear()
                    y = nf4_linear.gemv(x, q, t, b, split_k=split)
                    _check(f"gemv M={m} split={split} {tag}", y, y64, torch.nn.functional.linear(x, w, b), dtype)
                    if workspaces:  # the launcher clamps split to the K steps: (1, 2) at K = 65 runs one split
                        assert_split_k_slot_sum(workspaces, y, b, f"gemv M={m} split={split} {tag}")
                        slot_sums += 1
                    checked += 1
            elif group == "gemv1":
                # the one-row decode kernel (table decode path; its PTX is checked by tests/test_nf4_linear_ptx.py)
                x = torch.randn(1, k, dtype=dtype)
                _check_dispatch(x, q, w, w64, tag, served)
                checked += 1
                if tag not in DECODE_CASES:
                    assert not nf4_linear.gemv1_supports(x, q), f"gemv1 now serves {tag}: name it in DECODE_CASES"
                    with pytest.raises(ValueError, match="gemv1 needs"):
                        nf4_linear.gemv1(x, q, t, None)
                    continue
                assert nf4_linear.gemv1_supports(x, q), f"gemv1 no longer serves {tag}"
                decoded.add(tag)
                # the default tiling ran in the dispatch check above; two more, one with split-K
                for cfg, split, bias in (((8, 4, 2, 1, 0), 1, False), ((2, 1, 1, 1, 1), 3, True)):
                    b = torch.randn(n, dtype=dtype) if bias else None
                    y64 = x.double() @ w64.T + (b.double() if bias else 0.0)
                    workspaces.clear()
                    for _ in range(2):  # twice: split-K must leave its counters zeroed for the next call
                        y = nf4_linear.gemv1(x, q, t, b, config=cfg, split_k=split)
                        _check(f"gemv1 cfg={cfg} split={split} {tag}", y, y64, torch.nn.functional.linear(x, w, b),
                               dtype)
                    if split > 1:
                        assert_split_k_slot_sum(workspaces, y, b, f"gemv1 split={split} {tag}")
                    checked += 1
            elif group == "gemv_mma":
                # the small-M tensor-core kernel (table decode path), with and without split-K
                _check_dispatch(torch.randn(2, k, dtype=dtype), q, w, w64, tag, served)
                checked += 1
                if tag not in DECODE_CASES:
                    x = torch.randn(2, k, dtype=dtype)
                    assert not nf4_linear.mma_supports(x, q), f"gemv_mma now serves {tag}: name it in DECODE_CASES"
                    with pytest.raises(ValueError, match="gemv_mma needs"):
                        nf4_linear.gemv_mma(x, q, t, None)
                    continue
                decoded.add(tag)
                for m, cfg, split in ((2, None, None), (16, (32, 4, 2, 1), 2), (33, (16, 2, 1, 1), 3)):
                    x = torch.randn(m, k, dtype=dtype)
                    assert nf4_linear.mma_supports(x, q), f"gemv_mma no longer serves {tag} at M={m}"
                    b = torch.randn(n, dtype=dtype)
                    y64 = x.double() @ w64.T + b.double()
                    workspaces.clear()
                    for _ in range(2):  # twice: split-K must leave its counters zeroed
                        y = nf4_linear.gemv_mma(x, q, t, b, config=cfg, split_k=split)
                        _check(f"gemv_mma M={m} cfg={cfg} split={split} {tag}", y, y64,
                               torch.nn.functional.linear(x, w, b), dtype)
                    if split is not None:
                        assert_split_k_slot_sum(workspaces, y, b, f"gemv_mma M={m} split={split} {tag}")
                    checked += 1
            elif group == "cublas_fwd":
                # the dequantize + matmul path
                for m, bias in ((17, True), (33, False)):
                    x = torch.randn(m, k, dtype=dtype)
                    b = torch.randn(n, dtype=dtype) if bias else None
                    y64 = x.double() @ w64.T + (b.double() if bias else 0.0)
                    _check(f"cublas-path fwd M={m} {tag}", nf4_linear.linear_forward(x, q, t, b, path="cublas"),
                           y64, torch.nn.functional.linear(x, w, b), dtype)
                    checked += 1
            elif group == "tiled_dx":
                for m in (1, 17, 40):
                    dy = torch.randn(m, n, dtype=dtype)
                    dx64 = dy.double() @ w64
                    _check(f"tiled dx M={m} {tag}", nf4_linear.matmul_dx(dy, q, t), dx64, dy @ w, dtype)
                    _check(f"cublas-path dx M={m} {tag}", nf4_linear.linear_input_grad(dy, q, t, path="cublas"),
                           dx64, dy @ w, dtype)
                    checked += 2
    if group == "autograd":
        # End to end through nf4_linear with the Triton backend forced on CPU tensors: default dispatch.
        # weights are quantized and dequantized by the reference (outside the forced block)
        cases = [(dtype, tag, q, w, w64) for dtype in DTYPES for tag, q, w, w64 in _weights(dtype)]
        with backend.forced("triton"):
            for dtype, tag, q, w, w64 in cases:
                n, k = q.shape
                for lead in ((1,), (2, 3), (3, 7)):  # M = 1, 6 (decode kernels), 21 (dequantize + matmul)
                    x = torch.randn(*lead, k, dtype=dtype, requires_grad=True)
                    b = torch.randn(n, dtype=dtype, requires_grad=True)
                    y = qc.nf4_linear(x, q, b)
                    y64 = x.detach().double() @ w64.T + b.detach().double()
                    _check(f"nf4_linear y {lead} {tag}", y, y64,
                           torch.nn.functional.linear(x.detach(), w, b.detach()), dtype)
                    dy = torch.randn_like(y)
                    y.backward(dy)
                    dx64 = dy.double() @ w64
                    _check(f"nf4_linear dx {lead} {tag}", x.grad, dx64, dy @ w, dtype)
                    db64 = dy.double().reshape(-1, n).sum(0)
                    _check(f"nf4_linear dbias {lead} {tag}", b.grad, db64, dy.reshape(-1, n).sum(0), dtype)
                    checked += 3
    if group == "gemv":
        assert slot_sums >= 10, f"gemv: split-K ran in only {slot_sums} cases"
    if group in ("gemv1", "gemv_mma"):
        assert decoded == DECODE_CASES, f"{group}: named decode cases that did not run: {DECODE_CASES - decoded}"
    print(f"{group}: {checked} checks passed")
    return checked


@pytest.mark.parametrize("group", GROUPS)
def test_kernels_under_interpreter(group):
    from tests.helpers import run_interpreter_group
    run_interpreter_group(__file__, group)


if __name__ == "__main__":
    sys.exit(0 if run_group(sys.argv[1]) > 0 else 1)
