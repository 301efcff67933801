"""Which modules of a model a list of names selects, by PEFT's rules: LoRA's target_modules (lora.py) and
quantize_model's skip list (qlinear.py) both match module paths this way, and both leave the output layer alone
(output_layer: get_output_embeddings(), else `lm_head`, else the last linear layer)."""
from __future__ import annotations

import re
from typing import Sequence

from torch import nn

from .ops.quant4 import QuantizedTensor


# Phi-3's fused projections and the Llama projections each stacks (rows in this order): PEFT targets the fused
# module as one linear (one LoRA A/B over the stacked weight), so a Llama name cannot select a part of it.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fused_name(model: nn.Module, name: str) -> str | None:
    """The fused module of `model` that holds projection `name` ("q_proj" -> "qkv_proj" on Phi-3), else None."""
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
    return next((f for f, parts in FUSED_PARTS.items() if name in parts and f in leaves), None)


def fuse_targets(model: nn.Module, names: Sequence[str]) -> tuple[str, ...]:
    """names (a target list) with each projection `model` holds only inside a fused module replaced by that
    module's name, once: the seven Llama projections become qkv_proj, o_proj, gate_up_proj, down_proj on Phi-3."""
    out: list[str] = []
    for n in names:
        f = fused_name(model, n) if unmatched_targets(model, (n,)) else None
        if (f or n) not in out:
            out.append(f or n)
    return tuple(out)


def target_matches(target_modules: Sequence[str] | str, name: str) -> bool:
    """PEFT's rule (tuners_utils.check_target_module_exists): a str is a regex that must fullmatch the module
    path; a list matches a path equal to an entry or ending in '.' + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def unmatched_targets(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """The entries of a target_modules list that match no module path of `model` (PEFT's rule, target_matches);
    [] for a regex string that matches something, [the regex] for one that matches nothing."""
    names = [name for name, _ in model.named_modules() if name]
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return [t for t in entries if not any(target_matches(t if isinstance(target_modules, str) else (t,), n)
                                          for n in names)]


def output_layer(model: nn.Module) -> nn.Module | None:
    """The model's output projection, left dense by quantize_model and left out of "all-linear": its
    get_output_embeddings() (transformers, our Llama), else its `lm_head`, else (a plain nn.Sequential / MLP) its
    last linear layer in module order (nn.Linear or 4-bit linear); None for a model with no linear layer."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    out = out if out is not None else getattr(model, "lm_head", None)
    if out is None:
        for m in model.modules():
            if m is not model and (isinstance(m, nn.Linear) or isinstance(getattr(m, "weight", None),
                                                                          QuantizedTensor)):
                out = m
    return out


def output_layer_name(model: nn.Module) -> str | None:
    """The module path of output_layer(model) ("lm_head", "head", "4", ...); None when there is none."""
    out = output_layer(model)
    return next((n for n, m in model.named_modules() if m is out), None) if out is not None else None
