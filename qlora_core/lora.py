"""LoRA over frozen dense or 4-bit linear layers: `LoraConfig`, `LoRALinear`, `apply_lora`, `merge_lora`,
`unmerge_lora`, `unload_lora`, `merge_and_unload`.

y = base(x) + scaling * dropout(x) @ A.T @ B.T with A (r, in) and B (out, r) trainable, the base frozen, and
scaling = alpha / r (alpha / sqrt(r) with use_rslora). Everything mirrors PEFT's `lora.Linear` so adapters
move between the two (adapter.py): A starts Kaiming-uniform (a=sqrt(5), nn.Linear's default), B starts at zero
(a fresh adapter is a no-op), the LoRA input is cast to the LoRA dtype before dropout, and the sum is cast back
to the base output's dtype. The module names follow PEFT too: the wrapped layer stays at `<path>.base_layer`.

The base is an nn.Linear or a `QuantLinear` (qlinear.py: a QuantizedTensor run through `nf4_linear`), or any
module whose `weight` attribute is a QuantizedTensor. `LoRALinear.forward` runs the base, then the LoRA path as two
small matmuls in PyTorch. Our Llama's blocks go through `project` (the end of this file) instead: when grad is on
or x has more than 16 rows it runs the projections that share an input as one group of ops/nf4_linear.py (their
frozen weights dequantized into one buffer and multiplied by one GEMM, the LoRA down/up-projections as two more
GEMMs, PEFT's semantics); otherwise (decode) module by module through `LoRALinear.forward`.

Merging: `merge_lora` folds scaling * B @ A into the base weight, computed in fp32 and rounded once to the base
dtype. A 4-bit base is dequantized first, and then either stays dense (nn.Linear, the default) or is
re-quantized with the same format (`requantize=True`, adding a second quantization error). The pre-merge base
module is kept aside (not registered, so it is not in state_dict or parameters), which makes `unmerge_lora`
exact in every case: it puts back the very same module. Cost: the dense base is held twice while merged; the
4-bit one adds only the dense merged copy.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Sequence

import torch
from torch import nn

from . import backend
from .defaults import LORA_ALPHA, LORA_DROPOUT, LORA_R, LORA_TARGETS, setting
from .errors import UsageError
from .ops.nf4_linear import LinearGroup, Member, group_linear
from .ops.quant4 import QuantizedTensor, dequantize, quantize
from .qlinear import QuantLinear
from .targets import fuse_targets, fused_name, output_layer, target_matches, unmatched_targets

LLAMA_TARGETS = LORA_TARGETS  # the default target_modules (defaults.py): all seven Llama projections
LORA_DTYPES = (torch.float32, torch.bfloat16)


class LoraConfigError(UsageError, ValueError):
    """A LoRA hyper-parameter out of range (r <= 0, dropout outside [0, 1), unsupported dtype, ...)."""


class TargetModuleError(UsageError, ValueError):
    """target_modules matches no linear layer, or matches a module that cannot take LoRA."""


@dataclasses.dataclass
class LoraConfig:
    """What apply_lora needs, in PEFT's spellings (`LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
    target_modules=[...])` from a PEFT script works as is); save_adapter writes these into adapter_config.json.
    Defaults: qlora_core/defaults.py. `alpha` and `dropout` read lora_alpha and lora_dropout."""
    r: int = setting(LORA_R, "rank of the update B @ A")
    lora_alpha: float = setting(LORA_ALPHA, "scale numerator: scaling = lora_alpha / r (/ sqrt(r) with use_rslora)")
    lora_dropout: float = setting(LORA_DROPOUT, "dropout probability on the LoRA input; the base never sees it")
    target_modules: Sequence[str] | str = setting(
        LLAMA_TARGETS, "names matched as PEFT does: list = exact path or '.name' suffix, each entry must match a "
        "module; str = regex fullmatch on the whole module path; 'all-linear' = every linear layer but the output one")
    use_rslora: bool = setting(False, "rank-stabilized scaling lora_alpha / sqrt(r) (Kalajdzievski 2023)")
    dtype: torch.dtype = setting(torch.float32, "storage dtype of A and B: float32 or bfloat16")
    bias: str = setting("none", "PEFT's field; only 'none' (biases stay frozen) is supported")
    task_type: str | None = setting(None, "PEFT's field, informational ('CAUSAL_LM' is what save_adapter writes)")

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoraConfigError(f"r must be a positive int, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or \
                not math.isfinite(self.lora_alpha):
            raise LoraConfigError(f"lora_alpha (alpha) must be a finite number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= float(self.lora_dropout) < 1.0:
            raise LoraConfigError(f"lora_dropout (dropout) must be in [0, 1), got {self.lora_dropout!r}")
        if self.dtype not in LORA_DTYPES:
            raise LoraConfigError(f"LoRA dtype must be float32 or bfloat16, got {self.dtype}")
        if self.bias != "none":
            raise LoraConfigError(f"bias={self.bias!r} is not supported (only 'none': biases stay frozen)")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise LoraConfigError(f"task_type={self.task_type!r} is not supported (only 'CAUSAL_LM' or None)")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise TargetModuleError(f"target_modules regex {self.target_modules!r} does not compile: {e}") from None
        else:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise TargetModuleError(f"target_modules must be non-empty names, got {self.target_modules!r}")

    @property
    def alpha(self) -> float:
        """lora_alpha (the name LoRALinear and apply_lora's keyword form use)."""
        return self.lora_alpha

    @property
    def dropout(self) -> float:
        """lora_dropout (the name LoRALinear and apply_lora's keyword form use)."""
        return self.lora_dropout

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with use_rslora."""
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """The multiplier on B @ A: alpha / sqrt(r) with use_rslora, else alpha / r (PEFT's rule)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def is_quantized_linear(module: nn.Module) -> bool:
    """A module holding a QuantizedTensor as its `weight` (our QuantLinear, or a look-alike)."""
    return isinstance(getattr(module, "weight", None), QuantizedTensor)


def _base_shape(base: nn.Module) -> tuple[int, int]:
    w = base.weight
    shape = tuple(w.shape)
    if len(shape) != 2:
        raise TypeError(f"LoRA base weight must be 2-D (out, in), got shape {shape}")
    return shape


class LoRALinear(nn.Module):
    """A frozen linear base plus a trainable low-rank update: base(x) + scaling * B(A(dropout(x))).

    base: nn.Linear, QuantLinear (or any module whose `weight` is a QuantizedTensor), a QuantizedTensor
    (wrapped into a QuantLinear) or a dense (out, in) weight tensor (wrapped into an nn.Linear); `bias`
    only for the last two. lora_A (r, in) and lora_B (out, r) are Parameters in `dtype` on the base's device.
    """

    def __init__(self, base: nn.Module | QuantizedTensor | torch.Tensor, r: int = LORA_R, alpha: float = LORA_ALPHA,
                 dropout: float = LORA_DROPOUT, use_rslora: bool = False, dtype: torch.dtype = torch.float32,
                 bias: torch.Tensor | None = None):
        super().__init__()
        LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora, dtype=dtype)  # validates
        if isinstance(base, QuantizedTensor):
            base = QuantLinear(base, bias)
        elif isinstance(base, torch.Tensor):
            if base.dim() != 2:
                raise TypeError(f"LoRA base weight must be 2-D (out, in), got shape {tuple(base.shape)}")
            base = _dense_linear(base, bias)
        elif not (isinstance(base, nn.Linear) or is_quantized_linear(base)):
            raise TypeError(f"LoRA base must be nn.Linear, a quantized linear, a QuantizedTensor or a weight "
                            f"tensor, got {type(base).__name__}")
        elif bias is not None:
            raise TypeError("bias= is only for a tensor or QuantizedTensor base; a module brings its own bias")
        out_f, in_f = _base_shape(base)
        base.requires_grad_(False)
        self.base_layer = base
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=device, dtype=dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        # The pre-merge base while merged; plain attribute, so not in state_dict / parameters / children.
        self.__dict__["_unmerged_base"] = None

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with use_rslora (the multiplier on B @ A)."""
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    @property
    def dropout(self) -> float:
        """Dropout probability on the LoRA input (0.0 when it is an nn.Identity)."""
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def set_dropout(self, p: float) -> None:
        """Replace the LoRA-input dropout with probability p (0 installs an nn.Identity).

        Raises LoraConfigError unless 0 <= p < 1. The base path never sees dropout.
        """
        LoraConfig(r=self.r, lora_dropout=p)  # validates
        self.lora_dropout = (nn.Dropout(p) if p > 0 else nn.Identity()).train(self.training)  # keep the mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features): base(x) + scaling * B(A(dropout(x))) (base only if merged)."""
        y = self.base_layer(x)
        if self.merged:
            return y
        h = self.lora_dropout(x.to(self.lora_A.dtype))
        # Same expression and order as PEFT's lora.Linear.forward (bitwise-equal logits vs peft 0.21.2, CPU fp32).
        return (y + nn.functional.linear(nn.functional.linear(h, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, (out, in)."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The base weight with the adapter folded in, (out, in) in the base dtype: W + scaling * B @ A summed in
        fp32 and rounded once (a 4-bit base is dequantized first); the base itself when already merged."""
        base = self.base_layer
        w = dequantize(base.weight) if is_quantized_linear(base) else base.weight.detach()
        return w if self.merged else (w.float() + self.delta_weight()).to(w.dtype)

    @torch.no_grad()
    def merge(self, requantize: bool = False) -> None:
        """Fold the adapter into the base (see module docstring); a no-op if already merged."""
        if self.merged:
            return
        base = self.base_layer
        quantized = is_quantized_linear(base)
        merged_w = self.merged_weight()
        bias = getattr(base, "bias", None)
        bias = None if bias is None else bias.detach().clone()
        if quantized and requantize:
            q = base.weight
            new = QuantLinear(quantize(merged_w, quant_type=q.quant_type, blocksize=q.blocksize,
                                       double_quant=q.double_quant), bias)
        else:
            new = _dense_linear(merged_w, bias)
        new.requires_grad_(False)
        self.__dict__["_unmerged_base"] = base
        self.base_layer = new
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the exact pre-merge base (moved to the current device); a no-op if not merged."""
        if not self.merged:
            return
        base = self.__dict__["_unmerged_base"]
        device = self.lora_A.device
        if _module_device(base) != device:
            base = base.to(device)
        self.base_layer = base
        self.__dict__["_unmerged_base"] = None
        self.merged = False

    def extra_repr(self) -> str:
        """Features, r, alpha, scaling, rslora and merged, for print(module)."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.use_rslora}, merged={self.merged}")


@torch.no_grad()
def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of weight (out, in) / bias; skip_init: no wasted init, no RNG draw."""
    lin = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                             device=weight.device, dtype=weight.dtype)
    lin.weight.copy_(weight)
    if bias is not None:
        lin.bias.copy_(bias)
    return lin


def _module_device(m: nn.Module) -> torch.device:
    w = m.weight
    return w.device


@dataclasses.dataclass(frozen=True)
class LoraParamCount:
    """apply_lora's result. total counts every parameter once, a 4-bit weight by its logical element count
    (out * in, as PEFT's print_trainable_parameters does), not by its packed bytes."""
    trainable: int  # elements of all LoRA A and B matrices (the only parameters left requiring grad)
    total: int  # trainable + frozen elements

    @property
    def fraction(self) -> float:
        """trainable / total (0.0 when total is 0)."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {100 * self.fraction:.4f}")


def all_linear_names(model: nn.Module) -> tuple[str, ...]:
    """PEFT's "all-linear" expansion: the leaf names of every linear layer, minus the output layer's name."""
    out = output_layer(model)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if n and (isinstance(m, nn.Linear) or is_quantized_linear(m))}
    out_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if out is not None and m is out}
    return tuple(sorted(names - out_names))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRALinear for every adapter in `model`, in named_modules order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_parameters(model: nn.Module) -> LoraParamCount:
    """LoraParamCount of any module: trainable = elements of parameters that require grad; total adds the frozen
    ones and each 4-bit weight's logical out * in elements (not its packed bytes). Tied parameters count once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(math.prod(m.weight.shape) for m in model.modules() if is_quantized_linear(m))
    return LoraParamCount(trainable=trainable, total=total)


def check_targets(model: nn.Module, target_modules: Sequence[str] | str) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs `target_modules` (a list or a regex, not "all-linear") selects in `model`, all of
    them linear; TargetModuleError naming an entry that matches nothing (with the closest module name) or a
    matched module that is not linear. Reads only names and types, so a meta-device model serves."""
    missing = unmatched_targets(model, target_modules)
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        hints = {t: [fused_name(model, t)] if fused_name(model, t) else difflib.get_close_matches(t, leaves, n=1)
                 for t in missing}
        hint = "; ".join(f"{t!r} (did you mean {h[0]!r}?)" if h else repr(t) for t, h in hints.items())
        raise TargetModuleError(f"target_modules entry {hint} matches no module of {type(model).__name__}; "
                                f"every entry must name a module (linear layers here: "
                                f"{list(all_linear_names(model))})")
    matches = [(name, m) for name, m in model.named_modules() if name and target_matches(target_modules, name)]
    bad = [f"{name} ({type(m).__name__})" for name, m in matches
           if not (isinstance(m, nn.Linear) or is_quantized_linear(m))]
    if bad:
        raise TargetModuleError(f"target_modules={target_modules!r} matches modules that are not linear "
                                f"layers: {bad[:5]}")
    return matches


def _resolve_config(config: LoraConfig | None, kw: dict) -> LoraConfig:
    """A LoraConfig from `config` with the keyword arguments that are not None laid over it; both spellings
    (alpha / lora_alpha, dropout / lora_dropout) are accepted, LoraConfigError if both are given and differ."""
    for ours, peft_name in (("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
        a, b = kw.pop(ours), kw.get(peft_name)
        if a is not None and b is not None and a != b:
            raise LoraConfigError(f"{ours}={a!r} and {peft_name}={b!r} name the same setting; pass one")
        if a is not None:
            kw[peft_name] = a
    kw = {k: v for k, v in kw.items() if v is not None}
    if config is None:
        return LoraConfig(**kw)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"apply_lora's config must be a qlora_core LoraConfig, got {type(config).__name__} "
                        f"(build one with the same keywords: LoraConfig(r=..., lora_alpha=..., ...))")
    return dataclasses.replace(config, **kw)


def resolve_targets(model: nn.Module, target_modules: Sequence[str] | str) -> Sequence[str] | str:
    """target_modules as apply_lora applies it to `model`: the default (LLAMA_TARGETS) names Phi-3's fused
    qkv_proj / gate_up_proj in place of their parts, and becomes "all-linear" on a model with none of the Llama
    names; "all-linear" becomes all_linear_names(model) (TargetModuleError when that is empty); else as given."""
    if target_modules == LLAMA_TARGETS:
        target_modules = fuse_targets(model, LLAMA_TARGETS)
        if len(unmatched_targets(model, LLAMA_TARGETS)) == len(LLAMA_TARGETS):
            target_modules = "all-linear"
    if isinstance(target_modules, str) and target_modules == "all-linear":
        names = all_linear_names(model)
        if not names:
            raise TargetModuleError(f"target_modules='all-linear': {type(model).__name__} has no linear layer "
                                    f"besides its output layer")
        return names
    return target_modules


def apply_lora(model: nn.Module, config: LoraConfig | None = None, *, r: int | None = None,
               alpha: float | None = None, dropout: float | None = None,
               target_modules: Sequence[str] | str | None = None, use_rslora: bool | None = None,
               dtype: torch.dtype | None = None, lora_alpha: float | None = None,
               lora_dropout: float | None = None) -> LoraParamCount:
    """Wrap every nn.Linear / quantized linear whose path matches `target_modules` in a LoRALinear, in place.

    Either `apply_lora(model, LoraConfig(r=8, lora_alpha=16, ...))` (PEFT's spellings) or the keyword form
    `apply_lora(model, r=8, alpha=16, dropout=0.05, target_modules=[...])`; keywords given with a config override
    its fields; unset values take qlora_core/defaults.py's. target_modules="all-linear" is expanded as PEFT does
    (all_linear_names: every linear but the output layer) before matching and saving; the default targets (the
    seven Llama projections) become "all-linear" on a model that has none of those names (an MLP, any module), and
    name Phi-3's fused qkv_proj / gate_up_proj in place of q/k/v and gate/up (resolve_targets); an explicit
    list is taken as given (PEFT's rule: "q_proj" cannot select a third of qkv_proj). Freezes every other parameter
    (bias "none", as PEFT), stores the LoraConfig as `model.lora_config` (used by save_adapter) and returns
    LoraParamCount(trainable, total).
    Raises LoraConfigError for bad r / alpha / dropout / dtype, TargetModuleError when an entry of a
    target_modules list (or the regex) matches no module (the message names it: a typo such as "vproj" is
    not silently left out), when a match is not a linear layer, or when the model already carries adapters.
    """
    cfg = _resolve_config(config, dict(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                                       use_rslora=use_rslora, dtype=dtype, lora_alpha=lora_alpha,
                                       lora_dropout=lora_dropout))
    cfg = dataclasses.replace(cfg, target_modules=resolve_targets(model, cfg.target_modules))
    if lora_modules(model):
        raise TargetModuleError("model already has LoRA adapters; merge/unload them or load into them instead")
    matches = check_targets(model, cfg.target_modules)
    model.requires_grad_(False)
    for name, m in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear(m, r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora,
                           dtype=cfg.dtype)
        setattr(parent, child, layer.train(m.training))  # a model in eval mode stays in eval mode (no dropout)
    model.lora_config = cfg
    return count_parameters(model)


def merge_lora(model: nn.Module, requantize: bool = False) -> int:
    """Fold every adapter of `model` into its base (LoRALinear.merge); returns how many were merged.

    requantize=False leaves a 4-bit base dense (exact merged weight in the base dtype); True re-quantizes it
    with the same quant_type / blocksize / double_quant. A dense base stays dense either way.
    """
    mods = lora_modules(model)
    if not mods:
        raise TargetModuleError(f"{type(model).__name__} has no LoRA adapters to merge")
    n = 0
    for m in mods.values():
        if not m.merged:
            m.merge(requantize=requantize)
            n += 1
    return n


def unmerge_lora(model: nn.Module) -> int:
    """Undo merge_lora exactly (the original base modules come back); returns how many were unmerged."""
    mods = lora_modules(model)
    if not mods:
        raise TargetModuleError(f"{type(model).__name__} has no LoRA adapters to unmerge")
    n = 0
    for m in mods.values():
        if m.merged:
            m.unmerge()
            n += 1
    return n


def unload_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by its base layer (merged or not, as it stands), dropping A and B; in place.

    After `merge_lora(model)` this gives a plain model with HF-style state dict keys (`...q_proj.weight`).
    """
    for name, m in list(lora_modules(model).items()):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base_layer)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def merge_and_unload(model: nn.Module, requantize: bool = False) -> nn.Module:
    """merge_lora then unload_lora, in place (PEFT's `merge_and_unload`); returns the model, now without LoRA.

    Each adapted layer becomes its merged base: nn.Linear in the base dtype (W + scaling * B @ A summed in fp32,
    rounded once; a 4-bit base dequantized first), or, with requantize=True, a 4-bit base re-quantized in its own
    format. Layers without adapters are left as they are. TargetModuleError when the model has no adapters.
    """
    merge_lora(model, requantize=requantize)
    return unload_lora(model)


# -- grouped projections: the modules' side of ops/nf4_linear.py's grouped path ----------------------------------------
def member_of(module: nn.Module) -> Member | None:
    """Member for a frozen nn.Linear, a quantized linear or a LoRALinear over one of them; None for anything else
    (a base with a trainable weight or bias keeps its own module path, which produces those grads)."""
    lora = None
    if isinstance(module, LoRALinear):
        lora = None if module.merged else module
        module = module.base_layer
    if not (isinstance(module, nn.Linear) or is_quantized_linear(module)):
        return None
    if any(p.requires_grad for p in module.parameters()):
        return None
    w = module.weight
    if isinstance(w, torch.Tensor) and w.dim() != 2:
        return None
    return Member(weight=w if isinstance(w, QuantizedTensor) else w.detach(), bias=getattr(module, "bias", None),
                  lora=lora, out_features=int(w.shape[0]))


def linear_group(modules) -> LinearGroup | None:
    """The LinearGroup of `modules` (same in_features), or None when any of them cannot join (`member_of`)."""
    members = [member_of(m) for m in modules]
    if any(m is None for m in members) or len({int(m.weight.shape[1]) for m in members}) != 1:
        return None
    return LinearGroup(members)


def project(x: torch.Tensor, modules, owner: nn.Module) -> torch.Tensor:
    """The outputs of `modules` for input x side by side, (..., sum N_i): through one group_linear where they can be
    grouped and grad is on or x has more than 16 rows (without grad the decode kernels serve M <= 16 per module),
    else module by module.

    The LinearGroup is cached on `owner` and rebuilt when a module was swapped or merged; `owner.fuse_projections =
    False` turns grouping off (the module-by-module reference path). Under torch.compile it is built afresh in
    the trace instead (no cache: writing one from inside a checkpointed block is a side effect Dynamo refuses).
    """
    rows = x.numel() // max(1, x.shape[-1])
    group = None
    if not getattr(owner, "fuse_projections", True) or not (rows > 16 or torch.is_grad_enabled()):
        pass
    elif backend.compiling():
        group = linear_group(modules)
    else:
        key = tuple((id(m), getattr(m, "merged", None)) for m in modules)
        cache = owner.__dict__.setdefault("_linear_groups", {})
        if key not in cache:
            if len(cache) >= 8:  # modules were swapped or merged since: drop the stale groups
                cache.clear()
            cache[key] = linear_group(modules)
        group = cache[key]
    if group is None:
        outs = [m(x) for m in modules]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return group_linear(x, group)
