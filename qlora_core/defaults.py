"""The library's defaults, stated once: `LoraConfig`, `apply_lora`, `PagedAdamW`, `load_llama`, `TrainConfig` and
the `qlora` command all read them from here, so a Python user and a CLI user get the same run.

The values are the QLoRA recipe this library exists for where it differs from the peers: PEFT's LoraConfig starts
at r=8, alpha=8 on q/v only and bitsandbytes' PagedAdamW at 32-bit states with weight decay 0.01; here LoRA goes on
every projection at r=16, alpha=32, and the optimizer keeps 8-bit states without weight decay (decay pulls the
small LoRA matrices towards zero, undoing the update it is meant to regularize). Dropout stays PEFT's 0, so a
LoraConfig copied from a PEFT script that leaves lora_dropout out behaves as it did there.
"""
from __future__ import annotations

import dataclasses

import torch

LORA_R = 16  # rank of each LoRA update B @ A
LORA_ALPHA = 32.0  # scaling numerator: scaling = alpha / r (2.0 at the default rank)
LORA_DROPOUT = 0.0  # dropout probability on the LoRA input (the base layer never sees it)
# All seven Llama projections: the QLoRA paper adapts every linear layer (PEFT's own default is q_proj, v_proj).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

OPTIM_BITS = 8  # PagedAdamW state bits: 8 (bitsandbytes-style blockwise) or 32
WEIGHT_DECAY = 0.0  # PagedAdamW decoupled weight decay
ADAM_BETAS = (0.9, 0.999)  # PagedAdamW (beta1, beta2), torch.optim.AdamW's

QUANT_TYPE = "nf4"  # 4-bit data type of quantized weights
BLOCKSIZE = 64  # elements per absmax block
DOUBLE_QUANT = True  # quantize the absmax too (bitsandbytes compress_statistics=True)

# The float dtypes the 4-bit format dequantizes to and the Triton kernels take (float64 runs the reference).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}  # as --dtype and TrainConfig.dtype spell them


def setting(default, help: str) -> dataclasses.Field:  # noqa: A002 - argparse's name for it
    """A dataclass field with a default and its help text (meaning and units) in metadata["help"]: the `qlora train`
    flags are built from LoraConfig's and TrainConfig's fields and this text (cli.add_train_args)."""
    return dataclasses.field(default=default, metadata={"help": help})


def default_dtype(device: str | torch.device | None) -> torch.dtype:
    """The model dtype when the caller names none: bfloat16 on CUDA, float32 elsewhere.

    Why float32 on the CPU: CPUs without bf16 matmul units run bf16 through conversions, about 4x slower than
    fp32 for the same model, and memory is rarely the limit there.
    """
    device = torch.device(device if device is not None else "cpu")
    return torch.bfloat16 if device.type == "cuda" else torch.float32
