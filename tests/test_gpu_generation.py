"""Device tests for generation.py (run with `python -m pytest -m gpu tests/test_gpu_generation.py`).

- The captured decode loop (CUDA graph replays) gives exactly the eager loop's tokens: greedy, bf16 NF4, batch
  1, 8 (left-padded) and 64, fp32 dense, and with unmerged LoRA (8 and 32 rows); in-place weight updates reach
  the graph and merging rebuilds it.
- Every token the graph picks is an argmax of a full recompute's logits up to bf16 noise.
- Sampling inside the graph: reproducible from a seeded generator (also when the cached graph is reused),
  different seeds differ, top-k 1 is greedy; with dense and with NF4 weights.

Exactness needs identical arithmetic in both loops, and the default split-K decode kernels sum their partials in
a fixed order (kernels/splitk.py), so these tests run the kernels as users get them.
"""
import pytest
import torch

from qlora_core import generation as G
from qlora_core.generation import generate
from qlora_core.loading import load_llama
from qlora_core.lora import apply_lora, lora_modules, merge_lora
from tests.helpers import assert_tokens_are_argmax
from tests.llama_folders import GPU_SPEC, write_spec_folder

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_spec_folder(tmp_path_factory.mktemp("gpu_gen"), GPU_SPEC)


def _prompt(B, padded, seed=0):
    """(ids (B, 24) on CUDA, left-padding mask or None): row i has 24 - 3 * (i % 5) real tokens when padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (B, 24), generator=g)
    if not padded:
        return ids.cuda(), None
    mask = torch.ones_like(ids)
    for i in range(B):
        mask[i, :3 * (i % 5)] = 0
    return ids.masked_fill(mask == 0, 0).cuda(), mask.cuda()


def _both(model, ids, mask, n=24, **kw):
    G.release(model)
    eager = generate(model, ids, n, attention_mask=mask, cuda_graph=False, **kw)
    graph = generate(model, ids, n, attention_mask=mask, **kw)
    assert G._DECODERS[model].graph is not None
    return eager, graph


@pytest.mark.parametrize("quant, dtype, B, padded", [
    ("nf4", torch.bfloat16, 1, False), ("nf4", torch.bfloat16, 8, True), ("nf4", torch.bfloat16, 64, True),
    (None, torch.float32, 3, True)])
def test_captured_loop_equals_eager_loop(folder, quant, dtype, B, padded):
    model = load_llama(folder, quantize=quant, dtype=dtype, device="cuda")
    ids, mask = _prompt(B, padded)
    eager, graph = _both(model, ids, mask, sync_every=5)
    assert graph.shape == (B, 48) and torch.equal(graph, eager)
    again = generate(model, ids, 24, attention_mask=mask)  # the cached graph, replayed from a fresh prefill
    assert torch.equal(again, eager)


@pytest.mark.parametrize("B", [8, 32])  # 32: above 16 rows, where lora.project would group the projections
def test_captured_loop_with_unmerged_lora(folder, B):
    model = load_llama(folder, quantize="nf4", dtype=torch.bfloat16, device="cuda")
    apply_lora(model, r=8, alpha=16)
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, device="cuda", generator=g))
    ids, mask = _prompt(B, padded=True)
    eager, graph = _both(model, ids, mask)
    assert torch.equal(graph, eager)
    dec = G._DECODERS[model]
    with torch.no_grad():  # an optimizer step: same tensors, new values; the graph must read them
        for m in lora_modules(model).values():
            m.lora_B.mul_(-1.0)
        model(ids)  # an eager forward in between (fused above 16 rows: rebuilds its cached adapter copies)
    flipped = generate(model, ids, 24, attention_mask=mask)
    assert G._DECODERS[model] is dec and not torch.equal(flipped, graph)
    assert torch.equal(flipped, generate(model, ids, 24, attention_mask=mask, cuda_graph=False))
    merge_lora(model)
    eager, graph = _both(model, ids, mask)
    assert torch.equal(graph, eager)


@pytest.mark.parametrize("B", [1, 8])
def test_default_kernels_pick_argmax_tokens(folder, B):
    model = load_llama(folder, quantize="nf4", dtype=torch.bfloat16, device="cuda")
    ids, _ = _prompt(B, padded=False, seed=3)
    out = generate(model, ids, 16)
    assert_tokens_are_argmax(model, out, ids.shape[1], 0.03, f"graph decode B={B}")  # as in test_gpu_llama


@pytest.mark.parametrize("quant, B", [(None, 4), ("nf4", 4), ("nf4", 1)])
def test_sampling_in_the_graph(folder, quant, B):
    # NF4 too: its split-K decode kernels sum in a fixed order, so logits repeat exactly and a sampled token
    # near a boundary cannot flip (it did after 18 tokens on the H200 while partials were added in arrival order).
    model = load_llama(folder, quantize=quant, dtype=torch.bfloat16, device="cuda")
    ids, mask = _prompt(B, padded=B > 1, seed=5)
    g = torch.Generator(device="cuda")
    runs = []
    for seed in (7, 7, 8):
        g.manual_seed(seed)  # the same generator object: the second call replays the cached graph
        runs.append(generate(model, ids, 24, temperature=1.0, top_p=0.9, top_k=50, generator=g,
                             attention_mask=mask))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    torch.cuda.manual_seed(3)
    a = generate(model, ids, 24, temperature=1.0, attention_mask=mask)  # default generator, captured here
    torch.cuda.manual_seed(3)
    b = generate(model, ids, 24, temperature=1.0, attention_mask=mask)
    assert torch.equal(a, b)
    greedy = generate(model, ids, 24, attention_mask=mask)
    assert torch.equal(generate(model, ids, 24, temperature=1.5, top_k=1, attention_mask=mask), greedy)
