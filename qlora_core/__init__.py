"""qlora-core: QLoRA fine-tuning from scratch: bitsandbytes-exact NF4/FP4, Triton kernels, LoRA, paged AdamW.

Importing this package touches no GPU and imports neither triton nor any optional peer; the heavier parts
(kernels, Llama, training loop) load on first use through the lazy attribute table below.
"""
import importlib as _importlib
import os as _os

from . import _kernels_path

_kernels_path.bind(__name__, _os.path.dirname(__file__))

from .quant import QuantizedTensor, dequantize, quantize  # noqa: E402

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "nf4_linear": "linear",
    "LoRALinear": "lora", "apply_lora": "lora", "merge_lora": "lora", "unmerge_lora": "lora",
    "save_adapter": "adapter", "load_adapter": "adapter",
    "PagedAdamW": "optim",
    "Llama": "llama", "LlamaConfig": "llama", "generate": "generation",
    "load_llama": "loading",
    "train": "train", "TrainConfig": "train",
}

__all__ = ["QuantizedTensor", "quantize", "dequantize", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qlora_core' has no attribute {name!r}")
