"""PagedAdamW on row shards (what each FSDP rank runs) equals PagedAdamW on the whole parameter when the 8-bit blocks
line up, and optim_shards moves the state between layouts: exactly for fp32 states and lined-up 8-bit blocks,
within one 8-bit code (of the saved, dequantized moments) otherwise."""
import pytest
import torch

from qlora_core import optim_shards as S
from qlora_core.formats import dynamic_map
from qlora_core.optim import PagedAdamW
from qlora_core.ops.quant4 import dequantize_blockwise_ref

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 1e-2 for _ in range(steps)]


def _run(params, grads_per_param, bits, **kw):
    opt = PagedAdamW(params, lr=1e-2, weight_decay=0.01, optim_bits=bits, page_bytes=4096, **kw)
    for step_grads in zip(*grads_per_param):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return opt


def _whole_and_halves(shape, cut, bits, steps=3):
    """One optimizer over a whole (rows, cols) parameter and two over rows [0, cut) and [cut, rows), fed the same
    gradient rows (what FSDP's dim-0 shards see)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    grads = _grads(shape, steps)
    whole = torch.nn.Parameter(w.clone())
    halves = [torch.nn.Parameter(w[:cut].clone()), torch.nn.Parameter(w[cut:].clone())]
    opt = _run([whole], [grads], bits)
    parts = [_run([halves[0]], [[g[:cut] for g in grads]], bits),
             _run([halves[1]], [[g[cut:] for g in grads]], bits)]
    return whole, opt, halves, parts


def _sharded_form(parts, cut, rows):
    shape = tuple(parts[0].param_groups[0]["params"][0].shape)
    return {"format": S.FORMAT, "shapes": [(rows,) + shape[1:]],
            "ranks": [{"rows": [(0, cut)], "state": parts[0].state_dict()},
                      {"rows": [(cut, rows)], "state": parts[1].state_dict()}]}


@pytest.mark.parametrize("bits", [8, 32])
def test_row_shards_equal_the_whole_parameter(bits):
    """(64, 128) split at row 32: 4096 elements per shard, whole 256-blocks, so 8-bit states quantize the same
    blocks; every parameter element after 3 steps is bit-identical (the update is element-wise)."""
    whole, _, halves, _ = _whole_and_halves((64, 128), 32, bits)
    assert torch.equal(torch.cat([h.detach() for h in halves]), whole.detach())


@pytest.mark.parametrize("bits", [8, 32])
def test_two_shards_load_into_one_exactly_and_continue(bits):
    whole, opt, halves, parts = _whole_and_halves((64, 128), 32, bits)
    fresh = torch.nn.Parameter(whole.detach().clone())
    opt2 = PagedAdamW([fresh], lr=1e-2, weight_decay=0.01, optim_bits=bits, page_bytes=4096)
    S.load_state(opt2, _sharded_form(parts, 32, 64), rank=0, size=1)
    a, b = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    g = _grads((64, 128), 1, seed=5)[0]
    for p, o in ((whole, opt), (fresh, opt2)):
        p.grad = g.clone()
        o.step()
    assert torch.equal(fresh.detach(), whole.detach())


def _deq(st):
    return (dequantize_blockwise_ref(st["state1"].reshape(-1), st["absmax1"], dynamic_map(True)),
            dequantize_blockwise_ref(st["state2"].reshape(-1), st["absmax2"], dynamic_map(False)))


def test_unaligned_shards_recut_within_one_code():
    """(90, 100) split at row 41: shard blocks do not line up with the whole parameter's, so the 8-bit moments
    are re-quantized: each dequantized moment is within half the widest gap of the map times its new block's
    absmax of the saved value; fp32 states of the same layout move exactly."""
    _, _, _, parts = _whole_and_halves((90, 100), 41, 8)  # 4100 and 4900 elements: 8-bit states
    saved = _sharded_form(parts, 41, 90)
    entry = S._recut(0, (90, 100), saved["ranks"], (0, 90))
    truth = torch.cat([torch.stack(_deq(p.state_dict()["state"][0])) for p in parts], dim=1)  # (2, 9000)
    got = torch.stack(_deq(entry))
    for k, code in ((0, dynamic_map(True)), (1, dynamic_map(False))):
        gap = (code[1:] - code[:-1]).max()
        absmax = entry[f"absmax{k + 1}"].repeat_interleave(256)[:9000]
        # the bound is reached where a block's largest moment is negative: -1 lands on the map's end, -0.993
        assert ((got[k] - truth[k]).abs() <= gap / 2 * absmax * (1 + 1e-5)).all()
    assert entry["step"] == parts[0].state_dict()["state"][0]["step"]
    _, _, _, parts32 = _whole_and_halves((30, 100), 13, 32)
    e32 = S._recut(0, (30, 100), _sharded_form(parts32, 13, 30)["ranks"], (7, 21))
    ref = torch.cat([p.state_dict()["state"][0]["exp_avg"] for p in parts32])[7:21]
    assert torch.equal(e32["exp_avg"], ref)


def test_shape_mismatch_is_an_error():
    _, _, _, parts = _whole_and_halves((64, 128), 32, 32)
    opt = PagedAdamW([torch.nn.Parameter(torch.zeros(64, 64))], optim_bits=32)
    with pytest.raises(ValueError, match="parameter shapes"):
        S.load_state(opt, _sharded_form(parts, 32, 64), rank=0, size=1)
