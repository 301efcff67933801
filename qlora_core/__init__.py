"""qlora-core: QLoRA fine-tuning from scratch: bitsandbytes-exact NF4/FP4, Triton kernels, LoRA, paged AdamW.

    import qlora_core as qc
    model = qc.quantize_model(model)                      # nn.Linear -> 4-bit QuantLinear, any nn.Module
    qc.apply_lora(model, qc.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05))
    ...train...; qc.save_adapter(model, "out")            # PEFT format
    qc.merge_and_unload(model)                            # or qc.save_merged / qc.save_quantized (HF folders)

Importing this package touches no GPU and imports neither triton nor any optional peer; the heavier parts
(kernels, Llama, training loop) load on first use through the lazy attribute table below.
"""
import importlib as _importlib
import os as _os

from . import _kernels_path

_kernels_path.bind(__name__, _os.path.dirname(__file__))

from .ops.quant4 import QuantizedTensor, dequantize, quantize  # noqa: E402

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "nf4_linear": "ops.nf4_linear",
    "QuantLinear": "qlinear", "Linear4bit": "qlinear", "quantize_model": "qlinear",
    "LoraConfig": "lora", "LoRALinear": "lora", "apply_lora": "lora", "merge_lora": "lora", "unmerge_lora": "lora",
    "unload_lora": "lora", "merge_and_unload": "lora",
    "save_adapter": "adapter", "load_adapter": "adapter",
    "save_merged": "export", "save_quantized": "export", "merge_adapter": "export",
    "save_gguf": "export",
    "PagedAdamW": "optim", "PagedAdamW8bit": "optim", "PagedAdamW32bit": "optim",
    "Llama": "llama", "LlamaConfig": "model_config", "generate": "generation",
    "load_llama": "loading",
    "train": "train_loop", "TrainConfig": "train_config",
}

__all__ = ["QuantizedTensor", "quantize", "dequantize", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qlora_core' has no attribute {name!r}")


def __dir__():
    # the lazy names too, so dir(qc) and tab completion show the whole public API before first use
    return sorted(set(globals()) | set(_LAZY))
