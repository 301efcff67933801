"""Which modules of a model a list of names selects, by PEFT's rules: LoRA's target_modules (lora.py) and
quantize_model's skip list (qlinear.py) both match module paths this way, and both leave the output layer alone."""
from __future__ import annotations

import re
from typing import Sequence

from torch import nn


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
    """The model's output projection: get_output_embeddings() (transformers, our Llama) or an `lm_head`."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return out if out is not None else getattr(model, "lm_head", None)
