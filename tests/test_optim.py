"""PagedAdamW on the CPU: 32-bit bit-identical to torch.optim.AdamW; each step (8- and 32-bit, weight decay
dominant) against a float64 AdamW formula, torch.optim.AdamW and bitsandbytes' CPU AdamW8bit / AdamW32bit started
from our state (tests/_adamw64.py); convergence, exact resume, simulated paging (bit-identical to unpaged, page
transfers counted), NaN/Inf handling, bad input, and the optimizer's Triton launches (multi-tensor, per segment,
paged in batches) under TRITON_INTERPRET=1 (subprocess). The update kernels alone: tests/test_adamw.py."""
import pytest
import torch

from qlora_core.formats import dynamic_map
from qlora_core.ops.quant4 import dequantize_blockwise_ref
from qlora_core import backend
from qlora_core.optim import PagedAdamW, max_lr
from tests import _adamw64 as R
from tests.helpers import run_interpreted

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


SHAPES = [(64, 100), (300,), (17, 33), (4099,), (3, 2000)]  # 8-bit, 32-bit (<4096), 32-bit, 8-bit tail, 8-bit


def _params(shapes=SHAPES, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes]


def _grads(step, shapes=SHAPES, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(s, generator=gen) * 0.01).to(dtype) for s in shapes]


def _run(opt, params, steps, first=0, shapes=SHAPES):
    for t in range(first, first + steps):
        for p, g in zip(params, _grads(t, shapes, params[0].dtype)):
            p.grad = g
        opt.step()


def _assert_same_state(a: dict, b: dict):
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


# ---- 32-bit: torch.optim.AdamW ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_32bit_follows_torch_adamw(dtype):
    ours, theirs = _params(dtype=dtype), _params(dtype=dtype)
    kw = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    a = PagedAdamW(ours, optim_bits=32, **kw)
    b = torch.optim.AdamW(theirs, foreach=False, **kw)
    if dtype == torch.bfloat16:  # torch keeps bf16 states for bf16 params; ours are fp32: compare to fp32 math
        b = torch.optim.AdamW(shadow := [torch.nn.Parameter(p.detach().float()) for p in theirs], **kw)
    for t in range(60):
        grads = _grads(t, dtype=dtype)
        for p, g in zip(ours, grads):
            p.grad = g
        for p, g in zip(theirs if dtype == torch.float32 else shadow, grads):
            p.grad = g.float()
        a.step()
        b.step()
        if dtype == torch.bfloat16:  # round the fp32 master to bf16 each step, as our bf16 params are
            for s in shadow:
                s.data.copy_(s.data.to(dtype).float())
    for p, q in zip(ours, theirs if dtype == torch.float32 else shadow):
        if dtype == torch.float32:
            assert torch.equal(p, q)  # same single-tensor math, op for op: bit-identical
        else:
            torch.testing.assert_close(p.float(), q, atol=0, rtol=0)
    st = a.state_dict()["state"][0]
    ref = b.state_dict()["state"][0]
    torch.testing.assert_close(st["exp_avg"], ref["exp_avg"], atol=0, rtol=0)
    assert st["step"].item() == ref["step"].item() == 60


def test_32bit_decoupled_decay_only():
    # With zero gradients the moments stay 0 and AdamW only decays: p_t = p_0 * (1 - lr*wd)^t exactly as torch.
    ours, theirs = _params(), _params()
    a = PagedAdamW(ours, lr=0.1, weight_decay=0.5)
    b = torch.optim.AdamW(theirs, lr=0.1, weight_decay=0.5, foreach=False)
    for _ in range(10):
        for p, q in zip(ours, theirs):
            p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
        a.step()
        b.step()
    for p, q, p0 in zip(ours, theirs, _params()):
        assert torch.equal(p, q)
        torch.testing.assert_close(p.double(), p0.double() * 0.95 ** 10, rtol=1e-6, atol=0)


# ---- one step from our own state: float64 formula, torch.optim.AdamW, bitsandbytes ---------------------------
# Every step the references restart from PagedAdamW's state (bitsandbytes' optimizer tests re-sync the same way),
# so each comparison sees one step's error and the tolerances are one step's (tests/_adamw64.py derives them).
# R.DECAY (lr 1e-2, wd 5) makes weight decay the largest term of a step, far above every parameter tolerance.
@pytest.mark.parametrize("bits", [8, 32])
def test_one_step_matches_float64_adamw_with_decay(bits):
    """Each step equals the float64 formula started from our state (tests/_adamw64.py: parameters within 4 fp32
    ulps + 2e-5 of the update, 8-bit codes the nearest to m / absmax and v / absmax, fp32 moments within 4 ulps);
    8-bit tensors decay after the update (bitsandbytes' CUDA order), fp32-state tensors before it (torch's)."""
    R.check_one_steps_against_float64(bits, "cpu")


@pytest.mark.parametrize("bits", [8, 32])
def test_one_step_matches_torch_adamw_with_decay(bits):
    """torch.optim.AdamW(foreach=False) started from our state each step: fp32-state tensors bit-identical;
    8-bit tensors equal torch's parameter minus the decay-order term lr*wd*update (torch decays first,
    bitsandbytes' CUDA kernel and ours after) within the parameter tolerance, codes the nearest to torch's own
    m / absmax and v / absmax."""
    for t, p0, st0, g, p, st in R.one_steps(bits):
        what = f"step {t}, shape {tuple(p.shape)}, {bits}-bit"
        m0, v0 = R.moments(st0, p.numel())
        pt = torch.nn.Parameter(p0.clone())
        ot = torch.optim.AdamW([pt], foreach=False, **R.DECAY)
        ot.state[pt] = {"step": torch.tensor(float(t - 1)), "exp_avg": m0.float().view(p.shape),
                        "exp_avg_sq": v0.float().view(p.shape)}
        pt.grad = g.clone()
        ot.step()
        mt, vt = ot.state[pt]["exp_avg"], ot.state[pt]["exp_avg_sq"]
        if "state1" not in st:
            assert torch.equal(p, pt.detach()), what
            assert torch.equal(st["exp_avg"], mt) and torch.equal(st["exp_avg_sq"], vt), what
            continue
        ref = R.adamw_step64(p0, g, m0.view(p.shape), v0.view(p.shape), t, **R.DECAY)
        want = pt.detach().double() - R.ORDER * ref.u  # (p + u)(1 - lr wd) = p(1 - lr wd) + u - lr wd u
        R.check_params(p, want, R.param_tolerance(p0, ref), what)
        R.check_8bit_state(st, mt.reshape(-1).double(), vt.reshape(-1).double(), what)


@pytest.mark.parametrize("bits", [8, 32])
def test_one_step_matches_bitsandbytes_cpu_with_decay(bits):
    """bitsandbytes 0.50.2's CPU AdamW8bit / AdamW32bit (both decay first) started from our state each step.
    Its CPU 8-bit quantizer is not the CUDA rule (it sends normalized values below ~1e-5 to code 7 of the
    unsigned map instead of the nearest code; 3% of v's codes here), so 8-bit states are compared by what the
    codes mean: within 1e-3 of their block's absmax except <0.5% of elements, never beyond 0.02 (a one-code flip
    at a midpoint: the widest gap of the signed map is 0.014); absmax within 3e-5 (bnb's CPU path uses the double
    1 - beta2, ours and its CUDA kernel the fp32 one: up to 1.3e-5). Parameters: as in the torch test (the 8-bit
    order term included); fp32 moments within 4 ulps."""
    bnb = pytest.importorskip("bitsandbytes", reason="test extra: bitsandbytes (its CPU build has the optimizers)")
    gen = torch.Generator().manual_seed(6)
    shape = (128, 300)
    po = torch.nn.Parameter(torch.randn(shape, generator=gen))
    pb = torch.nn.Parameter(po.detach().clone())
    peer = bnb.optim.AdamW8bit if bits == 8 else bnb.optim.AdamW32bit
    ob, oo = peer([pb], **R.DECAY), PagedAdamW([po], optim_bits=bits, **R.DECAY)
    q1, q2 = dynamic_map(True), dynamic_map(False)
    for t in range(1, R.ONE_STEPS + 1):
        g = torch.randn(shape, generator=gen) * 1e-2
        st0 = oo.state_dict()["state"].get(0)
        if st0 is not None:  # bitsandbytes restarts from our state and parameters
            sb = ob.state[pb]
            names = ("state1", "state2", "absmax1", "absmax2") if bits == 8 else ("exp_avg", "exp_avg_sq")
            for ours, theirs in zip(names, ("state1", "state2", "absmax1", "absmax2")):
                sb[theirs].copy_(st0[ours].view(sb[theirs].shape))
            with torch.no_grad():
                pb.copy_(po)
        m0, v0 = R.moments(st0, po.numel())
        p0 = po.detach().clone()
        pb.grad, po.grad = g.clone(), g.clone()
        ob.step()
        oo.step()
        sb, st = ob.state[pb], oo.state_dict()["state"][0]
        assert sb["step"] == t
        ref = R.adamw_step64(p0, g, m0.view(shape), v0.view(shape), t, **R.DECAY)
        want = pb.detach().double() - (R.ORDER * ref.u if bits == 8 else 0.0)  # bnb CPU decays first (torch test)
        R.check_params(po, want, R.param_tolerance(p0, ref), f"step {t}")
        if bits == 32:  # same formula in fp32, torch's op order against bnb's: a few ulps
            for k, theirs in (("exp_avg", "state1"), ("exp_avg_sq", "state2")):
                torch.testing.assert_close(st[k], sb[theirs], rtol=4 * R.EPS32,
                                           atol=4 * R.EPS32 * sb[theirs].abs().max().item())
            continue
        assert torch.equal(sb["qmap1"], q1) and torch.equal(sb["qmap2"], q2)
        for k, a, code in (("state1", "absmax1", q1), ("state2", "absmax2", q2)):
            assert sb[k].shape == st[k].shape and sb[k].dtype == st[k].dtype == torch.uint8
            torch.testing.assert_close(st[a], sb[a], rtol=3e-5, atol=0)
            scale = sb[a].double().repeat_interleave(256)[:sb[k].numel()]
            diff = (R.dequantize(st[k], st[a], code) - R.dequantize(sb[k], sb[a], code)).abs() / scale
            assert (diff > 1e-3).float().mean() < 5e-3 and diff.max() <= 0.02, (t, k, diff.max().item())


def test_8bit_converges_like_torch():
    # Honest end-to-end check: fit a least-squares problem; 8-bit and torch AdamW reach the same loss.
    torch.manual_seed(0)
    x, w_true = torch.randn(512, 64), torch.randn(64, 80)
    y = x @ w_true
    losses = {}
    for name in ("ours8", "torch"):
        w = torch.nn.Parameter(torch.zeros(64, 80))
        opt = PagedAdamW([w], lr=3e-2, optim_bits=8) if name == "ours8" else torch.optim.AdamW([w], lr=3e-2)
        for _ in range(150):
            loss = (x @ w - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[name] = loss.item()
    assert losses["ours8"] < 2e-2 * y.square().mean().item()
    assert losses["ours8"] < 1.5 * losses["torch"] + 1e-3, losses


def test_8bit_all_zero_block_and_nan_inf():
    # bnb-format.md §6: an all-zero block gives state1 0xFF, state2 0x00, absmax 0; a NaN/Inf gradient element
    # resets its m, v and leaves p alone, while its block's other elements update normally.
    p = torch.nn.Parameter(torch.randn(4096) * 0.1)
    opt = PagedAdamW([p], optim_bits=8)
    before = p.detach().clone()
    g = torch.randn(4096) * 0.01
    g[256:512] = 0.0  # block 1 entirely zero
    p.grad = g.clone()
    opt.step()
    st = opt.state_dict()["state"][0]
    assert (st["state1"][256:512] == 255).all() and (st["state2"][256:512] == 0).all()
    assert st["absmax1"][1] == 0 and st["absmax2"][1] == 0
    g = torch.randn(4096) * 0.01
    g[3], g[700], g[701] = float("nan"), float("inf"), float("-inf")
    p.grad = g
    mid = p.detach().clone()
    opt.step()
    st = opt.state_dict()["state"][0]
    q1, q2 = dynamic_map(True), dynamic_map(False)
    m = dequantize_blockwise_ref(st["state1"], st["absmax1"], q1)
    v = dequantize_blockwise_ref(st["state2"], st["absmax2"], q2)
    for i in (3, 700, 701):
        assert p[i] == mid[i] and m[i] == 0 and v[i] == 0
    assert torch.isfinite(p).all() and (p != mid).sum() == 4093
    assert not torch.equal(before, p)


# ---- exact resume, paging -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 32])
def test_resume_is_bit_identical(bits):
    a_params = _params()
    a = PagedAdamW(a_params, optim_bits=bits, lr=2e-3)
    _run(a, a_params, 4)
    sd = a.state_dict()
    b_params = [torch.nn.Parameter(p.detach().clone()) for p in a_params]
    b = PagedAdamW(b_params, optim_bits=bits, lr=1.0)  # lr comes back from the checkpoint
    b.load_state_dict(sd)
    assert b.param_groups[0]["lr"] == 2e-3
    _assert_same_state(sd, b.state_dict())
    _run(a, a_params, 4, first=4)
    _run(b, b_params, 4, first=4)
    for p, q in zip(a_params, b_params):
        assert torch.equal(p, q)
    _assert_same_state(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("bits", [8, 32])
def test_paging_simulated_bit_identical(bits):
    # CPU "device": 2 resident pages + 3 staging slots out of many 4 KiB pages; every non-resident page is loaded
    # and stored once per step, and the trajectory and state equal the unpaged optimizer's bit for bit.
    ref_params, paged_params = _params(), _params()
    ref = PagedAdamW(ref_params, optim_bits=bits)
    paged = PagedAdamW(paged_params, optim_bits=bits, page_bytes=4096, gpu_budget_bytes=5 * 4096)
    _run(ref, ref_params, 3)
    _run(paged, paged_params, 3)
    store = paged._store
    assert store.num_pages >= 8 and len(store.device_pages) == 2 and len(store.staging) == 3
    assert paged.state_device_bytes == 5 * 4096
    assert store.stats["h2d_pages"] == store.stats["d2h_pages"] == 3 * (store.num_pages - 2)
    paged.set_gpu_budget(6 * 4096)  # one more resident page: moved now, counted
    assert len(store.device_pages) == 3 and store.stats["h2d_pages"] == 3 * (store.num_pages - 2) + 1
    _run(ref, ref_params, 2, first=3)
    _run(paged, paged_params, 2, first=3)
    paged.set_gpu_budget(None)  # everything resident, no staging
    assert len(store.device_pages) == store.num_pages and not store.staging
    _run(ref, ref_params, 1, first=5)
    _run(paged, paged_params, 1, first=5)
    for p, q in zip(ref_params, paged_params):
        assert torch.equal(p, q)
    _assert_same_state(ref.state_dict(), paged.state_dict())


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("batch", [2, 3])
def test_batched_paging_bit_identical_to_unbatched(bits, batch):
    # Neighbouring pages move in one copy and update in one call per batch: same trajectory and state as one page
    # at a time and as unpaged, bit for bit; one copy each way per batch and step; budget changes keep it exact.
    ref_params, one_params, many_params = _params(), _params(), _params()
    ref = PagedAdamW(ref_params, optim_bits=bits)
    one = PagedAdamW(one_params, optim_bits=bits, page_bytes=4096, gpu_budget_bytes=5 * 4096, batch_pages=1)
    many = PagedAdamW(many_params, optim_bits=bits, page_bytes=4096, gpu_budget_bytes=(2 + 3 * batch) * 4096,
                      batch_pages=batch)
    for t in range(3):
        for o, ps in ((ref, ref_params), (one, one_params), (many, many_params)):
            _run(o, ps, 1, first=t)
    store = many._store
    assert store.batch_pages == batch and len(store.device_pages) == 2 and len(store.staging) == 3 * batch
    paged = store.num_pages - 2
    assert paged > 3 * batch  # the staging groups are reused within a step
    assert store.stats["h2d_pages"] == store.stats["d2h_pages"] == 3 * paged
    assert store.stats["h2d_copies"] == store.stats["d2h_copies"] == 3 * -(-paged // batch)
    assert len(one._store.device_pages) == 2 and one._store.stats["h2d_copies"] == 3 * paged
    for p, q, r in zip(ref_params, one_params, many_params):
        assert torch.equal(p, q) and torch.equal(p, r)
    many.set_gpu_budget((1 + 3 * batch) * 4096)  # one page fewer resident: moved now, counted
    assert len(store.device_pages) == 1 and store.stats["d2h_pages"] == 3 * paged + 1
    _run(ref, ref_params, 2, first=3)
    _run(many, many_params, 2, first=3)
    for p, q in zip(ref_params, many_params):
        assert torch.equal(p, q)
    _assert_same_state(ref.state_dict(), many.state_dict())


def test_step_paths_agree():
    # The fast path (all grads, lockstep) and the per-parameter path (a non-contiguous grad, then a missing
    # grad, after which the steps are out of lockstep for good) give the same result as the unpaged optimizer.
    shapes = [(64, 100), (100, 64), (5000,)]
    a_params, b_params = _params(shapes), _params(shapes)
    a = PagedAdamW(a_params, optim_bits=8, page_bytes=8192, gpu_budget_bytes=4 * 8192, batch_pages=1)
    b = PagedAdamW(b_params, optim_bits=8)
    for t in range(4):
        grads = _grads(t, shapes)
        for i, (p, q, g) in enumerate(zip(a_params, b_params, grads)):
            q.grad = g.clone()
            p.grad = g.t().contiguous().t() if (t == 1 and i == 0) else g.clone()  # same values, other strides
        if t == 2:
            a_params[1].grad = b_params[1].grad = None
        a.step()
        b.step()
        assert a._lockstep == (t < 2)
    for p, q in zip(a_params, b_params):
        assert torch.equal(p, q)
    _assert_same_state(a.state_dict(), b.state_dict())


def test_layout_splits_on_block_boundaries():
    from qlora_core.paging import layout
    segs, pages = layout([(70_000, 8), (100, 32), (5000, 8)], page_bytes=16384)
    for i, n in enumerate((70_000, 100, 5000)):
        mine = [s for s in segs if s.param == i]
        assert sum(s.count for s in mine) == n and mine[0].start == 0
        assert all(s.start % 256 == 0 for s in mine)
    for page in range(pages):
        used = sorted((s.offset, s.offset + s.nbytes) for s in segs if s.page == page)
        assert all(a[1] <= b[0] for a, b in zip(used, used[1:])) and used[-1][1] <= 16384


def test_8bit_size_threshold_and_state_format():
    # bnb's min_8bit_size: 4095 elements keep fp32 moments, 4096 get uint8 codes + fp32 absmax per 256 block
    shapes = [(4095,), (4096,), (64, 65)]
    params = _params(shapes)
    opt = PagedAdamW(params, optim_bits=8)
    _run(opt, params, 1, shapes=shapes)
    st = opt.state_dict()["state"]
    assert set(st[0]) == {"step", "exp_avg", "exp_avg_sq"} and st[0]["exp_avg"].dtype == torch.float32
    assert set(st[1]) == {"step", "state1", "state2", "absmax1", "absmax2"}
    assert st[1]["state1"].dtype == torch.uint8 and st[1]["absmax1"].shape == (16,)
    assert st[2]["state1"].shape == (64, 65) and st[2]["absmax2"].shape == (17,)  # 4160 elements, tail block
    # each array 64-byte aligned: 2*16384 (fp32 m, v of 4095) + 2*4096 + 2*64 + 2*4160 + 2*128 (17 absmax -> 128 B)
    assert opt.state_bytes == 2 * 16384 + 2 * 4096 + 2 * 64 + 2 * 4160 + 2 * 128


def test_params_without_grad_and_partial_steps():
    params = _params()
    opt = PagedAdamW(params, optim_bits=8)
    frozen = params[2].detach().clone()
    _run(opt, params, 1)
    params[2].grad = None
    params[0].grad = torch.randn_like(params[0]) * 0.01
    opt.step()
    sd = opt.state_dict()["state"]
    assert sd[0]["step"].item() == 2 and sd[2]["step"].item() == 1
    assert not torch.equal(params[2], frozen)  # stepped once, then not again


# ---- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1e-3), "learning rate"),
    (dict(lr=1e38), "fit in float32"),  # 10 x lr, the first step, overflows float32
    (dict(lr=3.5e36, betas=(0.99, 0.999)), "beta1 = 0.99"),  # 100 x lr does too
    (dict(optim_bits=16), "optim_bits"),
    (dict(betas=(1.0, 0.999)), "betas"),
    (dict(betas=(0.9, -0.1)), "betas"),
    (dict(eps=-1e-8), "epsilon"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(gpu_budget_bytes=-1), "gpu_budget_bytes"),
    (dict(page_bytes=100), "page_bytes"),
    (dict(batch_pages=0), "batch_pages"),
])
def test_bad_input_raises_named_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW(_params()[:1], **kwargs)


def test_largest_lr_steps_finitely():
    """max_lr's bound is tight: an lr just inside takes a finite first step in the reference (a float32 step size),
    one just outside is refused, so the bound neither refuses a usable lr nor lets an overflow through."""
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(4)
    lr = max_lr(0.9) * 0.999
    with backend.forced("reference"):
        PagedAdamW([p], lr=lr, optim_bits=32).step()
    assert torch.isfinite(p).all() and p.abs().min() > 1e37
    with pytest.raises(ValueError, match="fit in float32"):
        PagedAdamW([p], lr=max_lr(0.9) * 1.001, optim_bits=32)


def test_bad_state_dict_raises():
    params = _params()
    opt8 = PagedAdamW(params, optim_bits=8)
    _run(opt8, params, 1)
    opt32 = PagedAdamW([torch.nn.Parameter(p.detach().clone()) for p in params], optim_bits=32)
    with pytest.raises(ValueError, match="optim_bits"):
        opt32.load_state_dict(opt8.state_dict())
    with pytest.raises(ValueError, match="parameter groups"):
        PagedAdamW(params[:2], optim_bits=8).load_state_dict(opt8.state_dict())


# ---- the Triton launches of the optimizer under the interpreter ------------------------------------------------
# (the kernels themselves against the references: tests/test_adamw.py)
_INTERP = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process
import torch
from qlora_core import backend
from qlora_core.optim import PagedAdamW

torch.manual_seed(0)
fails = []
# the optimizer's multi-tensor launch path (paged, with a param lacking a grad -> per-segment fallback)
shapes = [(64, 100), (300,), (5000,), (2, 3000)]
for bits in (8, 32):
    P = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    Q = [torch.nn.Parameter(p.detach().clone()) for p in P]
    a = PagedAdamW(P, optim_bits=bits, gpu_budget_bytes=4 * 8192, page_bytes=8192)
    b = PagedAdamW(Q, optim_bits=bits)
    for t in range(3):
        for i, (p, q) in enumerate(zip(P, Q)):
            g = torch.randn_like(p) * 0.01
            p.grad, q.grad = (None, None) if (t == 1 and i == 3) else (g, g.clone())
        before = [p._version for p in P]
        with backend.forced("triton"):
            a.step()
        b.step()
        # in-place kernel writes must bump autograd's version counters (caches key on them: ops/nf4_linear.py)
        stale = [i for i, (p, v) in enumerate(zip(P, before)) if (p.grad is not None) != (p._version > v)]
        if stale:
            fails.append(("version", bits, t, stale))
    for i, (p, q) in enumerate(zip(P, Q)):
        exact = bits == 8 and p.numel() >= 4096
        if (exact and not torch.equal(p, q)) or not torch.allclose(p, q, atol=1e-7, rtol=1e-6):
            fails.append(("optimizer", bits, i, (p - q).abs().max().item()))
# batches of 2 pages through the Triton path: the resident region and each batch in one multi-tensor launch;
# grads at fresh addresses every step and a param whose storage moves (address tables must follow)
shapes = [(64, 100), (300,), (5000,), (2, 3000), (40, 130)]
for bits in (8, 32):
    P = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    Q = [torch.nn.Parameter(p.detach().clone()) for p in P]
    page = 4096 if bits == 8 else 8192
    a = PagedAdamW(P, optim_bits=bits, gpu_budget_bytes=7 * page, page_bytes=page, batch_pages=2)
    b = PagedAdamW(Q, optim_bits=bits)
    keep = []
    for t in range(3):
        keep.append(torch.empty(1000 * (t + 1)))  # shifts where the next grads land
        for p, q in zip(P, Q):
            g = torch.randn_like(p) * 0.01
            p.grad, q.grad = g, g.clone()
        if t == 2:
            P[2].data = P[2].data.clone()
        with backend.forced("triton"):
            a.step()
        b.step()
    assert a._store.resident == 1 and a._store.batch_pages == 2 and a._store.stats["h2d_copies"] > 3
    assert a._store.stats["h2d_copies"] < a._store.stats["h2d_pages"]
    for i, (p, q) in enumerate(zip(P, Q)):
        exact = bits == 8 and p.numel() >= 4096
        if (exact and not torch.equal(p, q)) or not torch.allclose(p, q, atol=1e-7, rtol=1e-6):
            fails.append(("batched", bits, i, (p - q).abs().max().item()))
print("FAILS", fails)
sys.exit(1 if fails else 0)
"""


def test_triton_launches_interpreter_match_reference():
    run_interpreted(_INTERP)
