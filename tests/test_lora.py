"""LoRALinear / apply_lora / merge / unmerge against float64 math (CPU reference path for the 4-bit base).

Reference: y64 = x64 @ W64.T + b64 + s * (x64 * mask) @ A64.T @ B64.T, where W64 is the dense weight, or for a
4-bit base the fp32 dequantized weight (the format spec) taken to float64, mask is the dropout mask drawn
under the same seed, and s = alpha / r (alpha / sqrt(r) with rslora). Tolerance (STYLE.md): 2x the max error of
PyTorch's own same-dtype computation of the same formula against y64, plus DTYPE_ATOL of the output dtype.
"""
import math

import pytest
import torch
from torch import nn

import qlora_core as qc
from qlora_core.ops.quant4 import dequantize_as
from qlora_core.lora import (LoraConfigError, LoRALinear, TargetModuleError, apply_lora, lora_modules,
                             merge_lora, unload_lora, unmerge_lora)
from qlora_core.qlinear import QuantLinear
from tests.helpers import DTYPE_ATOL, assert_close_verbose


def _bound(torch_out, ref64, dtype) -> float:
    return 2.0 * (torch_out.detach().cpu().double() - ref64.cpu()).abs().max().item() + DTYPE_ATOL[dtype]


def _base(kind, out_f, in_f, dtype, bias=True):
    """(module, W in dtype as the layer computes with it, W64 spec)."""
    w = torch.randn(out_f, in_f, dtype=dtype) / math.sqrt(in_f)
    b = torch.randn(out_f, dtype=dtype) if bias else None
    if kind == "dense":
        lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias:
                lin.bias.copy_(b)
        return lin, w, w.double()
    q = qc.quantize(w, quant_type=kind, blocksize=64, double_quant=True)
    return QuantLinear(q, b), dequantize_as(q, dtype), dequantize_as(q, torch.float32).double()


def _dropout_mask(seed, shape, p, dtype, device="cpu"):
    """The mask nn.Dropout draws first after manual_seed(seed) for a tensor of this shape, dtype and device."""
    if p == 0:
        return torch.ones(shape, dtype=torch.float64, device=device)
    torch.manual_seed(seed)
    return nn.functional.dropout(torch.ones(shape, dtype=dtype, device=device), p, training=True).double()


CASES = [  # base kind, x/base dtype, LoRA dtype, dropout, rslora
    ("dense", torch.float32, torch.float32, 0.0, False),
    ("dense", torch.float32, torch.float32, 0.3, True),
    ("dense", torch.bfloat16, torch.float32, 0.3, False),
    ("dense", torch.bfloat16, torch.bfloat16, 0.0, True),
    ("nf4", torch.float32, torch.float32, 0.0, False),
    ("nf4", torch.float32, torch.float32, 0.25, True),
    ("nf4", torch.bfloat16, torch.float32, 0.25, False),
    ("nf4", torch.bfloat16, torch.bfloat16, 0.1, False),
    ("fp4", torch.float16, torch.float32, 0.2, True),
]
DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,dtype,lora_dtype,p,rslora", CASES)
@pytest.mark.parametrize("lead,out_f,in_f,r", [((2, 5), 23, 37, 3), ((7,), 64, 130, 8)])
def test_forward_and_grads_vs_float64(kind, dtype, lora_dtype, p, rslora, lead, out_f, in_f, r, device):
    base, w, w64 = _base(kind, out_f, in_f, dtype)
    base, w = base.to(device), w.to(device)
    alpha = 7.0
    layer = LoRALinear(base, r=r, alpha=alpha, dropout=p, use_rslora=rslora, dtype=lora_dtype)
    with torch.no_grad():
        layer.lora_B.normal_()  # non-zero B so the LoRA path counts
    s = alpha / math.sqrt(r) if rslora else alpha / r
    assert layer.scaling == s and layer.lora_A.device.type == device
    x = torch.randn(*lead, in_f, dtype=dtype).to(device).requires_grad_()
    layer.train()
    mask = _dropout_mask(1234, x.shape, p, lora_dtype, device)
    torch.manual_seed(1234)
    y = layer(x)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)

    # float64 reference with autograd, on the CPU
    A64 = layer.lora_A.detach().cpu().double().requires_grad_()
    B64 = layer.lora_B.detach().cpu().double().requires_grad_()
    x64 = x.detach().cpu().double().requires_grad_()
    b64 = base.bias.detach().cpu().double()
    y64 = x64 @ w64.T + b64 + s * ((x64 * mask.cpu()) @ A64.T) @ B64.T
    y64.backward(g.cpu().double())

    # PyTorch's own same-dtype computation of the same formula on the device (base in dtype, LoRA in lora_dtype)
    At = layer.lora_A.detach().clone().requires_grad_()
    Bt = layer.lora_B.detach().clone().requires_grad_()
    xt = x.detach().clone().requires_grad_()
    h = xt.to(lora_dtype) * mask.to(lora_dtype)
    yt = (nn.functional.linear(xt, w, base.bias.to(dtype)) + (h @ At.T) @ Bt.T * s).to(dtype)
    yt.backward(g)

    assert_close_verbose(y, y64, atol=_bound(yt, y64.detach(), dtype), rtol=0, name="y")
    assert_close_verbose(layer.lora_A.grad, A64.grad, atol=_bound(At.grad, A64.grad, lora_dtype), rtol=0, name="dA")
    assert_close_verbose(layer.lora_B.grad, B64.grad, atol=_bound(Bt.grad, B64.grad, lora_dtype), rtol=0, name="dB")
    assert_close_verbose(x.grad, x64.grad, atol=_bound(xt.grad, x64.grad, dtype), rtol=0, name="dx")
    assert base.bias.grad is None  # frozen
    if kind == "dense":
        assert base.weight.grad is None


def test_dropout_only_touches_lora_path_and_is_off_in_eval():
    base, w, _ = _base("dense", 16, 40, torch.float32)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 40)
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(2)
    y2 = layer(x)
    assert not torch.equal(y1, y2)  # the mask is random in training
    layer.eval()
    y_eval = layer(x)
    ref = base(x) + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert_close_verbose(y_eval, ref, atol=1e-5, rtol=0, name="eval = no dropout")
    # with B = 0 the output is the base output whatever the mask: dropout never reaches the base input
    with torch.no_grad():
        layer.lora_B.zero_()
    layer.train()
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("dtype,lora_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
def test_fresh_adapter_is_a_noop_and_init_is_peft_default(kind, dtype, lora_dtype):
    base, _, _ = _base(kind, 24, 72, dtype)
    torch.manual_seed(7)
    layer = LoRALinear(base, r=5, alpha=16, dropout=0.2, dtype=lora_dtype)
    torch.manual_seed(7)
    expect_A = nn.init.kaiming_uniform_(torch.empty(5, 72, dtype=lora_dtype), a=math.sqrt(5))
    assert torch.equal(layer.lora_A.detach(), expect_A)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(72)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_B.dtype == lora_dtype
    x = torch.randn(3, 4, 72, dtype=dtype)
    layer.train()
    assert torch.equal(layer(x), base(x))


def _with_nonzero_B(layer, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return layer


@pytest.mark.parametrize("kind,dtype", [("dense", torch.float32), ("dense", torch.bfloat16),
                                        ("nf4", torch.float32), ("nf4", torch.bfloat16)])
@pytest.mark.parametrize("rslora", [False, True])
def test_merge_dense_result_matches_unmerged_forward(kind, dtype, rslora):
    base, w, w64 = _base(kind, 48, 96, dtype)
    layer = _with_nonzero_B(LoRALinear(base, r=6, alpha=12, use_rslora=rslora)).eval()
    x = torch.randn(5, 96, dtype=dtype)
    delta64 = layer.lora_B.double() @ layer.lora_A.double() * layer.scaling
    y64 = x.double() @ (w64 + delta64).T + base.bias.double()
    y_unmerged = layer(x).detach()
    merge_lora_layer = layer.merge  # the module method; merge_lora(model) is covered below
    merge_lora_layer(requantize=False)
    assert layer.merged and type(layer.base_layer) is nn.Linear and layer.base_layer.weight.dtype == dtype
    y_merged = layer(x).detach()
    # PyTorch's own best same-dtype merged layer: W rounded once from fp32
    w_torch = (w64.float() + delta64.float()).to(dtype) if kind == "dense" else \
        (dequantize_as(base.weight, torch.float32) + delta64.float()).to(dtype)
    y_torch = nn.functional.linear(x, w_torch, base.bias.to(dtype))
    assert_close_verbose(y_merged, y64, atol=_bound(y_torch, y64, dtype), rtol=0, name="merged")
    unmerged_torch = (nn.functional.linear(x, w, base.bias) +
                      (x.float() @ layer.lora_A.T.detach()) @ layer.lora_B.T.detach() * layer.scaling).to(dtype)
    assert_close_verbose(y_unmerged, y64, atol=_bound(unmerged_torch, y64, dtype), rtol=0, name="unmerged")


def _block_absmax_per_element(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = w.float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize).abs().amax(1)
    return blocks.repeat_interleave(blocksize)[: flat.numel()].reshape(w.shape)


@pytest.mark.parametrize("double_quant", [True, False])
def test_merge_requantize_is_quantize_of_merged_weight_within_nf4_error(double_quant):
    w = torch.randn(40, 70) / math.sqrt(70)
    q = qc.quantize(w, double_quant=double_quant)
    layer = _with_nonzero_B(LoRALinear(QuantLinear(q, torch.randn(40)), r=4, alpha=8)).eval()
    x = torch.randn(9, 70)
    merged_dense = (qc.dequantize(q).float() + layer.delta_weight()).to(q.dtype)
    layer.merge(requantize=True)
    q2 = layer.base_layer.weight
    assert isinstance(layer.base_layer, QuantLinear)
    assert (q2.quant_type, q2.blocksize, q2.double_quant) == (q.quant_type, q.blocksize, q.double_quant)
    expect = qc.quantize(merged_dense, quant_type="nf4", blocksize=64, double_quant=double_quant)
    assert torch.equal(q2.data, expect.data) and torch.equal(q2.absmax, expect.absmax)  # codes exact
    # NF4 error bound per element: half the widest NF4 gap (-1 .. -0.696) times the block absmax, plus the
    # 8-bit absmax error under double quant (half the dynamic map's top-decade step, ~0.0071, times the
    # largest |absmax - mean| <= max absmax).
    err_w = (dequantize_as(q2, torch.float32).double() - merged_dense.double()).abs()
    amax = _block_absmax_per_element(merged_dense, 64).double()
    bound_w = 0.5 * (1.0 - 0.6961928009986877) * amax + (0.0071 * amax.max() if double_quant else 0.0) + 1e-7
    assert bool((err_w <= bound_w).all()), f"max excess {(err_w - bound_w).max().item():.3e}"
    y_rq = layer(x).detach().double()
    y_dense = nn.functional.linear(x, merged_dense, layer.base_layer.bias).double()
    bound_y = x.double().abs() @ bound_w.T + DTYPE_ATOL[torch.float32]
    assert bool(((y_rq - y_dense).abs() <= bound_y).all())
    assert (y_rq - y_dense).abs().max() > 0  # requantization does change the weight


@pytest.mark.parametrize("kind,requantize", [("dense", False), ("nf4", False), ("nf4", True)])
def test_unmerge_restores_exactly(kind, requantize):
    model = nn.Sequential(nn.Linear(33, 48), nn.SiLU(), nn.Linear(48, 20))
    if kind == "nf4":
        model[0] = QuantLinear.from_linear(model[0])
        model[2] = QuantLinear.from_linear(model[2], double_quant=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=16, target_modules=["0", "2"])
    for m in lora_modules(model).values():
        _with_nonzero_B(m)
    x = torch.randn(4, 33)
    model.eval()
    y0 = model(x)
    bases = {n: m.base_layer for n, m in lora_modules(model).items()}
    assert merge_lora(model, requantize=requantize) == 2
    y_merged = model(x)
    assert not torch.equal(y_merged, y0) or kind == "dense"  # (dense fp32 merge may round to the same value)
    assert merge_lora(model) == 0  # idempotent
    assert all(n + ".lora_A" in model.state_dict() for n in bases)
    assert unmerge_lora(model) == 2
    for n, m in lora_modules(model).items():
        assert m.base_layer is bases[n] and not m.merged
    assert torch.equal(model(x), y0)
    after = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_apply_lora_counts_freezes_and_trains_only_adapters():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(32, 32), nn.Linear(32, 16, bias=False)
            self.up_proj = QuantLinear.from_linear(nn.Linear(32, 64))
            self.norm = nn.LayerNorm(32)

        def forward(self, x):
            h = self.norm(x)
            return x + self.q_proj(h) + self.v_proj(h).repeat(1, 1, 2) + self.up_proj(h)[..., :32]

    model = nn.Sequential(nn.Embedding(10, 32), Block(), Block())
    dense_total = sum(p.numel() for p in model.parameters())
    counts = apply_lora(model, r=3, alpha=6, target_modules=("q_proj", "v_proj", "up_proj"))
    lora = 3 * ((32 + 32) + (32 + 16) + (32 + 64))
    assert counts.trainable == 2 * lora
    assert counts.total == dense_total + 2 * lora + 2 * 64 * 32  # 4-bit weights by logical element count
    assert f"{counts.trainable:,}" in str(counts) and 0 < counts.fraction < 1
    assert set(lora_modules(model)) == {f"{i}.{n}" for i in (1, 2) for n in ("q_proj", "v_proj", "up_proj")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{m}.lora_{ab}" for m in lora_modules(model) for ab in "AB"}
    for m in lora_modules(model).values():
        _with_nonzero_B(m)
    model(torch.randint(0, 10, (2, 5))).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    # regex form (PEFT: fullmatch on the whole path) and a top-level target
    m2 = nn.Sequential(Block(), nn.Linear(4, 4))
    apply_lora(m2, r=2, target_modules=r"0\.(q|v)_proj")
    assert set(lora_modules(m2)) == {"0.q_proj", "0.v_proj"}
    m3 = nn.Sequential(Block(), nn.Linear(4, 4))
    apply_lora(m3, r=2, target_modules=["1"])
    assert set(lora_modules(m3)) == {"1"}


def test_unload_after_merge_gives_plain_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    apply_lora(model, r=2, target_modules=["0"])
    _with_nonzero_B(lora_modules(model)["0"])
    x = torch.randn(2, 8)
    y = model(x)
    merge_lora(model)
    unload_lora(model)
    assert type(model[0]) is nn.Linear and not hasattr(model, "lora_config")
    assert set(model.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert_close_verbose(model(x), y, atol=1e-5, rtol=0)


def test_quant_linear_state_dict_roundtrip_and_device_moves():
    ql = QuantLinear.from_linear(nn.Linear(70, 30))
    sd = ql.state_dict()
    assert set(sd) == {"bias", "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    other = QuantLinear.from_linear(nn.Linear(70, 30), double_quant=False)
    other.load_state_dict(sd, strict=True)
    assert other.weight.double_quant and torch.equal(other.weight.data, ql.weight.data)
    x = torch.randn(3, 70)
    assert torch.equal(other(x), ql(x))
    wrong = QuantLinear.from_linear(nn.Linear(71, 30))
    with pytest.raises(RuntimeError, match="shape"):
        wrong.load_state_dict(sd)
    # dtype casts reach the bias only; the packed state is never cast
    ql.to(torch.bfloat16)
    assert ql.bias.dtype == torch.bfloat16 and ql.weight.absmax.dtype == torch.uint8
    assert ql.weight.nested_absmax.dtype == torch.float32
    ql.to("meta")
    assert ql.weight.device.type == "meta" and ql.bias.device.type == "meta"


def test_quant_linear_state_dict_interchanges_with_bnb_linear4bit():
    bnb = pytest.importorskip("bitsandbytes", reason="test extra: bitsandbytes (4-bit quantizer runs on CPU)")
    lin = nn.Linear(70, 30)
    x = torch.randn(3, 70)
    # bitsandbytes -> ours: a Linear4bit state dict loads strictly into a QuantLinear and computes the same
    l4 = bnb.nn.Linear4bit(70, 30, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                           compress_statistics=True)
    l4.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=True)
    l4.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    l4 = l4.to("cpu")  # quantizes
    ql = QuantLinear.from_linear(nn.Linear(70, 30), double_quant=False)
    ql.load_state_dict(l4.state_dict(), strict=True)
    assert ql.weight.double_quant
    w_bnb = bnb.functional.dequantize_4bit(l4.weight.data, l4.weight.quant_state)
    assert torch.equal(qc.dequantize(ql.weight), w_bnb)
    assert_close_verbose(ql(x), l4(x), atol=DTYPE_ATOL[torch.float32], rtol=0, name="bnb -> ours")
    # ours -> bitsandbytes: the keys are what Params4bit.from_prequantized (transformers' loader) consumes
    sd = QuantLinear.from_linear(lin).state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    p = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats, requires_grad=False,
                                            device="cpu")
    assert torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state),
                       qc.dequantize(QuantLinear.from_linear(lin).weight))


def test_bad_inputs_raise_named_errors():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    for r in (0, -2, 2.5, True):
        with pytest.raises(LoraConfigError, match="r must"):
            apply_lora(model, r=r, target_modules=["0"])
    with pytest.raises(LoraConfigError, match="dropout"):
        apply_lora(model, r=2, dropout=1.0, target_modules=["0"])
    with pytest.raises(LoraConfigError, match="dtype"):
        apply_lora(model, r=2, dtype=torch.float16, target_modules=["0"])
    with pytest.raises(TargetModuleError, match="matches no module"):
        apply_lora(model, r=2, target_modules=["q_proj"])  # default-style name absent here
    with pytest.raises(TargetModuleError, match="not linear"):
        apply_lora(model, r=2, target_modules=["1"])
    with pytest.raises(TargetModuleError, match="no LoRA"):
        merge_lora(model)
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad  # failed calls changed nothing
    apply_lora(model, r=2, target_modules=["0"])
    with pytest.raises(TargetModuleError, match="already has LoRA"):
        apply_lora(model, r=2, target_modules=["0"])
    with pytest.raises(TypeError):
        LoRALinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(LoraConfigError):
        LoRALinear(nn.Linear(3, 3), r=0)
