"""`QuantLinear`: a frozen 4-bit linear layer (bitsandbytes `Linear4bit` look-alike) over a QuantizedTensor.

The module is a parameter holder with a one-line forward (`nf4_linear`). Its `weight` attribute is the
QuantizedTensor itself, not a Parameter: it is never trained, and keeping it out of `parameters()` stops
optimizers, `.half()` and `requires_grad_` from touching the packed bytes. Two consequences are handled here:
- state dict: `weight` is written and read under bitsandbytes' `Linear4bit` keys (`weight`, `weight.absmax`,
  `weight.quant_map`, ..., `weight.quant_state.bitsandbytes__nf4`) through QuantizedTensor.state_dict /
  from_state_dict, so a bnb-4bit checkpoint loads here and ours loads into bnb.
- device moves: `Module._apply` only visits Parameters and buffers, so `_apply` is extended to move the
  QuantizedTensor to the device `fn` sends tensors to. Dtype casts (`.half()`, `.to(torch.bfloat16)`) never
  reach it: casting absmax to fp16 would corrupt the state. The bias follows the module like any Parameter.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .defaults import BLOCKSIZE, DOUBLE_QUANT, QUANT_TYPE
from .ops.nf4_linear import nf4_linear
from .ops.quant4 import QuantizedTensor, QuantStateError, quantize
from .targets import output_layer, output_layer_name, target_matches, unmatched_targets


class QuantLinear(nn.Module):
    """y = x @ dequantize(weight).T + bias, with `weight` a frozen (out_features, in_features) QuantizedTensor."""

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, QuantizedTensor):
            raise TypeError(f"QuantLinear needs a QuantizedTensor weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"QuantLinear weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = weight
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = QUANT_TYPE, blocksize: int = BLOCKSIZE,
                    double_quant: bool = DOUBLE_QUANT) -> "QuantLinear":
        """Quantize a dense nn.Linear's weight (its dtype becomes the QuantizedTensor's dtype)."""
        q = quantize(linear.weight.detach(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        return cls(q, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) bf16/fp16/fp32 -> (..., out_features) in x's dtype, via nf4_linear."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nf4_linear(x, self.weight, bias)

    def extra_repr(self) -> str:
        """Features, bias and the weight's quant_type, blocksize, double_quant and dtype, for print(module)."""
        q = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={q.quant_type}, blocksize={q.blocksize}, double_quant={q.double_quant}, "
                f"dtype={q.dtype}")

    # -- device moves ----------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # Learn where fn sends tensors from an empty float probe; follow only the device, never a dtype cast.
        device = fn(torch.empty(0, device=self.weight.device)).device
        if device != self.weight.device:
            self.weight = self.weight.to(device)
        return super()._apply(fn, recurse)

    # -- bitsandbytes Linear4bit state dict ------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias, if any
        for k, v in self.weight.state_dict(prefix).items():
            destination[k] = v

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {k: v for k, v in state_dict.items() if k == prefix + "weight" or k.startswith(prefix + "weight.")}
        if prefix + "weight" not in mine:
            missing_keys.append(prefix + "weight")
        else:
            try:
                q = QuantizedTensor.from_state_dict(mine, prefix)
            except QuantStateError as e:
                error_msgs.append(f"{prefix}weight: {e}")
            else:
                if tuple(q.shape) != (self.out_features, self.in_features):
                    error_msgs.append(f"{prefix}weight: checkpoint shape {tuple(q.shape)} != module shape "
                                      f"({self.out_features}, {self.in_features})")
                else:
                    self.weight = q.to(self.weight.device)
        # The bias goes through the standard path; our weight.* keys must not be reported as unexpected.
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# bitsandbytes' name, for readers coming from there: the same state-dict keys and forward, but built from a
# QuantizedTensor (or `Linear4bit.from_linear(nn.Linear)`), not from (in, out) sizes quantized on `.cuda()`.
Linear4bit = QuantLinear


@torch.no_grad()
def quantize_model(module: nn.Module, quant_type: str = QUANT_TYPE, blocksize: int = BLOCKSIZE,
                   double_quant: bool = DOUBLE_QUANT, skip: Sequence[str] | str = (),
                   quantize_output: bool = False) -> nn.Module:
    """Replace every nn.Linear of `module` (any nn.Module) by a QuantLinear holding its 4-bit weight, in place;
    returns the module.

    quant_type "nf4" / "fp4", blocksize (power of two, 32..4096) and double_quant as in `quantize`; each
    weight keeps its own dtype as the dequantized dtype, biases stay dense. skip: module paths left dense, matched
    as target_modules are (a list entry equals the path or is its last '.'-part; a str is a regex fullmatched on
    the path); every list entry, or the regex, must match some module (ValueError naming it otherwise). The
    output layer (targets.output_layer: get_output_embeddings(), else `lm_head`, else the last linear layer in
    module order, e.g. an MLP's `head`) stays dense too, as in QLoRA and transformers' bnb loading, unless
    quantize_output=True; its path is recorded as `module.dense_output_layer` (None when quantized or absent). A linear whose weight is shared with another module (tied embeddings)
    always stays dense: quantizing it would silently untie the pair. ValueError for a meta or non-finite weight,
    naming the layer.
    """
    if isinstance(module, nn.Linear):
        raise TypeError("quantize_model converts the nn.Linear layers inside a module; for one layer use "
                        "QuantLinear.from_linear(linear)")
    skip = skip if isinstance(skip, str) else tuple(skip)
    missing = unmatched_targets(module, skip)
    if missing:
        raise ValueError(f"quantize_model: skip entries {missing} match no module of {type(module).__name__}")
    out = None if quantize_output else output_layer(module)
    module.dense_output_layer = None if quantize_output else output_layer_name(module)
    uses: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    # nn.MultiheadAttention reads its out_proj.weight directly (F.multi_head_attention_forward), never calling
    # the submodule, so a QuantLinear there would be bypassed
    mha = {f"{n}.out_proj" if n else "out_proj" for n, m in module.named_modules()
           if isinstance(m, nn.MultiheadAttention)}
    targets = [(n, m) for n, m in module.named_modules()
               if n and isinstance(m, nn.Linear) and m is not out and n not in mha and not target_matches(skip, n)
               and uses[id(m.weight)] == 1]
    for name, lin in targets:
        try:
            q = QuantLinear.from_linear(lin, quant_type, blocksize, double_quant)
        except ValueError as e:
            raise ValueError(f"quantize_model: {name}.weight: {e}") from None
        module.set_submodule(name, q)
    return module
