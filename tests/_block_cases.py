"""Cases for the block ops (rmsnorm, rope, swiglu, linear_ce: qlora_core/ops/<op>.py over kernels/<op>.py), shared
by the CPU interpreter tests (tests/test_<op>.py, small shapes) and the GPU tests (tests/test_gpu_<op>.py, odd and
8B shapes).

Each case builds inputs on a device, runs the op with the Triton backend forced, forward and backward, and
checks every output against float64 math on the same (rounded) inputs. Tolerance (STYLE.md): 2x the max error of
PyTorch's own same-dtype computation (the op's `*_ref`, i.e. llama.py's / train.py's code, with autograd)
against that float64 result, plus DTYPE_ATOL. Outputs the kernels allocate are poisoned with NaN first
(`poisoned()`), so an element a kernel fails to write shows up as a NaN mismatch.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from qlora_core import backend
from qlora_core.llama import rotate_half
from tests.helpers import DTYPE_ATOL, assert_close_verbose

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-6


@contextlib.contextmanager
def poisoned():
    """torch.empty / torch.empty_like return NaN-filled float tensors inside the block; yields a dict whose
    "calls" counts them (a test asserts it is > 0, so the poisoning provably reached the launchers)."""
    real_empty, real_like = torch.empty, torch.empty_like
    seen = {"calls": 0}

    def fill(t):
        if t.is_floating_point():
            seen["calls"] += 1
            t.fill_(math.nan)
        return t

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_like(*a, **k))
    try:
        yield seen
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def check(name: str, out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor, dtype: torch.dtype) -> None:
    """out within 2x PyTorch's same-dtype error (torch_out vs ref64) + DTYPE_ATOL of ref64; same dtype as torch_out."""
    assert out.dtype == torch_out.dtype, f"{name}: dtype {out.dtype} != {torch_out.dtype}"
    bound = 2.0 * (torch_out.double() - ref64).abs().max().item() + DTYPE_ATOL[dtype]
    assert_close_verbose(out, ref64, atol=bound, rtol=0, name=name)


def _grads(fn, inputs, dy):
    """Outputs of fn(*inputs) and the grads of (out * dy).sum() wrt the inputs that require grad."""
    out = fn(*inputs)
    wanted = [t for t in inputs if t.requires_grad]
    return out, torch.autograd.grad(out, wanted, dy)


# -- torch.compile: the custom ops --------------------------------------------------------------------------------
def compiled_matches_eager(name: str, fn, inputs, dy, ops: set[str]) -> int:
    """fn(*inputs) compiled (aot_eager, fullgraph=True) gives eager's output and input grads bit for bit (the same
    op bodies run on both sides), and its forward and backward graphs call the custom ops `ops` (qlora_core names,
    e.g. {"rms_norm", "rms_norm_backward"}) rather than tracing the bodies. No call may raise a graph break."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    seen = set()

    def record(gm, _):
        seen.update(n.target.name().split("::")[1].split(".")[0] for n in gm.graph.nodes
                    if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "qlora_core")
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    outs = []
    for f in (fn, compiled):
        xs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        outs.append(_grads(f, xs, dy.clone()))  # eager RoPE rotates the incoming gradient in place
    torch._dynamo.reset()
    (y0, g0), (y1, g1) = outs
    assert seen == ops, f"{name}: compiled graphs call {sorted(seen)}, expected {sorted(ops)}"
    assert_close_verbose(y1, y0, atol=0, rtol=0, name=f"{name} compiled output")
    for i, (a, b) in enumerate(zip(g1, g0)):
        assert a.dtype == b.dtype, f"{name} grad {i}: {a.dtype} != {b.dtype}"
        assert_close_verbose(a, b, atol=0, rtol=0, name=f"{name} compiled grad {i}")
    return 1 + len(g0)


# -- RMSNorm ------------------------------------------------------------------------------------------------------
def case_rmsnorm(shape, dtype, device, weight_grad: bool, weight_dtype=None, unit_offset=False) -> int:
    """unit_offset: Gemma's norm, y = cast(xhat * (1 + w)); its weights are centred on 0 (w ~ 0.2 N(0, 1))."""
    from qlora_core.kernels import rmsnorm as kernels
    from qlora_core.ops import rmsnorm
    d = shape[-1]
    x = torch.randn(shape, device=device).mul_(3.0).to(dtype).requires_grad_()
    w = (float(not unit_offset) + 0.2 * torch.randn(d, device=device)).to(weight_dtype or dtype)
    w.requires_grad_(weight_grad)
    dy = torch.randn(shape, device=device).to(dtype if unit_offset else torch.promote_types(dtype, w.dtype))
    norm = lambda a, b: rmsnorm.rms_norm(a, b, EPS, unit_offset)  # noqa: E731
    real_backward, dw_flags = kernels.rms_norm_backward, []
    kernels.rms_norm_backward = lambda *a, **k: dw_flags.append(k["compute_dw"]) or real_backward(*a, **k)
    try:
        with poisoned() as seen, backend.forced("triton"):
            y, g = _grads(norm, (x, w), dy)
    finally:
        kernels.rms_norm_backward = real_backward
    assert seen["calls"] >= 2, "rmsnorm: the poisoned allocator was not used"
    assert dw_flags == [weight_grad], f"rmsnorm: backward asked for dweight {dw_flags}, weight_grad={weight_grad}"
    y_t, g_t = _grads(lambda a, b: rmsnorm.rms_norm_ref(a, b, EPS, unit_offset), (x, w), dy)

    def f64(a, b):
        a = a.double()
        return (b.double() + unit_offset) * a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + EPS)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_(weight_grad)
    y64, g64 = _grads(f64, (x64, w64), dy.double())
    tag = f"rmsnorm {tuple(shape)} {dtype} w={w.dtype} dw={weight_grad} unit_offset={unit_offset}"
    check(f"{tag} y", y, y64, y_t, dtype)
    check(f"{tag} dx", g[0], g64[0], g_t[0], dtype)
    if weight_grad:
        check(f"{tag} dw", g[1], g64[1], g_t[1], w.dtype)
        with backend.forced("triton"):  # the dweight reduction has a fixed order: bitwise equal on a rerun
            _, again = _grads(norm, (x, w), dy)
        assert torch.equal(again[1], g[1]), f"{tag}: dweight differs between two identical runs"
    return 3 if weight_grad else 2


def op_rmsnorm(shape, dtype, device, weight_grad: bool, weight_dtype=None, unit_offset=False) -> int:
    """The Triton path's custom ops: opcheck of rms_norm and rms_norm_backward, and rms_norm compiled == eager."""
    from qlora_core.ops import rmsnorm
    x = torch.randn(shape, device=device).mul_(3.0).to(dtype).requires_grad_()
    w = (1.0 + 0.2 * torch.randn(shape[-1], device=device)).to(weight_dtype or dtype).requires_grad_(weight_grad)
    dy = torch.randn(shape, device=device).to(dtype if unit_offset else torch.promote_types(dtype, w.dtype))
    torch.library.opcheck(torch.ops.qlora_core.rms_norm.default, (x, w, EPS, unit_offset))
    _, rstd = torch.ops.qlora_core.rms_norm(x.detach(), w.detach(), EPS, unit_offset)
    torch.library.opcheck(torch.ops.qlora_core.rms_norm_backward.default,
                          (dy, x.detach(), w.detach(), rstd, weight_grad, unit_offset))
    with backend.forced("triton"):
        return 2 + compiled_matches_eager(f"rms_norm op {tuple(shape)} {dtype} w={w.dtype} dw={weight_grad} "
                                          f"unit_offset={unit_offset}",
                                          lambda a, b: rmsnorm.rms_norm(a, b, EPS, unit_offset), (x, w), dy,
                                          {"rms_norm", "rms_norm_backward"})


# -- RoPE ---------------------------------------------------------------------------------------------------------
def rope_tables(positions: torch.Tensor, D: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin as llama.py computes them (fp32 from integer positions (T,) or (B, T), theta 500000), in dtype."""
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=positions.device).float() / D))
    freqs = positions.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rope_llama(x, cos, sin, D):
    """llama.py's formula on x (B, T, n*D): (x * cos + rotate_half(x) * sin) per head, tables cast to x's dtype."""
    B, T, _ = x.shape
    xv = x.unflatten(-1, (-1, D))  # (B, T, n, D)
    c, s = (t.to(x.dtype).unsqueeze(-2) for t in (cos, sin))
    return (xv * c + rotate_half(xv) * s).flatten(-2)


def case_rope(B, T, H, KVH, D, dtype, device, per_row: bool, mode: str, table_dtype=None,
              impl: str = "triton") -> int:
    """mode: "qkv" (apply_rope_qkv_ on a fused projection output), "pair" (two non-view tensors, one launch),
    "views" (q and k column slices of one buffer). per_row: (B, T) positions, tables (B, T, D), passed as
    llama.py's (B, 1, T, D) in "pair" mode."""
    from qlora_core.ops import rope
    positions = torch.randint(0, 8192, (B, T), device=device) if per_row else torch.arange(T, device=device)
    cos, sin = rope_tables(positions, D, table_dtype or dtype)
    nq, nk = H * D, KVH * D
    base = torch.randn(B, T, nq + 2 * nk, device=device).to(dtype).requires_grad_()
    dq, dk = torch.randn(B, T, nq, device=device).to(dtype), torch.randn(B, T, nk, device=device).to(dtype)
    dv = torch.randn(B, T, nk, device=device).to(dtype)
    c_in, s_in = (cos[:, None], sin[:, None]) if per_row and mode == "pair" else (cos, sin)
    with backend.forced(impl):
        x = base * 1  # a non-leaf we may modify in place
        if mode == "qkv":
            out = rope.apply_rope_qkv_(x, H + KVH, c_in, s_in)
            assert out is x
            q, k = x[..., :nq], x[..., nq:nq + nk]
        elif mode == "views":
            q, k = rope.apply_rope_(x[..., :nq], x[..., nq:nq + nk], c_in, s_in)
        else:
            q, k = x[..., :nq] * 1, x[..., nq:nq + nk] * 1
            q2, k2 = rope.apply_rope_(q, k, c_in, s_in)
            assert q2 is q and k2 is k
        v = x[..., nq + nk:]
        (grad,) = torch.autograd.grad((q * dq).sum() + (k * dk).sum() + (v * dv).sum(), base)
    b = base.detach()
    tag = f"rope {impl} {mode} B={B} T={T} H={H}/{KVH} D={D} {dtype} tables={cos.dtype} per_row={per_row}"
    assert torch.equal(v, b[..., nq + nk:]), f"{tag}: value heads changed"
    assert torch.equal(grad[..., nq + nk:], dv), f"{tag}: value-head gradient changed"
    for name, sl, dout in (("q", slice(0, nq), dq), ("k", slice(nq, nq + nk), dk)):
        xin = b[..., sl]
        y_t, (g_t,) = _grads(lambda a: _rope_llama(a, cos, sin, D), (xin.clone().requires_grad_(),), dout)
        c64, s64 = cos.to(dtype).double(), sin.to(dtype).double()  # the cast to x's dtype is part of the spec
        y64, (g64,) = _grads(lambda a: _rope_llama(a, c64, s64, D), (xin.double().requires_grad_(),), dout.double())
        check(f"{tag} {name}", (q if name == "q" else k), y64, y_t, dtype)
        check(f"{tag} d{name}", grad[..., sl], g64, g_t, dtype)
    return 4


def op_rope(B, T, H, KVH, D, dtype, device, per_row: bool, table_dtype=None) -> int:
    """The Triton path's custom op: opcheck of rope (forward and backward rotation), and apply_rope_qkv_ and
    apply_rope_ on views of one buffer compiled == eager (the rotated heads, and the gradient reaching the buffer)."""
    from qlora_core.ops import rope
    positions = torch.randint(0, 8192, (B, T), device=device) if per_row else torch.arange(T, device=device)
    cos, sin = rope_tables(positions, D, table_dtype or dtype)
    nq, nk = H * D, KVH * D
    base = torch.randn(B, T, nq + 2 * nk, device=device).to(dtype).requires_grad_()
    dy = torch.randn(base.shape, device=device).to(dtype)
    for backward in (False, True):
        torch.library.opcheck(torch.ops.qlora_core.rope.default, (base[..., :nq + nk], cos, sin, backward))

    def views(b):
        x = b * 1  # a non-leaf we may modify in place
        rope.apply_rope_(x[..., :nq], x[..., nq:nq + nk], cos, sin)
        return x

    tag = f"rope op B={B} T={T} H={H}/{KVH} D={D} {dtype} tables={cos.dtype} per_row={per_row}"
    with backend.forced("triton"):
        n = compiled_matches_eager(f"{tag} qkv", lambda b: rope.apply_rope_qkv_(b * 1, H + KVH, cos, sin), [base],
                                   dy, {"rope"})
        return 2 + n + compiled_matches_eager(f"{tag} views", views, [base], dy, {"rope"})


# -- SwiGLU -------------------------------------------------------------------------------------------------------
def case_swiglu(M, I, dtype, device, fused: bool, inplace: bool, activation: str = "silu") -> int:
    """activation "gelu_tanh": GeGLU, against F.gelu(approximate="tanh") (PyTorch's own, float64 included)."""
    from qlora_core.ops import swiglu
    act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    gu = torch.randn(M, 2 * I, device=device).mul_(3.0)
    gu[0, :min(I, 6)] = torch.tensor([-100.0, -30.0, -0.0, 30.0, 100.0, 1e-3], device=device)[:min(I, 6)]
    gu = gu.to(dtype).requires_grad_()
    dy = torch.randn(M, I, device=device).to(dtype)
    with poisoned() as seen, backend.forced("triton"):
        x = gu * 1  # owned by this test, so backward may overwrite it (inplace)
        y = swiglu.swiglu(x, inplace_grad=inplace, activation=activation) if fused else \
            swiglu.swiglu(x[:, :I], x[:, I:], inplace_grad=inplace, activation=activation)
        (g,) = torch.autograd.grad(y, gu, dy)
    assert seen["calls"] >= 1 + (not inplace), "swiglu: the poisoned allocator was not used"
    split = lambda t: (t[:, :I], t[:, I:])  # noqa: E731
    y_t, g_t = _grads(lambda a: act(split(a)[0]) * split(a)[1], (gu.detach().clone().requires_grad_(),), dy)
    y64, g64 = _grads(lambda a: act(split(a)[0]) * split(a)[1], (gu.detach().double().requires_grad_(),),
                      dy.double())
    tag = f"{activation} M={M} I={I} {dtype} fused={fused} inplace={inplace}"
    check(f"{tag} out", y, y64, y_t, dtype)
    check(f"{tag} dgate", g[:, :I], g64[0][:, :I], g_t[0][:, :I], dtype)
    check(f"{tag} dup", g[:, I:], g64[0][:, I:], g_t[0][:, I:], dtype)
    return 3


def op_swiglu(M, I, dtype, device, fused: bool, activation: str = "silu") -> int:
    """The Triton path's custom ops: opcheck of swiglu and swiglu_backward, and swiglu compiled == eager, on the
    fused gu (M, 2I) or on gate and up (M, I)."""
    from qlora_core.ops import swiglu
    gu = torch.randn(M, 2 * I, device=device).mul_(3.0).to(dtype)
    args = [gu] if fused else [gu[:, :I].contiguous(), gu[:, I:].contiguous()]
    args = [t.requires_grad_() for t in args]
    dy = torch.randn(M, I, device=device).to(dtype)
    up = None if fused else args[1]
    torch.library.opcheck(torch.ops.qlora_core.swiglu.default, (args[0], up, activation))
    torch.library.opcheck(torch.ops.qlora_core.swiglu_backward.default,
                          (dy, args[0].detach(), None if fused else up.detach(), activation))
    with backend.forced("triton"):
        return 2 + compiled_matches_eager(f"swiglu op M={M} I={I} {dtype} fused={fused} {activation}",
                                          lambda *t: swiglu.swiglu(*t, activation=activation), args, dy,
                                          {"swiglu", "swiglu_backward"})


# -- fused lm_head + cross entropy --------------------------------------------------------------------------------
def ce_inputs(N, d, V, dtype, device, ignored: float, weight_grad: bool):
    """h (N, d), weight (V, d) with logits of std ~3 (a peaked softmax), targets with a fraction ignored (-100)."""
    h = torch.randn(N, d, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, d, device=device) * (3.0 / math.sqrt(d))).to(dtype).requires_grad_(weight_grad)
    y = torch.randint(0, V, (N,), device=device)
    y[torch.rand(N, device=device) < ignored] = -100
    if ignored >= 1.0:
        y.fill_(-100)
    return h, w, y


def loss_bound(h, w, y, loss64_rows: torch.Tensor, dtype) -> float:
    """2x PyTorch's own error of the summed loss, taken per row and summed (|errors| cannot cancel, so a lucky
    sum in PyTorch does not make the bound fail a kernel that is as accurate per row) plus 2x its summation
    error, + DTYPE_ATOL."""
    logits = F.linear(h.detach(), w.detach()).float()
    rows = F.cross_entropy(logits, y, reduction="none")
    total = F.cross_entropy(logits, y, reduction="sum")
    err = (rows.double() - loss64_rows).abs().sum().item() + abs(total.item() - rows.double().sum().item())
    return 2.0 * err + DTYPE_ATOL[dtype]


def case_ce(N, d, V, dtype, device, chunk_logits: int, weight_grad: bool, ignored: float = 0.25,
            impl: str = "triton") -> int:
    """ignored: fraction of targets set to -100 (1.0: all of them, loss 0 and zero gradients)."""
    from qlora_core.ops import linear_ce as ce
    h, w, y = ce_inputs(N, d, V, dtype, device, ignored, weight_grad)
    go = torch.tensor(1.5, device=device)  # a grad_output != 1 checks the scaling in backward
    with poisoned() as seen, backend.forced(impl):
        loss = ce.fused_linear_cross_entropy(h, w, y, chunk_logits=chunk_logits)
        g = torch.autograd.grad(loss, [t for t in (h, w) if t.requires_grad], go)
    assert impl != "triton" or seen["calls"] >= 3, "linear_ce: the poisoned allocator was not used"
    loss_t, g_t = _grads(lambda a, b: ce._chunk_ce(a, b, y, -100), (h, w), go)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_(weight_grad)
    rows64 = F.cross_entropy(h64 @ w64.T, y, reduction="none")
    g64 = torch.autograd.grad(rows64.sum(), [t for t in (h64, w64) if t.requires_grad], go.double())
    tag = f"ce {impl} N={N} d={d} V={V} {dtype} chunk={chunk_logits} dw={weight_grad} ignored={ignored}"
    assert loss.dtype == torch.float32 and loss.dim() == 0, f"{tag}: loss {loss.dtype} {tuple(loss.shape)}"
    assert_close_verbose(loss, rows64.sum().detach(), atol=loss_bound(h, w, y, rows64.detach(), dtype), rtol=0,
                         name=f"{tag} loss")
    check(f"{tag} dh", g[0], g64[0], g_t[0], dtype)
    if weight_grad:
        check(f"{tag} dw", g[1], g64[1], g_t[1], dtype)
    if impl == "triton":  # without grad mode the launcher runs alone, with no gradient work, same loss
        from qlora_core.kernels import linear_ce as kernels
        real_forward, flags = kernels.fused_linear_ce_forward, []
        kernels.fused_linear_ce_forward = lambda *a: flags.append(a[-2:]) or real_forward(*a)
        try:
            with torch.no_grad(), backend.forced(impl):
                loss_eval = ce.fused_linear_cross_entropy(h, w, y, chunk_logits=chunk_logits)
        finally:
            kernels.fused_linear_ce_forward = real_forward
        assert flags == [(False, False)] and torch.equal(loss_eval, loss), f"{tag}: no-grad path {flags}"
    if ignored >= 1.0:
        assert loss.item() == 0.0 and not g[0].any() and (not weight_grad or not g[1].any()), f"{tag}: not zero"
    return 3 if weight_grad else 2


def op_ce(N, d, V, dtype, device, chunk_logits: int, weight_grad: bool) -> int:
    """The Triton path's custom op: opcheck of fused_linear_cross_entropy (with and without dh), and the public
    function compiled == eager with grad_output 1.5 (the scaling in the op's gradient formula)."""
    from qlora_core.ops import linear_ce as ce
    h, w, y = ce_inputs(N, d, V, dtype, device, ignored=0.25, weight_grad=weight_grad)
    for need_dh in (True, False):
        torch.library.opcheck(torch.ops.qlora_core.fused_linear_cross_entropy.default,
                              (h, w, y, -100, chunk_logits, need_dh, weight_grad))
    with backend.forced("triton"):
        return 2 + compiled_matches_eager(f"ce op N={N} d={d} V={V} {dtype} chunk={chunk_logits} dw={weight_grad}",
                                          lambda a, b: ce.fused_linear_cross_entropy(a, b, y, -100, chunk_logits),
                                          (h, w), torch.tensor(1.5, device=device), {"fused_linear_cross_entropy"})
