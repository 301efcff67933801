"""PagedAdamW on a CUDA device: the Triton kernels against the float64 AdamW formula of tests/_adamw64.py (which
shares no coefficient function with them), against the CPU reference and bitsandbytes' CUDA AdamW8bit, real
paging (bit-identical to resident, no host synchronization in step), run-time budget changes, and checkpoints
moving between GPU and CPU. Run on the device with `pytest -m gpu tests/test_gpu_optim.py`."""
import pytest
import torch

from qlora_core.formats import dynamic_map
from qlora_core.optim import PagedAdamW
from tests import _adamw64 as R
from tests.helpers import bnb_cuda

pytestmark = pytest.mark.gpu

SHAPES = [(64, 300), (4099,), (257, 33), (100,), (3, 5000)]


def _params(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(device=device, dtype=dtype))
            for s in SHAPES]


def _grads(step, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    out = [(torch.randn(s, generator=gen) * 0.01).to(device=device, dtype=dtype) for s in SHAPES]
    out[0][3, 7] = float("nan")
    return out


def _same(a, b):
    """Bit-identical, NaN where NaN (32-bit states follow torch: a NaN gradient poisons its element)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _close_trajectory(a, b):
    """GPU (Triton, FMA-contracted) vs CPU reference after several steps: a code can flip at a midpoint and
    move that element's later updates by up to ~lr; bnb's own optimizer tests allow such stragglers
    (<= 15 mismatches of 1024x4097). Here: at most 0.1% of elements beyond (1e-6 + 1e-5 rel), none beyond
    1e-4 (0.1 lr), NaN where NaN."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    assert torch.equal(a.isnan(), b.isnan())
    diff = (a - b).abs().nan_to_num(0.0)
    bad = diff > 1e-6 + 1e-5 * b.abs().nan_to_num(0.0)
    assert bad.float().mean() <= 1e-3 and diff.max() <= 1e-4, (int(bad.sum()), diff.max().item())


def _run(opt, params, steps, first=0, device="cuda", dtype=torch.float32):
    for t in range(first, first + steps):
        for p, g in zip(params, _grads(t, device, dtype)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("solo", [False, True])
def test_cuda_one_step_matches_float64_adamw_with_decay(bits, solo, monkeypatch):
    """Each step of the Triton kernels equals the float64 formula started from the optimizer's own state, with
    weight decay the step's largest term (tests/_adamw64.py: parameters within 4 fp32 ulps + 2e-5 of the update,
    8-bit codes the nearest with bnb's sign fix, fp32 moments within 4 ulps). The kernels' FMA contraction moves m,
    v or p by an ulp, inside those bounds. solo=True sends every segment through the one-tensor kernel."""
    if solo:
        monkeypatch.setattr("qlora_core.optim.SOLO_SEGMENT", 1)
    R.check_one_steps_against_float64(bits, "cuda")


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("dtype,solo", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_cuda_matches_cpu_reference(bits, dtype, solo, monkeypatch):
    # Triton (CUDA) vs the PyTorch reference (CPU) over 20 steps: the same coefficients (ops/adamw.adamw_coeffs)
    # on both sides, so this checks the kernels' arithmetic and launch paths, and the float64 test above checks
    # the coefficients. They differ only by FMA contraction on the GPU (1 ulp in m or p), which can move a code
    # by one at a midpoint; parameters stay within a few ulps.
    # solo=True sends every segment through the one-tensor kernel (normally only segments >= 1M elements).
    if solo:
        monkeypatch.setattr("qlora_core.optim.SOLO_SEGMENT", 1)
    gpu, cpu = _params("cuda", dtype), _params("cpu", dtype)
    og = PagedAdamW(gpu, optim_bits=bits, weight_decay=0.1)
    oc = PagedAdamW(cpu, optim_bits=bits, weight_decay=0.1)
    _run(og, gpu, 20, dtype=dtype)
    _run(oc, cpu, 20, device="cpu", dtype=dtype)
    for a, b in zip(gpu, cpu):
        if dtype == torch.float32:
            _close_trajectory(a, b)
        else:  # bf16: a 1-ulp rounding difference (2^-7 relative at most) persists; <0.1% beyond it, none > 4
            a64, b64 = a.detach().cpu().double(), b.detach().double()
            assert torch.equal(a64.isnan(), b64.isnan())
            diff, ulp = (a64 - b64).abs().nan_to_num(0.0), 2 ** -7 * b64.abs().nan_to_num(0.0) + 1e-6
            assert (diff > ulp).float().mean() <= 1e-3 and (diff <= 4 * ulp).all(), diff.max()
    sg, sc = og.state_dict()["state"], oc.state_dict()["state"]
    for i in sg:
        if "state1" in sg[i]:
            for k in ("state1", "state2"):
                frac = (sg[i][k] != sc[i][k]).float().mean().item()
                assert frac < 2e-3, f"param {i} {k}: {frac:.2%} codes differ"
        assert sg[i]["step"].item() == sc[i]["step"].item() == 20


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("batch,page", [(1, 16384), (2, 8192)])
def test_paged_bit_identical_to_resident_and_no_sync(bits, batch, page):
    # batch 2: neighbouring pages move in one copy each way and update in one launch per batch
    ref, paged = _params("cuda"), _params("cuda")
    o_ref = PagedAdamW(ref, optim_bits=bits, gpu_budget_bytes=None, page_bytes=page)
    o_pag = PagedAdamW(paged, optim_bits=bits, gpu_budget_bytes=(2 + 3 * batch) * page, page_bytes=page,
                       batch_pages=batch)
    _run(o_ref, ref, 1)
    _run(o_pag, paged, 1)
    store = o_pag._store
    assert len(store.device_pages) == 2 and len(store.staging) == 3 * batch and store.num_pages > 2 + 3 * batch
    assert store.stats["h2d_copies"] == -(-(store.num_pages - 2) // batch)
    for t in range(1, 6):
        for p, g in zip(paged, _grads(t, "cuda")):
            p.grad = g
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # a host<->device synchronization inside step() raises
        try:
            o_pag.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    _run(o_ref, ref, 5, first=1)
    for a, b in zip(ref, paged):
        _same(a, b)
    sa, sb = o_ref.state_dict()["state"], o_pag.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            _same(sa[i][k], sb[i][k])
    assert store.stats["h2d_pages"] == store.stats["d2h_pages"] == 6 * (store.num_pages - 2)


@pytest.mark.parametrize("batch,page", [(1, 16384), (2, 8192)])
def test_set_gpu_budget_mid_training(batch, page):
    ref, moved = _params("cuda"), _params("cuda")
    o_ref = PagedAdamW(ref, optim_bits=8, page_bytes=page, gpu_budget_bytes=None)
    o_mov = PagedAdamW(moved, optim_bits=8, page_bytes=page, gpu_budget_bytes=None, batch_pages=batch)
    _run(o_ref, ref, 9)
    _run(o_mov, moved, 3)
    all_pages = o_mov._store.num_pages * page
    o_mov.set_gpu_budget((1 + 3 * batch) * page)  # shrink: 1 resident page + 3 staging groups
    assert o_mov.state_device_bytes == (1 + 3 * batch) * page and o_mov._store.resident == 1
    _run(o_mov, moved, 3, first=3)
    o_mov.set_gpu_budget(all_pages)  # grow back: everything resident, no staging
    assert o_mov.state_device_bytes == all_pages
    _run(o_mov, moved, 3, first=6)
    for a, b in zip(ref, moved):
        _same(a, b)


def test_gpu_checkpoint_loads_on_cpu_and_back():
    gpu = _params("cuda")
    og = PagedAdamW(gpu, optim_bits=8, gpu_budget_bytes=4 * 16384, page_bytes=16384)
    _run(og, gpu, 5)
    sd = og.state_dict()
    assert all(v.device.type == "cpu" for st in sd["state"].values() for v in st.values())
    cpu = [torch.nn.Parameter(p.detach().cpu().clone()) for p in gpu]
    oc = PagedAdamW(cpu, optim_bits=8)
    oc.load_state_dict(sd)
    sd_cpu = oc.state_dict()
    for i in sd["state"]:
        for k in sd["state"][i]:
            _same(sd["state"][i][k], sd_cpu["state"][i][k])
    back = [torch.nn.Parameter(p.detach().cuda().clone()) for p in gpu]
    ob = PagedAdamW(back, optim_bits=8, page_bytes=16384)  # resident, other layout than og: state is exact
    ob.load_state_dict(sd_cpu)
    _run(og, gpu, 4, first=5)
    _run(ob, back, 4, first=5)
    _run(oc, cpu, 4, first=5, device="cpu")
    for a, b, c in zip(gpu, back, cpu):
        _same(a, b)  # GPU -> CPU -> GPU resumes bit-identically
        _close_trajectory(c, a)  # the CPU resumes the same trajectory


# bitsandbytes' CUDA kernel computes 1 - beta2^t with __powf (fast-math exp2/log2 approximations, (2 + 1.16 t)
# ulps of beta2^t: up to ~2e-4 relative in 1 - beta2^t at these steps, 1e-4 in its square root, the update's
# scale), divides with __fdividef (2 ulps) and takes sqrtf under fast-math: 5e-4 of the update covers that.
BNB_CUDA_UPDATE_RTOL = 5e-4


def test_state_bytes_match_bnb_cuda_adamw8bit():
    """Same format and update as bitsandbytes' CUDA AdamW8bit with weight decay dominant (tests/_adamw64.py DECAY;
    bnb decays after the update, as we do): both restarted from bnb's state each step with the same gradient.
    Codes agree except at midpoints, absmax to 1e-5 relative, parameters within 4 fp32 ulps of the operands plus
    BNB_CUDA_UPDATE_RTOL of the update (decay alone moves 98% of them over 100 times further)."""
    bnb = bnb_cuda()
    torch.manual_seed(0)
    shape = (1024, 1031)
    p_bnb = torch.nn.Parameter(torch.randn(shape, device="cuda"))
    p_our = torch.nn.Parameter(p_bnb.detach().clone())
    ob = bnb.optim.AdamW8bit([p_bnb], **R.DECAY)
    oo = PagedAdamW([p_our], optim_bits=8, **R.DECAY)
    for t in range(10):
        g = torch.randn_like(p_bnb) * 1e-2
        st0 = None
        if t:
            st = ob.state[p_bnb]
            st0 = {k: st[k].cpu() for k in ("state1", "state2", "absmax1", "absmax2")}
            oo.load_state_dict({"param_groups": oo.state_dict()["param_groups"], "optim_bits": 8,
                                "state": {0: {"step": torch.tensor(float(st["step"])), **st0}}})
            p_our.data.copy_(p_bnb.data)
        m0, v0 = R.moments(st0, p_bnb.numel())
        p0 = p_bnb.detach().cpu().clone()
        p_bnb.grad, p_our.grad = g.clone(), g.clone()
        ob.step()
        oo.step()
        st, ours = ob.state[p_bnb], oo.state_dict()["state"][0]
        assert torch.equal(st["qmap1"].cpu(), dynamic_map(True)) and torch.equal(st["qmap2"].cpu(), dynamic_map(False))
        for k in ("state1", "state2"):
            frac = (st[k].cpu() != ours[k]).float().mean().item()
            assert frac < 1e-3, f"step {t}: {frac:.3%} of {k} differ"
        for k in ("absmax1", "absmax2"):
            torch.testing.assert_close(ours[k], st[k].cpu(), rtol=1e-5, atol=0)
        ref = R.adamw_step64(p0.reshape(-1), g.cpu().reshape(-1), m0, v0, t + 1, decay_first=False, **R.DECAY)
        tol = R.param_tolerance(p0, ref, BNB_CUDA_UPDATE_RTOL)
        assert (R.ORDER * p0.reshape(-1).double().abs() > 100 * tol).float().mean() > 0.98  # decay stays visible
        R.check_params(p_our, p_bnb.detach(), tol, f"step {t + 1} vs bitsandbytes CUDA")
