"""Shared test helpers: one readable assertion for float comparisons, the dtype tolerance table, the runner of
interpreter groups, and the bitsandbytes import for GPU comparisons."""
import math
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


@torch.no_grad()
def nonzero_lora_b(model: torch.nn.Module, std: float) -> None:
    """Draw every LoRA B of `model` from N(0, std), in parameter order from the global RNG: B starts at zero, which
    would make the adapters' grads of A, and any dropout mask, invisible in the loss a test compares."""
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, std)


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


def run_interpreted(code: str) -> str:
    """Run the Python source `code` with TRITON_INTERPRET=1 in a fresh process, assert it exited 0 (its output
    tails in the message otherwise) and return its stdout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def assert_split_k_slot_sum(used: list, y: torch.Tensor, bias: torch.Tensor | None, name: str = ""):
    """The last split-K launch recorded in `used` ((workspace, counters, floats requested) from
    kernels/splitk.workspace, see `spy_split_k`) left its counters zeroed, and y (M, N) is bitwise the fp32 sum
    of its slots in slot order 0, 1, ..., plus bias, rounded to y's dtype: the fixed order that makes split-K
    reproducible (kernels/splitk.py)."""
    if y.is_cuda:
        torch.cuda.synchronize()
    assert used, f"{name}: split-K never ran (no workspace requested): the slot-sum check would be vacuous"
    ws, cnt, size = used[-1]
    m, n = y.shape
    split = size // (m * n)
    assert split >= 2 and size == split * m * n, f"{name}: workspace of {size} floats for y {tuple(y.shape)}"
    assert not cnt.any(), f"{name}: split-K tile counters not reset"
    tot = torch.zeros(m, n, dtype=torch.float32, device=y.device)
    for part in ws[:size].view(split, m, n):
        tot = tot + part
    want = (tot + (bias.float() if bias is not None else 0.0)).to(y.dtype)
    assert torch.equal(y, want), (f"{name}: y is not the slot-order sum of the {split} split-K partials "
                                  f"(max diff {(y.float() - want.float()).abs().max().item():.3g})")


def spy_split_k(setattr_) -> list:
    """Record (workspace, counters, floats requested) for every split-K launch from now on; setattr_ is
    monkeypatch.setattr or plain setattr (in the interpreter's subprocesses)."""
    from qlora_core.kernels import splitk
    used, real = [], splitk.workspace

    def spy(device, n, tiles):
        ws, cnt = real(device, n, tiles)
        used.append((ws, cnt, n))
        return ws, cnt

    setattr_(splitk, "workspace", spy)
    return used


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


def dequantize_4bit_f64(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape, dtype: torch.dtype,
                        blocksize: int, quant_type: str, nested: tuple | None = None) -> torch.Tensor:
    """bitsandbytes' CUDA dequantize_4bit (docs/format.md), computed in float64 from a checkpoint's own fields and
    written here without qlora_core's code: out[i] = dtype(fp32(code[nibble_i] * absmax[i // blocksize])).

    nested = (nested_absmax, nested_code, offset, nested_blocksize) restores the uint8 absmax first as
    fp32(fp32(nested_code[q] * nested_absmax[j // nested_blocksize]) + offset), two separate fp32 operations. The
    float64 product of two fp32 numbers is exact (48 significant bits), and so is the float64 sum of two fp32
    numbers of similar size, so rounding each to fp32 gives the fp32 operation's result bit for bit; the final cast
    to `dtype` rounds to nearest even as CUDA's does. FP4 code 8 (sign bit, zero magnitude) gives -0.0, as CUDA's
    sign handling does (the quant_map holds +0 there). Packing: element 2j in the high nibble of byte j."""
    n = math.prod(int(d) for d in shape)
    b = packed.reshape(-1).view(torch.uint8).long()
    codes = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n]
    if nested is not None:
        nested_absmax, nested_code, offset, nbs = nested
        a = nested_code.double()[absmax.long()] * nested_absmax.double().repeat_interleave(nbs)[:absmax.numel()]
        absmax = (a.float().double() + offset.double()).float()
    lut = code.double().clone()
    if quant_type == "fp4":
        lut[8] = -0.0
    w = lut[codes] * absmax.double().repeat_interleave(blocksize)[:n]
    return w.float().to(dtype).reshape(tuple(shape))


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def assert_quant_state_is_ours(name: str, packed: torch.Tensor, qs, q) -> None:
    """bitsandbytes' (packed weight, QuantState) equals our QuantizedTensor q field by field, byte for byte:
    packed codes, absmax (uint8 when nested, else fp32), quant_map, blocksize, quant type, dtype, shape, and with
    double quant the offset, nested absmax, nested quant map and nested blocksize."""
    from qlora_core.formats import dynamic_map
    assert _bytes_equal(packed, q.data), f"{name}: packed weight bytes differ"
    assert (qs.quant_type, qs.blocksize, qs.dtype, tuple(qs.shape)) == \
        (q.quant_type, q.blocksize, q.dtype, tuple(q.shape)), f"{name}: quant_type/blocksize/dtype/shape differ"
    assert _bytes_equal(qs.code, q.code), f"{name}: quant_map differs"
    assert _bytes_equal(qs.absmax, q.absmax), f"{name}: absmax differs"
    assert qs.nested == q.double_quant, f"{name}: nested {qs.nested} vs double_quant {q.double_quant}"
    if q.double_quant:
        assert _bytes_equal(qs.offset.reshape(()), q.offset.reshape(())), f"{name}: offset differs"
        assert _bytes_equal(qs.state2.absmax, q.nested_absmax), f"{name}: nested absmax differs"
        assert _bytes_equal(qs.state2.code, dynamic_map(True, q.device)), f"{name}: nested quant_map differs"
        assert qs.state2.blocksize == 256, f"{name}: nested blocksize {qs.state2.blocksize}"


def bnb_dequantize_f64(packed: torch.Tensor, qs) -> torch.Tensor:
    """dequantize_4bit_f64 of a bitsandbytes (packed weight, QuantState)."""
    nested = (qs.state2.absmax, qs.state2.code, qs.offset, qs.state2.blocksize) if qs.nested else None
    return dequantize_4bit_f64(packed, qs.absmax, qs.code, qs.shape, qs.dtype, qs.blocksize, qs.quant_type, nested)


def assert_bnb_checkpoint_matches(model, hf, back=None) -> int:
    """Each QuantLinear of `model` is a bitsandbytes Linear4bit in `hf` (transformers' load of its bnb-4bit
    checkpoint) holding our quant state byte for byte (assert_quant_state_is_ours), with the same bias, whose values
    are bitsandbytes' CUDA dequantization of that state (dequantize_4bit_f64, float64) and equal ours; and (when
    given) `back` (load_llama's read of that checkpoint) holds the same state. Its dense linears stay dense and
    equal in `hf`. Returns how many 4-bit layers were compared.

    bitsandbytes' own CPU dequantize is not the reference: it is known to differ from its CUDA kernel on blocks
    that straddle rows (in_features not a multiple of the blocksize; ../shared/docs/bnb-format.md)."""
    import bitsandbytes as bnb
    n = 0
    for name, m in model.named_modules():
        theirs = hf.get_submodule(name) if name else None
        if type(m).__name__ == "QuantLinear":
            assert isinstance(theirs, bnb.nn.Linear4bit), f"{name}: {type(theirs).__name__}, not Linear4bit"
            q, qs = m.weight, theirs.weight.quant_state
            assert_quant_state_is_ours(name, theirs.weight.data, qs, q)
            ours = q.dequantize()
            assert _bytes_equal(ours, bnb_dequantize_f64(theirs.weight.data, qs)), f"{name}: dequantized values"
            assert (m.bias is None) == (theirs.bias is None) and (m.bias is None or torch.equal(m.bias, theirs.bias))
            if back is not None:
                b = back.get_submodule(name).weight
                fields = ("data", "absmax", "nested_absmax", "offset")
                assert all(_bytes_equal(getattr(b, f), getattr(q, f)) for f in fields if getattr(q, f) is not None) \
                    and (b.shape, b.dtype, b.blocksize, b.quant_type, b.double_quant) == \
                    (q.shape, q.dtype, q.blocksize, q.quant_type, q.double_quant), f"{name}: reloaded state differs"
                assert _bytes_equal(b.dequantize(), ours), f"{name}: reloaded values"
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
