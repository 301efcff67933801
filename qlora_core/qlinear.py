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

import torch
from torch import nn

from .quant import QuantizedTensor, QuantStateError, quantize


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
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> "QuantLinear":
        """Quantize a dense nn.Linear's weight (its dtype becomes the QuantizedTensor's dtype)."""
        q = quantize(linear.weight.detach(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        return cls(q, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) bf16/fp16/fp32 -> (..., out_features) in x's dtype, via nf4_linear."""
        from .linear import nf4_linear  # noqa: PLC0415 (keeps `import qlora_core.qlinear` light)
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
