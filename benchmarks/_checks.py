"""Checks that make the benchmarks prove what they time: the stacks train (bench_train.py) and generate the same
tokens (bench_generate.py). Pure functions of tensors and floats, so tests/test_bench_checks.py runs them on the CPU.

- Data: random tokens barely move the loss (every token is as likely as any other), so a stack whose update was
  lost looks like one that trains. `learnable_stream` draws Zipf tokens (a unigram a few LoRA steps learn: the
  loss falls from ~ln(vocab) toward the Zipf entropy) and repeats each row's first half as its second half
  (induction lowers it further once a model can copy). Seeded on the CPU: every stack sees the same tokens.
- Weights: `init_param` seeds each tensor from its name, so ours and a peer built from the same SHAPES entry
  hold the same dense weights before quantization (same first loss, same greedy tokens up to arithmetic).
- Verdicts: `train_failure` (the loss must fall and every LoRA grad be finite and nonzero), `first_divergence`
  and `token_agreement` (greedy tokens of two stacks, position by position).
"""
from __future__ import annotations

import math
import zlib

import torch

ZIPF_S = 1.1  # Zipf exponent: over 128,256 ids the unigram entropy is 6.8 nats vs ln(V) = 11.8 (512 ids: 4.4 vs 6.2)
MIN_DROP = 0.01  # the last timed loss must sit >= 1% below the first (batch-to-batch noise: ~0.2% at 2k tokens)
INIT_STD = 0.02  # HF's initializer_range: N(0, 0.02) matrices, norms 1


def zipf_probs(vocab: int, s: float = ZIPF_S) -> torch.Tensor:
    """(vocab,) float64 probabilities p_k ~ 1 / k^s of the k-th most frequent id (k = 1..vocab)."""
    p = torch.arange(1, vocab + 1, dtype=torch.float64) ** -s
    return p / p.sum()


def learnable_stream(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """n batches (batch, seq) int64 on the CPU: each row is seq // 2 (rounded up) Zipf tokens, then the same
    tokens again (cut to seq). Which id is frequent is a seeded permutation of the vocabulary, so the frequent ids
    are not the special ones at the top nor 0, 1, 2. Same (n, batch, seq, vocab, seed) -> same tokens."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    probs, half = zipf_probs(vocab), -(-seq // 2)
    out = []
    for _ in range(n):
        first = perm[torch.multinomial(probs, batch * half, replacement=True, generator=g)].view(batch, half)
        out.append(torch.cat([first, first], dim=1)[:, :seq].contiguous())
    return out


def init_param(name: str, p: torch.Tensor, std: float = INIT_STD) -> None:
    """Fill p in place: vectors (norm weights) with 1, matrices with N(0, std) from a generator on p's device
    seeded by crc32(name). The same name, shape, dtype and device give the same values in any process."""
    with torch.no_grad():
        if p.dim() < 2:
            p.fill_(1.0)
            return
        g = torch.Generator(device=p.device).manual_seed(zlib.crc32(name.encode()))
        p.normal_(0.0, std, generator=g)


def clip_grads(params: list[torch.Tensor], max_norm: float = 1.0) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (same global norm, same scaling) that also returns the per-parameter grad
    norms (n,) fp32 it computes anyway: reading them after the timed steps costs no extra kernel and no sync.
    A parameter without a grad gets norm 0, which train_failure flags."""
    grads = [p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in params]
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])  # (n,): the kernels clip_grad_norm_ runs
    total = torch.linalg.vector_norm(norms)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # clip_grad_norm_'s epsilon
    real = [p.grad for p in params if p.grad is not None]
    if real:  # as torch.nn.utils.clip_grads_with_norm_: one fp32 0-dim factor for grads of any dtype
        torch._foreach_mul_(real, coef)
    return norms


def grad_summary(norms: torch.Tensor) -> dict:
    """{"grad_norm": global norm, "grad_zero": params with norm 0, "grad_nonfinite": with inf/nan, "n_lora"}."""
    norms = norms.double().cpu()
    finite = torch.isfinite(norms)
    return {"grad_norm": float(torch.linalg.vector_norm(norms)), "grad_zero": int((norms == 0).sum()),
            "grad_nonfinite": int((~finite).sum()), "n_lora": norms.numel()}


def train_failure(loss_first: float, loss_last: float, grads: dict, min_drop: float = MIN_DROP) -> str | None:
    """Why a row did not train, or None. It failed when a loss is not finite, when the last timed loss is not at
    least `min_drop` (relative) below the first, or when any LoRA grad of the last step is zero or not finite
    (B starts at 0, so A's grad is 0 only at the first step: by the last one every grad is nonzero)."""
    if not (math.isfinite(loss_first) and math.isfinite(loss_last)):
        return f"loss not finite ({loss_first:.4g} > {loss_last:.4g})"
    if grads["grad_nonfinite"]:
        return f"{grads['grad_nonfinite']} of {grads['n_lora']} LoRA grads not finite"
    if grads["grad_zero"]:
        return f"{grads['grad_zero']} of {grads['n_lora']} LoRA grads zero"
    if not loss_last <= loss_first * (1 - min_drop):
        return f"loss did not fall by {min_drop:.0%} ({loss_first:.4f} > {loss_last:.4f})"
    return None


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) int64: per row, the first position where token rows a (B, N) and b (B, N) differ; N where they agree."""
    diff = (a != b).to(torch.int64)
    n = a.shape[1]
    return torch.where(diff.any(dim=1), diff.argmax(dim=1), torch.full_like(diff[:, 0], n))


def token_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Greedy tokens of two stacks (B, N): the fraction of rows equal over all N, the earliest first divergence
    (None when every row agrees) and the median one (N for an agreeing row)."""
    first = first_divergence(a, b)
    n = a.shape[1]
    return {"rows_equal": float((first == n).double().mean()), "first_diff": None if bool((first == n).all())
            else int(first.min()), "median_first_diff": float(first.double().median()), "n_tokens": n}


TIE_TOL = 0.1  # nats: a greedy choice whose reference logit is this close to the best one is a near tie
REF_ROWS_OK = 0.95  # the reference check passes when >= 95% of rows are equal or part only at a near tie


def divergence_gaps(ref_logits: torch.Tensor, ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(B,) float: at each row's first divergence of ours (B, N) from ref (B, N), how far ours' token sits below
    the reference's best in ref_logits (B, N, V) (the reference's logits along ours' tokens, teacher-forced:
    equal to the ones it saw while decoding up to that position); 0 for rows that never diverge. Random-weight
    models have top-2 logit gaps of a few tenths, so bf16 arithmetic alone flips some tokens: a small gap says
    the two paths parted at a near tie, a large one that ours computed something else."""
    first = first_divergence(ours, ref)  # (B,)
    n = ours.shape[1]
    at = first.clamp(max=n - 1)
    rows = torch.arange(ours.shape[0])
    logits = ref_logits[rows, at].double()  # (B, V)
    gap = logits[rows, ref[rows, at]] - logits[rows, ours[rows, at]]
    return torch.where(first == n, torch.zeros_like(gap), gap)


def reference_verdict(ref_logits: torch.Tensor, ours: torch.Tensor, ref: torch.Tensor,
                      tol: float = TIE_TOL) -> dict:
    """token_agreement of ours vs the reference, plus rows_ok (equal, or parting at a near tie <= tol nats), the
    largest gap at a divergence and "failed" (rows_ok below REF_ROWS_OK: why, else None)."""
    out = token_agreement(ours, ref)
    gaps = divergence_gaps(ref_logits, ours, ref)
    out.update(rows_ok=float((gaps <= tol).double().mean()), max_gap=float(gaps.max()), tie_tol=tol)
    out["failed"] = None if out["rows_ok"] >= REF_ROWS_OK else \
        f"{out['rows_ok']:.0%} of rows equal or parting at a near tie (< {REF_ROWS_OK:.0%})"
    return out
