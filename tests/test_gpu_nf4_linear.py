"""nf4_linear's Triton paths on a CUDA GPU against float64 math (run on the device: `pytest -m gpu`).

Reference: y64 = x64 @ W64.T + b64, dx64 = dy64 @ W64 with W64 the exact quantized weight (fp32 product
lut * absmax of the reference dequantization, as float64). Tolerance: 2x the error of PyTorch's own same-dtype
(cuBLAS) F.linear / matmul on W = dequantize(q) in x's dtype against it + DTYPE_ATOL (STYLE.md).
"""
import functools

import pytest
import torch
import triton
import triton.language as tl

import qlora_core as qc
from qlora_core.formats import code_table, dequant_table, dynamic_map
from qlora_core.kernels import nf4_decode, quant4
from qlora_core.kernels import nf4_linear as dispatch
from qlora_core.ops.nf4_linear import kernel_tables
from qlora_core.ops.quant4 import dequantize_as
from tests.helpers import DTYPE_ATOL, assert_close_verbose, assert_split_k_slot_sum, spy_split_k

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _ref_w(q, dtype):
    return dequantize_as(q, dtype)


def _bound(torch_out, ref64, dtype):
    return 2.0 * (torch_out.double() - ref64).abs().max().item() + DTYPE_ATOL[dtype]


@functools.lru_cache(maxsize=None)
def _q(n, k, dtype, quant_type="nf4", double_quant=True, blocksize=64):
    w = torch.randn(n, k, dtype=dtype, generator=torch.Generator().manual_seed(n * k)) * 0.02
    # quantize on the CPU reference so these tests depend only on this kernels
    return qc.quantize(w, quant_type, blocksize, double_quant).to("cuda")


LAYOUTS = [(4096, 4096, 64, "nf4", True), (1000, 1027, 64, "fp4", True), (333, 2048, 128, "nf4", False),
           (129, 520, 32, "nf4", True)]
# every layout in bf16 (the training dtype); fp16 and fp32 on one layout each (compile time on the device)
CASES = [(torch.bfloat16, *lay) for lay in LAYOUTS] + [(torch.float16, *LAYOUTS[0]), (torch.float32, *LAYOUTS[1])]


@pytest.mark.parametrize("dtype,n,k,bs,qt,dq", CASES)
@pytest.mark.parametrize("m", [1, 16, 17, 200])
def test_forward_and_dx_all_paths(dtype, n, k, bs, qt, dq, m):
    q = _q(n, k, dtype, qt, dq, bs)
    w = _ref_w(q, dtype)
    w64 = _ref_w(q, torch.float32).double()
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    b = torch.randn(n, dtype=dtype, device="cuda")
    t = kernel_tables(q)
    y64 = x.double() @ w64.T + b.double()
    bound = _bound(torch.nn.functional.linear(x, w, b), y64, dtype)
    # fp32 always dispatches to dequantize + cuBLAS (kernels/nf4_linear.py); the Triton fp32 paths are
    # covered by the interpreter tests
    if dtype == torch.float32:
        fwd_paths, dx_paths = ["cublas"], ["cublas"]
    else:
        fwd_paths, dx_paths = (["gemv", "cublas"] if m <= 128 else ["cublas"]), ["tiled", "cublas"]
    for path in fwd_paths + [None]:
        assert_close_verbose(dispatch.linear_forward(x, q, t, b, path=path), y64, atol=bound, rtol=0,
                             name=f"fwd {path}")
    dy = torch.randn(m, n, dtype=dtype, device="cuda")
    dx64 = dy.double() @ w64
    bound = _bound(dy @ w, dx64, dtype)
    for path in dx_paths + [None]:
        assert_close_verbose(dispatch.linear_input_grad(dy, q, t, path=path), dx64, atol=bound, rtol=0,
                             name=f"dx {path}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dq", [True, False])
def test_dequantize_to_other_dtype_bit_exact(dtype, dq):
    """The dequantize-then-cuBLAS path's buffer: quant4.dequantize_4bit(q, dtype=x's dtype) == the reference in
    that dtype, also when q was quantized from another dtype."""
    for src in (dtype, torch.float32):
        for q in (_q(777, 1536, src, "nf4", dq), _q(77, 99, src, "fp4", dq)):
            t = kernel_tables(q)
            assert torch.equal(quant4.dequantize_4bit(q, t.dequant, t.code256, dtype=dtype), _ref_w(q, dtype))


@pytest.mark.parametrize("lead", [(1,), (3, 5), (4, 300)])
def test_autograd_end_to_end(lead):
    dtype = torch.bfloat16
    q = _q(1024, 512, dtype)
    w = _ref_w(q, dtype)
    w64 = _ref_w(q, torch.float32).double()
    x = torch.randn(*lead, 512, dtype=dtype, device="cuda", requires_grad=True)
    b = torch.randn(1024, dtype=dtype, device="cuda", requires_grad=True)
    y = qc.nf4_linear(x, q, b)
    y64 = x.detach().double() @ w64.T + b.detach().double()
    assert_close_verbose(y, y64, atol=_bound(torch.nn.functional.linear(x.detach(), w, b.detach()), y64, dtype),
                         rtol=0, name="y")
    dy = torch.randn_like(y)
    y.backward(dy)
    dx64 = dy.double() @ w64
    assert_close_verbose(x.grad, dx64, atol=_bound(dy @ w, dx64, dtype), rtol=0, name="dx")
    db64 = dy.double().reshape(-1, 1024).sum(0)
    assert_close_verbose(b.grad, db64, atol=_bound(dy.reshape(-1, 1024).sum(0), db64, dtype), rtol=0, name="db")


def test_no_weight_kept_in_memory():
    # Large-M forward + backward: after each call, allocated memory grows by the output only; no (N, K) bf16
    # weight stays alive (the cuBLAS path's buffer is transient).
    n, k, m = 4096, 4096, 4096
    q = _q(n, k, torch.bfloat16)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    y = qc.nf4_linear(x, q)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
    assert kept < n * k * 2 // 8, f"forward kept {kept} bytes beyond its output (a bf16 W is {n * k * 2})"
    y.backward(torch.ones_like(y))
    del y
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base - x.grad.numel() * 2
    assert kept < n * k * 2 // 8, f"backward kept {kept} bytes beyond dx"


GEMV1_CASES = [(4096, 4096, 64, "nf4", True), (4096, 14336, 64, "nf4", True),
               (1001, 192, 64, "fp4", False), (333, 2048, 128, "nf4", False), (77, 1024, 256, "fp4", True),
               (5, 64, 64, "nf4", True)]


@triton.jit
def _decode_words_kernel(words_ptr, out_ptr, tlut_ptr, tab_ptr, n, ASM: tl.constexpr, USE_ASM: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(words_ptr + offs, mask=mask, other=0)
    tab = nf4_decode.load_tables(tab_ptr)
    t = nf4_decode.decode_word(w, tlut_ptr, tab, ASM, USE_ASM)
    for i in tl.static_range(8):
        tl.store(out_ptr + offs * 8 + i, t[i], mask=mask)


def _decode_words(words: torch.Tensor, quant_type: str, use_asm: bool) -> torch.Tensor:
    """Decode int32 words (n,) -> (n, 8) fp32 t values in decode order [1, 0, 3, 2, 5, 4, 7, 6] with
    nf4_decode.decode_word, the decode of the register-decode kernels."""
    n = words.numel()
    out = torch.empty((n, 8), dtype=torch.float32, device=words.device)
    t = nf4_decode.tables(code_table(quant_type), dequant_table(quant_type), dynamic_map(True), words.device)
    _decode_words_kernel[(triton.cdiv(n, 256),)](words, out, t.tlut, t.tab, n, ASM=nf4_decode.ASM, USE_ASM=use_asm,
                                                 BLOCK=256)
    return out


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_register_table_decode_is_exact_on_gpu(quant_type):
    """The compiled PTX decode (kernels/nf4_decode.py) gives exactly the table values, as the gather path does."""
    g = torch.Generator().manual_seed(1)
    words = torch.randint(-2**31, 2**31 - 1, (1 << 16,), dtype=torch.int64, generator=g).to(torch.int32)
    words[:16] = torch.arange(16, dtype=torch.int32) * 0x11111111  # every code in every slot
    t = torch.tensor(nf4_decode.t_values(code_table(quant_type)), dtype=torch.float32)
    shifts = torch.tensor([4 * i for i in range(8)])
    want = t[(words.to(torch.int64)[:, None] >> shifts) & 0xF]
    for use_asm in (True, False):
        got = _decode_words(words.cuda(), quant_type, use_asm).cpu()
        assert torch.equal(got, want), f"decode (use_asm={use_asm}) differs in {int((got != want).sum())} values"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,bs,qt,dq", GEMV1_CASES)
def test_gemv1_kernels_against_float64(dtype, n, k, bs, qt, dq, monkeypatch):
    """The one-row kernel (PTX and table decode, several tilings, split-K) is within the
    matmul tolerance of the float64 product, split-K runs and leaves its workspace zeroed, and dispatch uses it."""
    q = _q(n, k, dtype, qt, dq, bs)
    t = kernel_tables(q)
    w64 = _ref_w(q, torch.float32).double()
    x = torch.randn(1, k, dtype=dtype, device="cuda")
    b = torch.randn(n, dtype=dtype, device="cuda")
    y64 = x.double() @ w64.T + b.double()
    bound = _bound(torch.nn.functional.linear(x, _ref_w(q, dtype), b), y64, dtype)
    # few configs: every one is a separate compile per layout and dtype (device time)
    for cfg in (None, (2, 8, 1, 1, 0)):
        for use_asm in (True, False):
            assert_close_verbose(dispatch.gemv1(x, q, t, b, config=cfg, use_asm=use_asm), y64, atol=bound, rtol=0,
                                 name=f"gemv1 {cfg} asm={use_asm}")
    used = spy_split_k(monkeypatch.setattr)
    for split in (3, 3):  # repeated: each call must leave the tile counters zeroed for the next
        y = dispatch.gemv1(x, q, t, b, split_k=split)
        assert_close_verbose(y, y64, atol=bound, rtol=0, name=f"gemv1 split_k={split}")
    assert_split_k_slot_sum(used, y, b, "gemv1 split_k=3")
    assert_close_verbose(dispatch.linear_forward(x, q, t, b), y64, atol=bound, rtol=0, name="dispatch M=1")


@pytest.mark.parametrize("dtype,n,k,bs,qt,dq", [(torch.bfloat16, *c) for c in GEMV1_CASES[:5]]
                         + [(torch.float16, *GEMV1_CASES[3])])
def test_gemv_mma_against_float64(dtype, n, k, bs, qt, dq, monkeypatch):
    """The small-M tensor-core kernel (PTX and table decode, tilings, split-K, odd M) is within the matmul
    tolerance of the float64 product; dispatch uses it for 2..16 rows."""
    q = _q(n, k, dtype, qt, dq, bs)
    t = kernel_tables(q)
    w = _ref_w(q, dtype)
    w64 = _ref_w(q, torch.float32).double()
    used = spy_split_k(monkeypatch.setattr)
    for m in (2, 16, 17):
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        b = torch.randn(n, dtype=dtype, device="cuda")
        y64 = x.double() @ w64.T + b.double()
        bound = _bound(torch.nn.functional.linear(x, w, b), y64, dtype)
        for cfg, split in ((None, None), ((32, 2, 2, 1), 1)):
            for use_asm in (True, False):
                assert_close_verbose(dispatch.gemv_mma(x, q, t, b, config=cfg, split_k=split, use_asm=use_asm),
                                     y64, atol=bound, rtol=0, name=f"gemv_mma M={m} {cfg} split={split}")
        if m <= 16:
            assert_close_verbose(dispatch.linear_forward(x, q, t, b), y64, atol=bound, rtol=0, name=f"dispatch M={m}")
    y = dispatch.gemv_mma(x, q, t, b)  # the default split (MMA_SPLIT_K, at most one per K step) is > 1 here
    assert_split_k_slot_sum(used, y, b, f"gemv_mma M={m} default split")


@pytest.mark.parametrize("m, n, k", [(1, 1024, 4096), (8, 1024, 4096), (8, 4096, 4096), (8, 14336, 4096),
                                     (16, 4096, 14336)])  # gemv1 splits K only below 2048 rows
def test_split_k_decode_is_bitwise_reproducible(m, n, k, monkeypatch):
    """Decode-kernel outputs of 8B shapes are bitwise equal over 30 calls with the default split-K (the slots are
    summed in slot order whichever program arrives last; adding into one buffer in arrival order changed the last
    bits run to run, so seeded sampling diverged)."""
    dtype = torch.bfloat16
    q = _q(n, k, dtype)
    t = kernel_tables(q)
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    used = spy_split_k(monkeypatch.setattr)
    first = dispatch.linear_forward(x, q, t, None)
    assert_split_k_slot_sum(used, first, None, f"M={m} {n}x{k}")  # split-K really ran
    for i in range(30):
        y = dispatch.linear_forward(x, q, t, None)
        assert torch.equal(y, first), f"call {i}: {(y != first).sum().item()} of {y.numel()} outputs differ"


def test_split_k_inside_a_cuda_graph_captured_on_a_fresh_stream(monkeypatch):
    """torch.cuda.graph captures on its own side stream, which never ran the op eagerly: split-K still runs there
    (a workspace allocated inside the capture), replays are within the matmul tolerance of float64 each time (the
    graph zeroes its workspace at every replay), and no graph memory enters the eager workspace cache."""
    from qlora_core.kernels import splitk
    dtype = torch.bfloat16
    q = _q(4096, 4096, dtype)
    t = kernel_tables(q)
    w64 = _ref_w(q, torch.float32).double()
    x = torch.randn(16, 4096, dtype=dtype, device="cuda")
    y64 = x.double() @ w64.T
    bound = _bound(torch.nn.functional.linear(x, _ref_w(q, dtype)), y64, dtype)
    dispatch.gemv_mma(x, q, t, None, split_k=4)  # compile outside the capture
    torch.cuda.synchronize()
    cached = dict(splitk._WORKSPACE)
    calls = []
    real = splitk.workspace

    def spy(device, n, tiles):
        out = real(device, n, tiles)
        calls.append((torch.cuda.is_current_stream_capturing(), out[0].data_ptr()))
        return out

    monkeypatch.setattr(splitk, "workspace", spy)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = dispatch.gemv_mma(x, q, t, None, split_k=4)
    assert calls and calls[0][0], "split-K did not run inside the capture"
    assert all(ptr != ws.data_ptr() for _, ptr in calls for ws, _c in cached.values()), "used an eager pair"
    assert splitk._WORKSPACE.keys() == cached.keys(), "graph memory entered the eager cache"
    for rep in range(3):
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert_close_verbose(y, y64, atol=bound, rtol=0, name=f"graph replay {rep}")
