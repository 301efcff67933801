"""Long-context mode (qlora_core/seq_chunks.py, the planner and host-copy stride in activation_checkpoint.py, the
CLI's allocator setting): the MLP in sequence chunks gives the loss and LoRA grads of the unchunked model against
a float64 reference, under every checkpointing policy and with packed documents; its backward keeps only its input
between forward and backward; offload with a stride keeps one host copy per group; the planner's choices on 8B
shapes stay within its own budgets and recompute more per token as sequences grow; `qlora` configures the CUDA
allocator before CUDA is touched, and leaves a user's setting alone."""
import copy

import pytest
import torch

from qlora_core import activation_checkpoint as C
from qlora_core import seq_chunks as S
from qlora_core.llama import Llama
from qlora_core.model_config import LlamaConfig
from qlora_core.lora import apply_lora
from qlora_core.qlinear import quantize_model
from qlora_core.train_loop import batch_loss

from tests.helpers import DTYPE_ATOL, assert_close_verbose, nonzero_lora_b

pytestmark = pytest.mark.usefixtures("one_thread")

GIB = 2**30


# -- ChunkedRows on its own ---------------------------------------------------------------------------------------
def _per_row_mlp(K=6, I=24):
    w1 = torch.randn(I, K, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(K, I, dtype=torch.float64, requires_grad=True)
    return (lambda x: torch.tanh(x @ w1.T) @ w2.T), [w1, w2]


@pytest.mark.parametrize("rows", [1, 7, 40, 64])  # one row, a tail chunk, exactly N, more than N
def test_chunked_rows_matches_f(rows):
    f, params = _per_row_mlp()
    x = torch.randn(5, 8, 6, dtype=torch.float64, requires_grad=True)  # 40 rows
    dy = torch.randn(5, 8, 6, dtype=torch.float64)
    ref = torch.autograd.grad(f(x), [x, *params], dy)
    y = S.chunked_rows(f, x, rows, params)
    got = torch.autograd.grad(y, [x, *params], dy)
    assert_close_verbose(y, f(x), atol=1e-12, rtol=1e-12, name="y")
    for name, a, b in zip(("dx", "dw1", "dw2"), got, ref):
        assert_close_verbose(a, b, atol=1e-12, rtol=1e-12, name=name)


def test_chunked_rows_keeps_only_its_input():
    """What autograd holds between forward and backward: x alone (40 x 6) under chunking, against the (40, 24)
    intermediates (and more) of the plain f."""
    f, params = _per_row_mlp()
    x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)

    def saved_numel(fn):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            fn()
        return sum(t.numel() for t in seen if not any(t is p for p in params))

    assert saved_numel(lambda: S.chunked_rows(f, x, 8, params)) == x.numel()
    assert saved_numel(lambda: f(x)) >= 40 * 24


# -- the block, chunked against unchunked and float64 -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """A dense tiny Llama (3 blocks) with LoRA on every linear, B nonzero so every grad is informative."""
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    m = Llama(cfg)
    apply_lora(m, r=4, alpha=8, dropout=0.0)
    nonzero_lora_b(m, 0.1)
    return m.train()


def _run(model, ids, policy, chunk=0, every=1, docs=None):
    """(loss / labels, LoRA grads) of one micro-batch with the MLP in chunks of `chunk` tokens."""
    C.set_long_context(model, chunk, every)
    model.model.checkpoint_policy = policy
    model.zero_grad(set_to_none=True)
    pos, doc = docs if docs is not None else (None, None)
    loss, n = batch_loss(model, ids, ids, pos, doc)
    (loss / n).backward()  # .backward: "offload" backpropagates inside its own backward
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    C.set_long_context(model, 0, 1)
    model.model.checkpoint_policy = "none"
    return (loss / n).detach(), grads


def _packed(B, T):
    """position_ids and document_ids of rows holding documents of 11, 20 and the rest of T tokens."""
    pos = torch.cat([torch.arange(11), torch.arange(20), torch.arange(T - 31)]).repeat(B, 1)
    return pos, (pos == 0).long().cumsum(1)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("policy,every", [("none", 1), ("full", 1), ("save_attn", 1), ("offload", 1), ("offload", 2),
                                          (["offload", "full", "none"], 1)])
def test_chunked_blocks_match_float64(tiny, policy, every, packed, monkeypatch):
    """fp32 chunked (10-token chunks: a tail of 8 on 2 x 49 rows) is no further from the float64 unchunked
    model than fp32 unchunked is, plus fp32's atol; in float64 chunked and unchunked agree to rounding."""
    backwards = []
    real = S.ChunkedRows.backward
    monkeypatch.setattr(S.ChunkedRows, "backward", staticmethod(lambda ctx, dy: backwards.append(1) or real(ctx, dy)))
    ids = torch.randint(0, 101, (2, 49))
    docs = _packed(2, 49) if packed else None
    ref64 = copy.deepcopy(tiny).double()
    l64, g64 = _run(ref64, ids, "none", docs=docs)
    l32, g32 = _run(tiny, ids, "none", docs=docs)
    assert not backwards  # chunk 0: ChunkedRows never runs
    lc, gc = _run(tiny, ids, policy, chunk=10, every=every, docs=docs)
    assert len(backwards) == 3  # every block's MLP went through the chunked backward once
    lc64, gc64 = _run(ref64, ids, policy, chunk=10, every=every, docs=docs)
    bound = 2 * (l32.double() - l64).abs().item() + DTYPE_ATOL[torch.float32]
    assert (lc.double() - l64).abs().item() <= bound
    assert_close_verbose(lc64, l64, atol=1e-12, rtol=1e-12, name="float64 loss")
    for i, (a, a32, a64, b64) in enumerate(zip(gc, g32, g64, gc64)):
        tol = 2 * (a32.double() - a64).abs().max().item() + DTYPE_ATOL[torch.float32]
        assert_close_verbose(a.double(), a64, atol=tol, rtol=0, name=f"fp32 chunked grad {i}")
        assert_close_verbose(b64, a64, atol=1e-12, rtol=1e-9, name=f"float64 chunked grad {i}")


def test_chunked_fused_phi3_mlp_matches():
    """Phi-3's fused gate_up_proj runs through the same chunked MLP: float64 chunked equals unchunked to rounding."""
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, model_type="phi3")
    torch.manual_seed(0)
    m = Llama(cfg)
    apply_lora(m, r=4, alpha=8)
    nonzero_lora_b(m, 0.1)
    m = m.double().train()
    ids = torch.randint(0, 101, (2, 30))
    l0, g0 = _run(m, ids, "offload")
    l1, g1 = _run(m, ids, "offload", chunk=7)
    assert_close_verbose(l1, l0, atol=1e-12, rtol=1e-12, name="loss")
    for i, (a, b) in enumerate(zip(g1, g0)):
        assert_close_verbose(a, b, atol=1e-12, rtol=1e-9, name=f"grad {i}")


def test_chunk_as_long_as_the_batch_adds_no_op(tiny, monkeypatch):
    """Off by default, and a chunk of at least B*T tokens is no chunking: ChunkedRows never runs."""
    assert all(layer.mlp.chunk_tokens == 0 for layer in tiny.model.layers)
    calls = []
    monkeypatch.setattr(S, "ChunkedRows", type("Spy", (), {"apply": staticmethod(lambda *a: calls.append(1))}))
    ids = torch.randint(0, 101, (2, 16))
    _run(tiny, ids, "full", chunk=32)
    assert calls == []


def test_chunked_dropout_replays_its_masks(monkeypatch):
    """With LoRA dropout on, the chunked backward's recompute draws the masks forward drew: its loss and grads
    equal a plain loop over the same chunks under grad (same RNG draws in the same order), on the NF4 model
    under "offload" (two recomputes nested: the block's and the chunks')."""
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    m = quantize_model(Llama(cfg))
    apply_lora(m, r=4, alpha=8, dropout=0.3)
    nonzero_lora_b(m, 0.1)  # B = 0 would hide the dropout masks from the loss
    m.train()
    ids = torch.randint(0, 101, (2, 24))

    def seeded(seed):
        torch.manual_seed(seed)
        return _run(m, ids, "offload", chunk=7)

    l1, g1 = seeded(5)

    def loop(f, rows, x2, *params):  # no recompute: autograd keeps every chunk's tensors
        return torch.cat([f(x2[i:j]) for i, j in S._bounds(x2.shape[0], rows)])

    monkeypatch.setattr(S.ChunkedRows, "apply", staticmethod(loop))
    l0, g0 = seeded(5)
    l2, _ = seeded(6)
    assert l2 != l0  # dropout is on: another seed draws other masks
    assert_close_verbose(l1, l0, atol=0, rtol=0, name="loss")
    for i, (a, b) in enumerate(zip(g1, g0)):
        assert_close_verbose(a, b, atol=1e-6, rtol=1e-5, name=f"grad {i}")


@pytest.mark.parametrize("plan,every,copies", [("offload", 1, 3), ("offload", 2, 2), ("offload", 3, 1),
                                               (["offload", "full", "offload"], 2, 2)])
def test_offload_stride_keeps_one_host_copy_per_group(tiny, plan, every, copies, monkeypatch):
    """every=k: consecutive offloaded blocks share one host copy per k; a block between them breaks the group
    (its input is not the previous offloaded block's output)."""
    seen = []
    real = C.HostOffload.__init__
    monkeypatch.setattr(C.HostOffload, "__init__", lambda self, *a: seen.append(self) or real(self, *a))
    l0, g0 = _run(tiny, torch.randint(0, 101, (1, 12)), "none")
    torch.manual_seed(0)
    l1, g1 = _run(tiny, torch.randint(0, 101, (1, 12)), plan, every=every)
    (off,) = seen
    assert sum(host is not None for host, _ in off.slots) == copies
    assert not off.recomputed and not off.reruns  # backward consumed every re-run input
    for a, b in zip(g1, g0):
        assert_close_verbose(a, b, atol=1e-6, rtol=1e-5, name="grad")


# -- the planner on 8B shapes -------------------------------------------------------------------------------------
LLAMA_8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336)
FIXED = 6.7 * GIB  # NF4 8B weights, bf16 embeddings and lm_head, LoRA and its optimizer state, loss headroom
SEQS = (16384, 32768, 65536, 131072, 262144, 409600)


def _plan(tokens, gpu_gib, host_gib=None, seq=None):
    s = C.BlockShape(tokens=tokens, seq=seq or tokens, **LLAMA_8B)
    return s, C.plan_long_context(s, 32, gpu_gib * GIB, host_gib and host_gib * GIB, FIXED)


def _estimate(s, p):
    """The plan's GPU and host bytes recomputed from its choices with the public estimates."""
    sc = C.BlockShape(**{**s.__dict__, "chunk": p.chunk})
    gpu = FIXED + C.working_bytes(sc) + (p.every - 1) * s.tokens * s.hidden * s.elem
    gpu += sum(C.block_bytes(sc, q) for q in p.policies)
    return gpu, C.host_bytes(s, p.policies, p.every)


@pytest.mark.parametrize("gpu_gib,host_gib", [(22, None), (76, None), (76, 64)])
def test_planner_fits_and_recomputes_more_as_sequences_grow(gpu_gib, host_gib):
    per_token, fitted = [], []
    for T in SEQS:
        s, p = _plan(T, gpu_gib, host_gib)
        gpu, host = _estimate(s, p)
        assert gpu == pytest.approx(p.gpu_bytes) and host == p.host_bytes
        if p.fits:
            assert gpu <= gpu_gib * GIB and host <= (host_gib or float("inf")) * GIB
        fitted.append(p.fits)
        per_token.append(p.flops / T)
    assert per_token == sorted(per_token)  # a longer sequence never gets a plan with less recompute per token
    assert fitted == sorted(fitted, reverse=True)  # once too long, longer stays too long
    if gpu_gib == 76:
        assert all(fitted)


def test_planner_choices_on_8b():
    """Where each regime starts, in the planner's own model."""
    _, short = _plan(4 * 2048, 76, seq=2048)
    assert short.chunk == 0 and short.policies == ("none",) * 32  # the 4x2048 speed path: nothing added
    _, p = _plan(131072, 22)
    assert p.fits and p.chunk and set(p.policies) == {"offload"}  # 22 GiB at 128k only with chunks, all offloaded
    s, big = _plan(409600, 22)
    assert not big.fits  # the per-token attention side alone (2 x 60 KiB/token) exceeds 22 GiB at 400k
    line = C.MemoryBudget(22)._line(s, big)
    assert "DOES NOT FIT" in line and "\n" not in line
    # a host budget below one copy per block makes the planner share copies, within that budget
    _, free = _plan(409600, 76)
    _, tight = _plan(409600, 76, host_gib=64)
    assert free.every == 1 and free.host_bytes > 64 * GIB
    assert tight.every > 1 and tight.fits and tight.host_bytes <= 64 * GIB


def test_memory_budget_sets_the_model(tiny, capsys):
    """MemoryBudget applies its plan's chunk and stride to the model and prints one line per shape."""
    budget = C.MemoryBudget(22)
    budget.plans[(4096, 4096)] = C.LongPlan(("offload",) * 3, 1024, 2, 1.0, 2.0, 3.0, True)
    s = C.BlockShape(tokens=4096, seq=4096, hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=96)
    assert budget.plan(s, 3, torch.device("cpu"), tiny) == ["offload"] * 3
    assert [layer.mlp.chunk_tokens for layer in tiny.model.layers] == [1024] * 3 and tiny.model.offload_every == 2
    C.set_long_context(tiny, 0, 1)
    budget.plan(C.BlockShape(tokens=8, seq=8, hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=96), 3,
                torch.device("cpu"), tiny)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("checkpointing for 8 tokens")


# -- the CLI ------------------------------------------------------------------------------------------------------
def _first_cuda_query_env(monkeypatch, argv):
    """The allocator variables as `qlora` had them at its first CUDA query (device_count in check_device)."""
    from qlora_core import cli

    seen = []

    def spy():
        import os
        seen.append({n: os.environ.get(n) for n in cli.ALLOC_ENVS})
        return 0

    monkeypatch.setattr(torch.cuda, "device_count", spy)
    assert cli.main(argv) != 0  # no GPU here: the device check fails, after the query
    return seen[0]


def test_cli_sets_expandable_segments_before_cuda(monkeypatch, tmp_path):
    for n in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(n, raising=False)
    argv = ["quantize", "--model", str(tmp_path), "--output", str(tmp_path / "o"), "--device", "cuda"]
    env = _first_cuda_query_env(monkeypatch, argv)
    assert env == {"PYTORCH_ALLOC_CONF": "expandable_segments:True", "PYTORCH_CUDA_ALLOC_CONF": None}
    import os
    assert "PYTORCH_ALLOC_CONF" not in os.environ  # an in-process caller's environment is restored


@pytest.mark.parametrize("name", ["PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"])
def test_cli_keeps_a_user_allocator_setting(monkeypatch, tmp_path, name):
    for n in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(n, raising=False)
    monkeypatch.setenv(name, "max_split_size_mb:128")
    argv = ["quantize", "--model", str(tmp_path), "--output", str(tmp_path / "o"), "--device", "cuda"]
    env = _first_cuda_query_env(monkeypatch, argv)
    assert env == {n: ("max_split_size_mb:128" if n == name else None) for n in env}


def test_train_flags_reach_the_config():
    from qlora_core.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", "o",
                                      "--mlp-chunk-tokens", "4096", "--offload-every", "2",
                                      "--memory-budget-gib", "22", "--host-memory-budget-gib", "64"])
    cfg = config_from_args(args)
    assert (cfg.mlp_chunk_tokens, cfg.offload_every, cfg.memory_budget_gib, cfg.host_memory_budget_gib) == \
        (4096, 2, 22.0, 64.0)
    from qlora_core.train_config import TrainConfig, TrainConfigError
    with pytest.raises(TrainConfigError, match="offload_every"):
        TrainConfig(offload_every=0)
