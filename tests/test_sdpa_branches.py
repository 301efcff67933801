"""llama.sdpa's dispatch branches, each forced on the CPU (the device decides which one runs: on the CPU
_sdpa_gqa_ok is always true, so "gqa_repeat_kv" (packed rows with per-document masks, padded prompts on CUDA)
and "gqa_fold_one_query" (CUDA decoding) would otherwise run only on a GPU).

"flex_window" (flex_attention with a block-sparse sliding-window mask; chosen on CUDA only) runs here unfused.

Every branch over every head layout it serves (MHA, GQA 8/2, MQA 8/1), with and without a bool mask (per-document
blocks for many queries, left padding for one), one query and many, with and without a sliding window of 3 keys
(then with a scale of 0.37 too, Gemma's query_pre_attn_scalar^-0.5), against a float64 attention written here
(softmax(scale q k^T) v with K/V head h // (H / KVH), keys j of query i kept iff j <= i and j > i - window).
Tolerance: fp32 attention of D=16, S<=11 keys: 2x the fp32 SDPA's own distance from the float64 result,
+ DTYPE_ATOL[fp32].
"""
import math

import pytest
import torch

from qlora_core import llama
from tests.helpers import DTYPE_ATOL, assert_close_verbose

# branch -> the head layouts, query counts, masks and windows it serves (the fold is for one query and K/V groups
# only; flex_window for causal self-attention with a window and no other mask); a new branch fails
# tests/test_branches.py (the registry of every branch set) until it is named here
W = 3  # keys a query sees on a sliding layer: shorter than the 5 queries and the 11 cached keys
ANY = ((False, None), (True, None), (False, W), (True, W))
SERVES = {"mha": ([(4, 4)], (1, 5), ANY), "gqa_native": ([(8, 2), (8, 1)], (1, 5), ANY),
          "gqa_fold_one_query": ([(8, 2), (8, 1)], (1,), ANY), "gqa_repeat_kv": ([(8, 2), (8, 1)], (1, 5), ANY),
          "flex_window": ([(4, 4), (8, 2), (8, 1)], (5,), ((False, W),))}
CASES = [(b, h, kvh, t, m, w) for b, (heads, ts, mw) in SERVES.items() for h, kvh in heads for t in ts
         for m, w in mw]


def _reference(q, k, v, mask, is_causal, window=None, scale=None):
    """float64 attention: (B, H, T, D); the queries are the last T of S positions."""
    q, k, v = q.double(), k.double(), v.double()
    H, KVH, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(H // KVH, dim=1), v.repeat_interleave(H // KVH, dim=1)
    s = q @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
    keep = torch.ones(T, S, dtype=torch.bool)
    if is_causal:
        keep = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    if window is not None:
        keep = keep & ~torch.ones(T, S, dtype=torch.bool).tril(S - T - window)
    if mask is not None:
        keep = keep & mask
    return s.masked_fill(~keep, -math.inf).softmax(-1) @ v


def _mask(B, T, S):
    """Many queries: two documents per row (per-document causal blocks, row 1 split elsewhere); one query:
    row 1 left-padded by 3 keys. Bool (B, 1, T, S), True = attend."""
    if T == 1:
        m = torch.ones(B, 1, 1, S, dtype=torch.bool)
        m[1, ..., :3] = False
        return m
    doc = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
    i = torch.arange(T)
    return ((doc[:, :, None] == doc[:, None, :]) & (i[None, None, :] <= i[None, :, None]))[:, None]


@pytest.mark.parametrize("branch,H,KVH,T,masked,window", CASES)
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_branch_matches_float64_attention(branch, H, KVH, T, masked, window):
    torch.manual_seed(H * 100 + KVH * 10 + T)
    B, D = 2, 16
    S = T if T > 1 else 11  # one query: a decode step over 11 cached keys
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, KVH, S, D), torch.randn(B, KVH, S, D)
    mask = _mask(B, T, S) if masked else None
    is_causal = T > 1 and not masked  # as Attention calls it: causal alone, or the mask holds causality
    scale = 0.37 if window else None
    got = llama.sdpa(q, k, v, mask, is_causal, branch=branch, scale=scale, window=window)
    want = _reference(q, k, v, mask, is_causal, window, scale)
    if window is not None:  # the band hides keys that the causal / padding / document mask alone would show
        assert (want - _reference(q, k, v, mask, is_causal, None, scale)).abs().max() > 1e-3
    own_mask = mask if window is None else _keep(T, S, mask, is_causal, window)
    own = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1), attn_mask=own_mask,
        is_causal=is_causal and window is None, scale=scale)
    atol = 2 * (own.double() - want).abs().max().item() + DTYPE_ATOL[torch.float32]
    assert got.shape == (B, H, T, D) and got.dtype == torch.float32
    assert_close_verbose(got, want, atol=atol, rtol=0,
                         name=f"{branch} H={H} KVH={KVH} T={T} mask={masked} window={window}")


def _keep(T, S, mask, is_causal, window):
    """The bool mask (written here, not llama._band) that the fp32 SDPA baseline applies: the band, causal when
    is_causal, and mask."""
    i, j = torch.arange(S - T, S)[:, None], torch.arange(S)[None, :]
    keep = (j > i - window) & ((j <= i) | (not is_causal))
    return keep if mask is None else keep & mask


def test_cpu_choice():
    """What sdpa_branch picks on the CPU: mha for equal heads, SDPA's own GQA otherwise (masks or not)."""
    q, k = torch.randn(1, 8, 5, 16), torch.randn(1, 2, 5, 16)
    assert llama.sdpa_branch(q[:, :2], k, None) == "mha"
    assert llama.sdpa_branch(q, k, None) == llama.sdpa_branch(q[:, :, :1], k, torch.ones(1, 1, 1, 5, dtype=bool)) \
        == "gqa_native"
    assert llama.sdpa_branch(q, k, None, window=3) == "gqa_native"  # flex_window is for CUDA only
    with pytest.raises(ValueError, match="branch must be one of"):
        llama.sdpa(q, k, k, None, True, branch="flash")
    with pytest.raises(ValueError, match="flex_window is for causal self-attention"):
        llama.sdpa(q, k, k, torch.ones(5, 5, dtype=torch.bool), False, branch="flex_window", window=3)


def test_flex_window_only_where_inductor_compiles_it():
    """flex_window is chosen only for head sizes and dtypes inductor's flex kernel compiles (head_dim >= 16; no
    float64): the H100 run of 2026-12-07 failed at head_dim 12 and in float64 before this rule. Checked with
    _flex_ok's device test stubbed, since the CPU never takes the branch."""
    assert llama.flex_supports(16, torch.bfloat16) and llama.flex_supports(256, torch.float32)
    assert not llama.flex_supports(12, torch.bfloat16) and not llama.flex_supports(64, torch.float64)
    cases = {(16, torch.bfloat16): True, (12, torch.bfloat16): False, (64, torch.float64): False}
    for (d, dtype), want in cases.items():
        q = torch.randn(1, 4, 8, d, dtype=dtype)
        cuda_like = type("T", (), {"shape": q.shape, "dtype": dtype, "device": torch.device("cuda")})()
        assert llama._flex_ok(cuda_like, q, None, 3) is want, (d, dtype)
