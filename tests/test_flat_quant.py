"""FlatQuantLinear (the 4-bit weight as one flat Parameter of bytes, for FSDP2) is QuantLinear in every observable way:
forward and input gradient bit for bit, the bitsandbytes state dict byte for byte, dtype casts leave it alone, and a
LoRA Llama gives the same logits after flatten_quantized."""
import pytest
import torch

from qlora_core.flat_quant import ALIGN, STORAGE_DTYPE, FlatQuantLinear, flatten_quantized, pack, unpack
from qlora_core.qlinear import QuantLinear
from qlora_core.ops.quant4 import quantize

CASES = [("nf4", True, True), ("nf4", False, False), ("fp4", True, False), ("fp4", False, True)]


def _pair(quant_type, double_quant, bias, out_f=48, in_f=160):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    q = quantize(w, quant_type=quant_type, blocksize=64, double_quant=double_quant)
    return QuantLinear(q, b), FlatQuantLinear(q, b)


@pytest.mark.parametrize("quant_type,double_quant,bias", CASES)
def test_forward_backward_and_state_dict_equal_quantlinear(quant_type, double_quant, bias):
    ref, flat = _pair(quant_type, double_quant, bias)
    x = torch.randn(3, 5, 160, requires_grad=True)
    y_ref = ref(x)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    y = flat(x)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    sd_ref, sd = ref.state_dict(), flat.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert sd[k].dtype == sd_ref[k].dtype and torch.equal(sd[k], sd_ref[k]), k
    # standalone tensors: safetensors refuses tensors that share one buffer
    assert len({v.untyped_storage().data_ptr() for v in sd.values()}) == len(sd)


def test_layout_aligned_views_without_copy_and_casts_leave_it():
    _, flat = _pair("nf4", True, True)
    q = flat.weight
    base = flat.packed.data_ptr()
    assert flat.packed_bytes().numel() == flat.layout.nbytes and flat.packed_bytes().data_ptr() == base
    for t in (q.data, q.absmax, q.nested_absmax, q.offset):
        assert base <= t.data_ptr() < base + flat.layout.nbytes and (t.data_ptr() - base) % ALIGN == 0
    assert [p.requires_grad for p in flat.parameters()] == [False, False]
    before = {k: v.clone() for k, v in flat.state_dict().items()}
    for cast in (flat.half, flat.float, flat.double, flat.bfloat16):  # casts must not rewrite the bytes as numbers
        cast()
        assert flat.packed.dtype == STORAGE_DTYPE and flat.packed_bytes().dtype == torch.uint8
        after = flat.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith("bias")), cast


def test_packed_bytes_never_take_a_gradient():
    ref, flat = _pair("nf4", True, True)
    flat.requires_grad_(True)  # a careless "train everything": the bytes stay out of autograd
    x = torch.randn(4, flat.in_features)
    flat(x).square().sum().backward()
    assert flat.packed.grad is None and torch.equal(flat(x), ref(x))


def test_pack_unpack_round_trip_and_bad_buffer():
    q = quantize(torch.randn(33, 64), quant_type="nf4", blocksize=64, double_quant=True)
    flat, layout = pack(q)
    assert flat.numel() % ALIGN == 0 and layout.nbytes == flat.numel()
    back = unpack(flat, layout)
    for name in ("data", "absmax", "nested_absmax", "offset"):
        assert torch.equal(getattr(back, name), getattr(q, name)), name
    with pytest.raises(ValueError, match="uint8"):
        unpack(flat[:-1], layout)


def test_load_state_dict_from_a_quantlinear():
    src, _ = _pair("nf4", True, True)
    _, dst = _pair("nf4", True, True, in_f=160)
    with torch.no_grad():
        dst.packed.zero_()
    dst.load_state_dict(src.state_dict())
    x = torch.randn(4, 160)
    assert torch.equal(dst(x), src(x))


def test_flatten_quantized_lora_llama_same_logits(tmp_path):
    from qlora_core.loading import load_llama
    from qlora_core.lora import apply_lora
    from tests._tiny import make_model_folder
    model = load_llama(make_model_folder(tmp_path / "m"), quantize="nf4", dtype=torch.float32)
    apply_lora(model, r=4, alpha=8)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    ids = torch.randint(0, 300, (2, 9))
    ref = model(ids)
    sd_ref = model.state_dict()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert flatten_quantized(model) == 14
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.equal(model(ids), ref)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    sd = model.state_dict()
    assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64])  # the decode GEMV and the tiled GEMM paths
def test_flat_quant_linear_on_gpu_equals_quantlinear(rows):
    """On CUDA the Triton kernels read views into the flat buffer: bf16 output and input gradient bit for bit."""
    ref, flat = (m.cuda() for m in _pair("nf4", True, False, out_f=256, in_f=512))
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y_ref = ref(x)
    (dx_ref,) = torch.autograd.grad(y_ref.float().square().sum(), x)
    y = flat(x)
    (dx,) = torch.autograd.grad(y.float().square().sum(), x)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
