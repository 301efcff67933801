"""torch.compile over qlora_core: the custom ops (quantize_4bit, dequantize_4bit, dequantize_4bit_into, nf4_linear
with its backward, adamw8bit_step, adamw32_step) against the eager calls, `torch.library.opcheck` on each, a tiny
NF4 + LoRA Llama compiled with fullgraph=True into ONE graph that gives the eager loss and LoRA grads, and the
optimizer step under compile.

Tolerances: the aot_eager backend runs the very same ATen ops and op bodies as eager, so its results must be
bit-identical (atol = rtol = 0). Inductor fuses and reorders the surrounding reductions (the bias grad's row sum),
so there the bias grad gets fp32 reduction slack (rtol 1e-5 for sums of 15 rows); the op outputs stay exact
because inductor calls the op's own body.
Compile times on the shared 2-core CPU box: the model ~15 s (aot_eager), inductor on one op ~25 s (the first
inductor compile in a process pays for its imports); the model-level test uses aot_eager for that reason.
"""
import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_core import quantize
from qlora_core.ops.adamw import adamw8bit_step, adamw32_step, adamw_coeffs
from qlora_core.ops.linear_ce import fused_linear_cross_entropy
from qlora_core.ops.nf4_linear import nf4_linear
from qlora_core.ops.quant4 import dequantize, dequantize_into, q_args
from qlora_core.ops.rmsnorm import rms_norm
from qlora_core.ops.rope import apply_rope_qkv_
from qlora_core.ops.swiglu import swiglu
from qlora_core.optim import PagedAdamW

from tests.helpers import assert_close_verbose

pytestmark = pytest.mark.usefixtures("one_thread")
OPS = ("quantize_4bit", "dequantize_4bit", "dequantize_4bit_into", "nf4_linear", "nf4_linear_input_grad",
       "adamw8bit_step", "adamw32_step", "rms_norm", "rms_norm_backward", "rope", "swiglu", "swiglu_backward",
       "fused_linear_cross_entropy")  # the block ops' opchecks are in tests/test_<op>.py


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _exact(a, b, name):
    assert_close_verbose(a, b, atol=0, rtol=0, name=name)


def _q_tensors(q):
    return [t for t in q_args(q)[:4] if t is not None]


class _OpLog(TorchDispatchMode):
    """Records the qlora_core custom ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "qlora_core":
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_ops_are_registered_with_fake_impls():
    from torch._library.simple_registry import singleton
    for name in OPS:
        qualname = getattr(torch.ops.qlora_core, name).default.name()  # "qlora_core::<name>"
        assert singleton.find(qualname).fake_impl.kernel is not None, qualname


def test_eager_calls_skip_the_dispatcher():
    """Eager mode calls the Python bodies directly (a custom op call costs ~130 us of dispatch)."""
    w = torch.randn(24, 64)
    x = torch.randn(5, 64, requires_grad=True)
    with _OpLog() as log:
        q = quantize(w)
        dequantize(q)
        nf4_linear(x, q).sum().backward()
        h = rms_norm(x, torch.ones(64), 1e-6)
        cos, sin = torch.ones(5, 16), torch.zeros(5, 16)
        h = apply_rope_qkv_(swiglu(h)[None] * 1, 2, cos, sin)[0]
        fused_linear_cross_entropy(h, torch.randn(7, 32), torch.arange(5)).backward()
    assert log.ops == []
    with _OpLog() as log:  # the log does see an op called directly
        torch.ops.qlora_core.dequantize_4bit(*q_args(q), torch.float32)
    assert log.ops == ["dequantize_4bit.default"]


@pytest.mark.parametrize("quant_type,double_quant,shape", [("nf4", True, (7, 129)), ("fp4", False, (33, 64)),
                                                           ("nf4", False, (300,))])
def test_quantize_and_dequantize_compiled_are_exact(quant_type, double_quant, shape):
    w = torch.randn(shape, dtype=torch.float32) * 0.1
    eager = quantize(w, quant_type, 64, double_quant)

    def f(w):
        q = quantize(w, quant_type, 64, double_quant)
        return (*_q_tensors(q), dequantize(q))

    cnt = CompileCounterWithBackend("aot_eager")
    got = torch.compile(f, backend=cnt, fullgraph=True)(w)
    want = (*_q_tensors(eager), dequantize(eager))
    assert cnt.frame_count == 1 and len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        _exact(a, b, f"output {i}")


def test_dequantize_into_row_ranges_compiled():
    qs = [quantize(torch.randn(n, 64) * 0.05, "nf4", 64, dq) for n, dq in ((16, True), (8, False))]

    def f():
        out = torch.empty(24, 64, dtype=torch.bfloat16)
        dequantize_into(qs[0], out[:16])
        dequantize_into(qs[1], out[16:])
        return out

    got = torch.compile(f, backend="aot_eager", fullgraph=True)()
    want = torch.cat([dequantize(q).to(torch.bfloat16) for q in qs])  # fp32 product rounded once either way
    _exact(got, want, "dequantize_into")


def _linear_case(bias=True):
    torch.manual_seed(1)
    q = quantize(torch.randn(48, 64) * 0.05, "nf4", 64, True)
    x = torch.randn(3, 5, 64, requires_grad=True)
    b = torch.randn(48, requires_grad=True) if bias else None
    gy = torch.randn(3, 5, 48)
    return q, x, b, gy


def _linear_run(fn, q, x, b, gy):
    y = fn(x, b)
    inputs = [x] if b is None else [x, b]
    return (y.detach(), *torch.autograd.grad(y, inputs, gy))


@pytest.mark.parametrize("bias", [True, False])
def test_nf4_linear_compiled_forward_and_backward_exact(bias):
    q, x, b, gy = _linear_case(bias)

    def f(x, b):
        return nf4_linear(x, q, b)

    cnt = CompileCounterWithBackend("aot_eager")
    got = _linear_run(torch.compile(f, backend=cnt, fullgraph=True), q, x, b, gy)
    want = _linear_run(f, q, x, b, gy)
    assert cnt.frame_count == 1
    for name, a, e in zip(("y", "dx", "dbias"), got, want):
        _exact(a, e, name)


def test_nf4_linear_inductor():
    q, x, b, gy = _linear_case()

    def f(x, b):
        return nf4_linear(x, q, b)

    y, dx, db = _linear_run(torch.compile(f, backend="inductor", fullgraph=True), q, x, b, gy)
    y0, dx0, db0 = _linear_run(f, q, x, b, gy)
    _exact(y, y0, "y")
    _exact(dx, dx0, "dx")
    assert_close_verbose(db, db0, atol=1e-6, rtol=1e-5, name="dbias")  # inductor's own row-sum order


def _opcheck(op, args):
    # test_aot_dispatch_dynamic / test_faketensor check the fake impls' shapes, dtypes and strides against the
    # real outputs; test_autograd_registration that nf4_linear's backward is registered.
    torch.library.opcheck(op, args)


def test_opcheck_quant_ops():
    w = torch.randn(7, 129)
    _opcheck(torch.ops.qlora_core.quantize_4bit.default, (w, 64, "nf4", True))
    _opcheck(torch.ops.qlora_core.quantize_4bit.default, (w, 32, "fp4", False))
    for dq in (True, False):
        q = quantize(w, "nf4", 64, dq)
        _opcheck(torch.ops.qlora_core.dequantize_4bit.default, (*q_args(q), torch.bfloat16))
        _opcheck(torch.ops.qlora_core.dequantize_4bit_into.default, (torch.empty(7, 129), *q_args(q)))


def test_opcheck_linear_ops():
    q, x, b, gy = _linear_case()
    _opcheck(torch.ops.qlora_core.nf4_linear.default, (x, *q_args(q), b))
    _opcheck(torch.ops.qlora_core.nf4_linear.default, (x.detach()[0], *q_args(q), None))
    _opcheck(torch.ops.qlora_core.nf4_linear_input_grad.default, (gy, *q_args(q)))


def _adam_state(n, seed):
    g = torch.Generator().manual_seed(seed)
    nb = -(-n // 256)
    return dict(p=torch.randn(n, generator=g), g=torch.randn(n, generator=g),
                s1=torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8),
                s2=torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8),
                a1=torch.rand(nb, generator=g) * 0.1, a2=torch.rand(nb, generator=g) * 0.01,
                m=torch.randn(n, generator=g) * 0.1, v=torch.rand(n, generator=g) * 0.01)


def test_opcheck_optimizer_ops():
    from qlora_core.formats import dynamic_map
    s = _adam_state(600, 0)
    k = list(dataclasses.astuple(adamw_coeffs(3, 1e-3, 0.9, 0.999, 1e-8, 0.01, 8)))
    _opcheck(torch.ops.qlora_core.adamw8bit_step.default,
             (s["p"], s["g"], s["s1"], s["s2"], s["a1"], s["a2"], dynamic_map(True), dynamic_map(False), k))
    k = list(dataclasses.astuple(adamw_coeffs(3, 1e-3, 0.9, 0.999, 1e-8, 0.01, 32)))
    _opcheck(torch.ops.qlora_core.adamw32_step.default, (s["p"], s["g"], s["m"], s["v"], k))


def test_adamw_step_ops_compiled_match_eager():
    """A compiled user-written update over flat tensors gives the eager update bit for bit, over 2 steps."""
    from qlora_core.formats import dynamic_map
    q1, q2 = dynamic_map(True), dynamic_map(False)

    def update(s, step):
        k8 = adamw_coeffs(step, 1e-2, 0.9, 0.999, 1e-8, 0.1, 8)
        k32 = adamw_coeffs(step, 1e-2, 0.9, 0.999, 1e-8, 0.1, 32)
        adamw8bit_step(s["p"], s["g"], s["s1"], s["s2"], s["a1"], s["a2"], q1, q2, k8)
        adamw32_step(s["p32"], s["g"], s["m"], s["v"], k32)

    states = []
    for run in (update, torch.compile(update, backend="aot_eager", fullgraph=True)):
        s = _adam_state(700, 3)
        s["p32"] = s["p"].clone()
        for step in (1, 2):
            run(s, step)
        states.append(s)
    for key in states[0]:
        _exact(states[1][key], states[0][key], key)


@pytest.mark.parametrize("bits", [8, 32])
def test_compiled_paged_adamw_step_matches_eager(bits):
    """torch.compile(opt.step) must not freeze the step's Python bookkeeping (it did: ~1e-2 off after 3 steps
    before PagedAdamW.step was marked torch.compiler.disable)."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(3, 7))]
        opt = PagedAdamW(ps, lr=1e-2, optim_bits=bits, weight_decay=0.1)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            step()
        results.append([p.detach().clone() for p in ps])
    for i, (a, b) in enumerate(zip(*results)):
        _exact(b, a, f"param {i}")


def _tiny_lora_llama(layers=2, model_type="llama"):
    from tests._tiny import nf4_lora_llama
    return nf4_lora_llama(layers, model_type)


def _loss_and_grads(model, ids, params):
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1))
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_compiled_nf4_lora_llama_is_one_graph_with_eager_loss_and_grads(model_type):
    """fullgraph=True: the whole forward is one Dynamo graph (it was 60 graphs before the custom ops), and its
    loss and LoRA grads equal eager's exactly. The grouped q/k/v, gate/up LinearGroup path (the default); the
    module-by-module path (QuantLinear -> nf4_linear) is compiled in the next test. qwen3: the q/k norms too."""
    model = _tiny_lora_llama(2, model_type)
    ids = torch.randint(0, 97, (2, 12))
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 14 * len(model.model.layers)
    loss0, grads0 = _loss_and_grads(model, ids, params)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    for _ in range(2):  # the second call reuses the graph (no recompile)
        loss1, grads1 = _loss_and_grads(compiled, ids, params)
    assert cnt.frame_count == 1
    assert all(g.abs().max() > 0 for g in grads0)
    _exact(loss1, loss0, "loss")
    for i, (a, b) in enumerate(zip(grads1, grads0)):
        _exact(a, b, f"grad {i}")
    # An optimizer-like in-place update of the adapters: the compiled graph reads them afresh (the grouped path's
    # packed-adapter cache is bypassed under compile; a stale copy would keep the old B).
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "lora_B" in n):
            p.mul_(3.0)
    loss2, _ = _loss_and_grads(compiled, ids, params)
    _exact(loss2, _loss_and_grads(model, ids, params)[0], "loss after the update")
    assert loss2 != loss1 and cnt.frame_count == 1


def test_compiled_model_serves_new_lengths_from_one_dynamic_graph():
    """The module-by-module path (QuantLinear -> nf4_linear, fuse_projections=False) with fullgraph=True: each
    length gives eager's loss and grads exactly, and after one recompile with a symbolic sequence length (which
    nf4_linear's fake impl must handle) a third length reuses that graph: nothing pins T (the sliding-window
    message and SDPA's is_causal used to). One layer, to keep it quick."""
    model = _tiny_lora_llama(1)
    for m in model.modules():
        if hasattr(m, "fuse_projections"):
            m.fuse_projections = False
    params = [p for p in model.parameters() if p.requires_grad]
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    for T in (12, 20, 9):
        ids = torch.randint(0, 97, (2, T))
        loss1, grads1 = _loss_and_grads(compiled, ids, params)
        loss0, grads0 = _loss_and_grads(model, ids, params)
        _exact(loss1, loss0, f"loss T={T}")
        for i, (a, b) in enumerate(zip(grads1, grads0)):
            _exact(a, b, f"grad {i} T={T}")
    assert cnt.frame_count == 2


def test_compiled_lora_dropout_with_checkpointing_is_one_graph(monkeypatch):
    """LoRA dropout under compile draws its masks in the graph (no host seed) and saves them for backward; with
    gradient checkpointing the recompute draws them again from the restored RNG state. The compiled model (its
    first call compiled, so no cached LinearGroup exists: building one inside the checkpoint was a side effect
    Dynamo refused) equals the same code run eagerly (backend.compiling patched to True: the same global-RNG
    draws in the same order), and the masks matter (the loss differs from dropout off)."""
    from qlora_core import backend
    from qlora_core.lora import lora_modules
    model = _tiny_lora_llama(1)
    for m in lora_modules(model).values():
        m.set_dropout(0.25)
    model.gradient_checkpointing = True
    ids = torch.randint(0, 97, (2, 12))
    params = [p for p in model.parameters() if p.requires_grad]
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    torch.manual_seed(7)
    loss1, grads1 = _loss_and_grads(compiled, ids, params)
    assert cnt.frame_count == 1
    with monkeypatch.context() as mp:
        mp.setattr(backend, "compiling", lambda: True)
        torch.manual_seed(7)
        loss0, grads0 = _loss_and_grads(model, ids, params)
    _exact(loss1, loss0, "loss")
    for i, (a, b) in enumerate(zip(grads1, grads0)):
        _exact(a, b, f"grad {i}")
    model.eval()
    assert not torch.equal(loss0, _loss_and_grads(model, ids, params)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_compiled_nf4_lora_llama_on_gpu(model_type):
    """The CPU tests' twin on the device, where the op bodies run the Triton kernels. First nf4_linear alone with
    fullgraph=True (the ops only: exact, as on the CPU); then the tiny model, one graph with fullgraph=True (the
    RMSNorm/RoPE/SwiGLU Triton paths are custom ops too), whose compiled loss and LoRA grads equal eager's."""
    q, x, b, gy = _linear_case()
    q, x, b, gy = q.to("cuda"), x.detach().cuda().requires_grad_(), b.detach().cuda().requires_grad_(), gy.cuda()

    def f(x, b):
        return nf4_linear(x, q, b)

    got = _linear_run(torch.compile(f, backend="aot_eager", fullgraph=True), q, x, b, gy)
    for name, a, e in zip(("y", "dx", "dbias"), got, _linear_run(f, q, x, b, gy)):
        _exact(a, e, name)

    model = _tiny_lora_llama(2, model_type).cuda()
    ids = torch.randint(0, 97, (2, 12), device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    loss0, grads0 = _loss_and_grads(model, ids, params)
    cnt = CompileCounterWithBackend("aot_eager")
    loss1, grads1 = _loss_and_grads(torch.compile(model, backend=cnt, fullgraph=True), ids, params)
    assert cnt.frame_count == 1
    # same kernels on both sides; the slack covers a cuBLAS algorithm that differs between the two call sites
    assert_close_verbose(loss1, loss0, atol=1e-6, rtol=1e-6, name="loss")
    for i, (a, b) in enumerate(zip(grads1, grads0)):
        assert_close_verbose(a, b, atol=1e-6, rtol=1e-5, name=f"grad {i}")
