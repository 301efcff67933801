"""llama.sdpa's dispatch branches, each forced on the CPU (the device decides which one runs: on the CPU
_sdpa_gqa_ok is always true, so "gqa_repeat_kv" (packed rows with per-document masks, padded prompts on CUDA)
and "gqa_fold_one_query" (CUDA decoding) would otherwise run only on a GPU).

Every branch over every head layout it serves (MHA, GQA 8/2, MQA 8/1), with and without a bool mask (per-document
blocks for many queries, left padding for one), one query and many, against a float64 attention written here
(softmax(q k^T / sqrt(D)) v with K/V head h // (H / KVH)). Tolerance: fp32 attention of D=16, S<=11 keys:
2x the fp32 SDPA's own distance from the float64 result, + DTYPE_ATOL[fp32].
"""
import math

import pytest
import torch

from qlora_core import llama
from tests.helpers import DTYPE_ATOL, assert_close_verbose

# branch -> the head layouts and query counts it serves (the fold is for one query and K/V groups only); a new
# branch fails tests/test_branches.py (the registry of every branch set) until it is named here
SERVES = {"mha": ([(4, 4)], (1, 5)), "gqa_native": ([(8, 2), (8, 1)], (1, 5)),
          "gqa_fold_one_query": ([(8, 2), (8, 1)], (1,)), "gqa_repeat_kv": ([(8, 2), (8, 1)], (1, 5))}
CASES = [(b, h, kvh, t, m) for b, (heads, ts) in SERVES.items() for h, kvh in heads for t in ts
         for m in (False, True)]


def _reference(q, k, v, mask, is_causal):
    """float64 attention: (B, H, T, D)."""
    q, k, v = q.double(), k.double(), v.double()
    H, KVH, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(H // KVH, dim=1), v.repeat_interleave(H // KVH, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    keep = torch.ones(T, S, dtype=torch.bool)
    if is_causal:
        keep = torch.ones(T, S, dtype=torch.bool).tril(S - T)
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


@pytest.mark.parametrize("branch,H,KVH,T,masked", CASES)
def test_branch_matches_float64_attention(branch, H, KVH, T, masked):
    torch.manual_seed(H * 100 + KVH * 10 + T)
    B, D = 2, 16
    S = T if T > 1 else 11  # one query: a decode step over 11 cached keys
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, KVH, S, D), torch.randn(B, KVH, S, D)
    mask = _mask(B, T, S) if masked else None
    is_causal = T > 1 and not masked  # as Attention calls it: causal alone, or the mask holds causality
    got = llama.sdpa(q, k, v, mask, is_causal, branch=branch)
    want = _reference(q, k, v, mask, is_causal)
    own = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1), attn_mask=mask, is_causal=is_causal)
    atol = 2 * (own.double() - want).abs().max().item() + DTYPE_ATOL[torch.float32]
    assert got.shape == (B, H, T, D) and got.dtype == torch.float32
    assert_close_verbose(got, want, atol=atol, rtol=0, name=f"{branch} H={H} KVH={KVH} T={T} mask={masked}")


def test_cpu_choice():
    """What sdpa_branch picks on the CPU: mha for equal heads, SDPA's own GQA otherwise (masks or not)."""
    q, k = torch.randn(1, 8, 5, 16), torch.randn(1, 2, 5, 16)
    assert llama.sdpa_branch(q[:, :2], k, None) == "mha"
    assert llama.sdpa_branch(q, k, None) == llama.sdpa_branch(q[:, :, :1], k, torch.ones(1, 1, 1, 5, dtype=bool)) \
        == "gqa_native"
    with pytest.raises(ValueError, match="branch must be one of"):
        llama.sdpa(q, k, k, None, True, branch="flash")
