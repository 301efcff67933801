"""Shared test helpers: one readable assertion for float comparisons, the dtype tolerance table, the runner of
interpreter groups, and the bitsandbytes import for GPU comparisons."""
import os
import subprocess
import sys

import pytest
import torch

# Tolerance rule (STYLE.md): no worse than 2x PyTorch's own same-dtype error against a float64 reference,
# plus this dtype atol.
DTYPE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = ""):
    """assert_close with a report: mismatch count, first indices, max/mean diff, NaN/Inf disagreement."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN pattern differs ({int(nan_a.sum())} vs {int(nan_e.sum())})"
    diff = (a - e).abs().nan_to_num(0.0)
    bad = diff > atol + rtol * e.abs().nan_to_num(0.0)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
            f"first at {idx}; max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}")


def matmul_error_bound(x: torch.Tensor, w: torch.Tensor, ref64: torch.Tensor) -> float:
    """2x the max abs error of PyTorch's own same-dtype matmul x @ w.T against the float64 reference."""
    torch_err = (torch.nn.functional.linear(x, w).double() - ref64).abs().max().item()
    return 2.0 * torch_err


def run_interpreter_group(script: str, group: str) -> None:
    """Run `python script group` with TRITON_INTERPRET=1 in a fresh process (the variable must be set before triton
    is first imported) and assert it passed: exit 0 and a "<group>: N checks passed" line with N > 0."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("QLORA_CORE_BACKEND", None)
    proc = subprocess.run([sys.executable, os.path.abspath(script), group], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter run of {group!r} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert f"{group}: " in proc.stdout and "checks passed" in proc.stdout, proc.stdout
    assert not proc.stdout.strip().endswith(": 0 checks passed"), "no case ran"


def run_interpreted(code: str) -> None:
    """Run the Python source `code` with TRITON_INTERPRET=1 in a fresh process and assert it exited 0 (its output
    tails in the message otherwise)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def assert_tokens_are_argmax(model, out: torch.Tensor, prompt_len: int, rel: float = 0.03, name: str = ""):
    """Every token of out[:, prompt_len:] is an argmax of a full recompute's logits on its prefix, up to `rel` of the
    logit scale. For bf16 decoding, where the decode kernels and the prefill GEMM round differently (and split-K
    sums depend on arrival order), so near-ties may flip a token and the continuations then differ."""
    p = prompt_len
    with torch.no_grad():
        logits = model(out[:, :-1])[:, p - 1:].float()  # predicts out[:, p:]
    chosen = logits.gather(-1, out[:, p:, None]).squeeze(-1)
    gap = logits.max(-1).values - chosen
    scale = logits.abs().max().item()
    assert (gap <= rel * scale).all(), f"{name}: picked non-argmax tokens: gaps {gap.tolist()}, scale {scale}"


def label_runs(tok, sample) -> list[str]:
    """The labelled tokens of a data.Sample as decoded runs, one per contiguous stretch of labels (special tokens
    kept); asserts every label is its own token or -100."""
    runs, cur = [], []
    for t, y in zip(sample.input_ids, sample.labels):
        assert y in (t, -100)
        if y != -100:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return [tok.decode(r, skip_special_tokens=False) for r in runs + ([cur] if cur else [])]


def assert_bnb_checkpoint_matches(model, hf, back=None) -> int:
    """Each QuantLinear of `model` is a bitsandbytes Linear4bit in `hf` (transformers' load of its bnb-4bit
    checkpoint) dequantizing to the same values, with the same bias, and (when given) the same packed bytes in
    `back` (load_llama's read of that checkpoint); its dense linears stay dense and equal in `hf`. Returns how many
    4-bit layers were compared."""
    import bitsandbytes as bnb
    n = 0
    for name, m in model.named_modules():
        theirs = hf.get_submodule(name) if name else None
        if type(m).__name__ == "QuantLinear":
            assert isinstance(theirs, bnb.nn.Linear4bit), name
            w = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
            assert torch.equal(w, m.weight.dequantize()), name
            assert (m.bias is None) == (theirs.bias is None) and (m.bias is None or torch.equal(m.bias, theirs.bias))
            if back is not None:
                b = back.get_submodule(name).weight
                assert torch.equal(b.data, m.weight.data) and torch.equal(b.absmax, m.weight.absmax), name
            n += 1
        elif isinstance(m, torch.nn.Linear):
            assert type(theirs) is torch.nn.Linear and torch.equal(theirs.weight, m.weight), name
    return n


def bnb_cuda():
    """bitsandbytes with its CUDA library loaded, for tests that compare against its CUDA kernels.

    A missing package or a CPU-only load is a failure, never a skip: a GPU test that silently skipped its only
    independent reference would pass without having compared anything.
    """
    try:
        import bitsandbytes
        from bitsandbytes.cextension import lib
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken native library raising anything)
        pytest.fail(f"bitsandbytes must import on the GPU machine (pip install bitsandbytes==0.50.2): {e!r}")
    if not getattr(lib, "compiled_with_cuda", False):
        pytest.fail(f"bitsandbytes {bitsandbytes.__version__} loaded without its CUDA library "
                    f"({type(lib).__name__}): the comparison would run bitsandbytes' CPU/default backend")
    return bitsandbytes
