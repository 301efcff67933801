"""Device tests for the public API (run with `python -m pytest -m gpu tests/test_gpu_api.py`).

- quantize_model on a CUDA module (Triton quantizer and matmul) against the dense module over its dequantized
  weights, within 2x PyTorch's own bf16 error against float64 plus the bf16 atol.
- QuantizedTensor.to(device / dtype) on CUDA moves the state without casting it.
- PagedAdamW8bit with a CUDA tensor learning rate takes exactly the float-lr steps.
- Mistral and Qwen2 (q/k/v biases) NF4 on CUDA in bf16 against float64, same bound.
"""
import pytest
import torch
from torch import nn

import qlora_core as qc
from tests.helpers import DTYPE_ATOL, assert_close_verbose

pytestmark = pytest.mark.gpu


def test_quantize_model_on_cuda_matches_dense_over_dequantized():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 1024), nn.SiLU(), nn.Linear(1024, 384, bias=False)).cuda().to(torch.bfloat16)
    twin = nn.Sequential(nn.Linear(512, 1024), nn.SiLU(), nn.Linear(1024, 384, bias=False)).cuda().to(torch.bfloat16)
    twin.load_state_dict(net.state_dict())
    qc.quantize_model(net)
    # the last linear of a generic module is its output layer and stays dense (quantize_model's rule)
    assert isinstance(net[0], qc.QuantLinear) and net[0].weight.device.type == "cuda"
    assert type(net[2]) is nn.Linear and torch.equal(net[2].weight, twin[2].weight)
    with torch.no_grad():
        twin[0].weight.copy_(net[0].weight.dequantize())
        x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
        got, dense, ref = net(x), twin(x), twin.double()(x.double())
    bound = 2 * (dense.double() - ref).abs().max().item() + DTYPE_ATOL[torch.bfloat16]
    assert_close_verbose(got, ref, atol=bound, rtol=0, name="quantize_model on cuda")


def test_quantized_tensor_to_on_cuda_moves_without_casting():
    q = qc.quantize(torch.randn(256, 320))
    g = q.to("cuda", torch.float16)
    assert g.device.type == "cuda" and g.dtype == torch.float16
    for f in ("data", "absmax", "nested_absmax", "offset"):
        assert torch.equal(getattr(g, f).cpu(), getattr(q, f)) and getattr(g, f).dtype == getattr(q, f).dtype, f
    assert torch.equal(g.dequantize().cpu(), q.dequantize().to(torch.float16))


def test_paged_adamw_8bit_cuda_tensor_lr_equals_float_lr():
    def run(lr):
        p = nn.Parameter(torch.linspace(-1, 1, 70000, device="cuda"))
        opt = qc.PagedAdamW8bit([p], lr=lr)
        for t in range(3):
            p.grad = torch.sin(torch.arange(70000.0, device="cuda") * (t + 1)) * 0.01
            opt.step()
        return p.detach().cpu()
    assert torch.equal(run(torch.tensor(1e-3, dtype=torch.float64, device="cuda")), run(1e-3))


@pytest.mark.parametrize("name", ["mistral-window-gqa-untied", "qwen2-gqa-tied", "qwen3-window-bias-mqa-untied"])
def test_family_nf4_on_cuda_within_bf16_bound(name, tmp_path):
    from tests.test_families import build_folder
    folder = build_folder(tmp_path / name, name)
    q = qc.load_llama(folder, quantize="nf4", dtype=torch.bfloat16, device="cuda").eval()
    dense = qc.load_llama(folder, quantize=None, dtype=torch.bfloat16, device="cuda").eval()
    with torch.no_grad():
        for n, m in q.named_modules():
            if isinstance(m, qc.QuantLinear):
                dense.get_submodule(n).weight.copy_(m.weight.dequantize())
        ids = torch.randint(0, q.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0)).cuda()
        got, own = q(ids), dense(ids)
        ref = dense.double()(ids)
    bound = 2 * (own.double() - ref).abs().max().item() + DTYPE_ATOL[torch.bfloat16]
    assert_close_verbose(got, ref, atol=bound, rtol=0, name=f"{name} nf4 cuda")
