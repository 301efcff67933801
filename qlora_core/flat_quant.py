"""`FlatQuantLinear`: the frozen 4-bit linear with its packed state in ONE flat Parameter of bytes, so FSDP2 shards it.

Why: FSDP2 (`fully_shard`) shards a module's Parameters on dim 0 and all-gathers them around each forward and
backward. QuantLinear keeps its QuantizedTensor out of `parameters()` (optimizers, `.half()` and `requires_grad_`
must never touch the packed bytes), which also keeps it out of FSDP's reach: every rank would hold the whole 4-bit
model. Here the packed codes, the absmax (uint8 with double quant, else fp32), the nested absmax and the offset
lie end to end as bytes, each piece 16-byte aligned, in one frozen Parameter `packed`. FSDP2 shards it like
any parameter (1/N of the bytes per rank, no alignment needed between shards) and `weight` rebuilds the
QuantizedTensor as views into the gathered buffer, so forward is still one `nf4_linear` call on the same bytes.

The bytes are held as STORAGE_DTYPE (bfloat16), not uint8: FSDP2 before torch 2.12 wraps each shard in
`nn.Parameter(t)` before copying requires_grad over, which refuses integer tensors (pytorch#177844; seen on the
H200 image's torch 2.11). Nothing computes on these "numbers": they are copied, sharded and gathered, and read
through `.view(torch.uint8)`. bfloat16 because a bf16 MixedPrecisionPolicy or `.bfloat16()` leaves them alone;
other dtype casts (`.half()`, `.float()`) are kept off them by `_apply` below.

Rejected alternative: a tensor subclass with fsdp_pre_all_gather / fsdp_post_all_gather (torchao's NF4Tensor). It
needs the ~20 aten ops FSDP calls on a parameter implemented on the subclass, and dim-0 shards aligned to whole
nested absmax groups (256 blocks of 64 = 16384 elements: 4 rows of a 4096-wide weight, more for narrow ones and
any tiny test model); the flat bytes have neither constraint.

The state dict is QuantLinear's, byte for byte (bitsandbytes `Linear4bit` keys). A sharded `packed` is gathered
first, which is a collective: call state_dict() on every rank.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .ops.nf4_linear import nf4_linear
from .ops.quant4 import QuantizedTensor
from .qlinear import QuantLinear

ALIGN = 16  # bytes: every piece starts 16-byte aligned (fp32 views; vector loads in the kernels)
STORAGE_DTYPE = torch.bfloat16  # how the flat bytes are held as a Parameter (module docstring: why not uint8)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One tensor of a QuantizedTensor inside the flat buffer."""
    name: str  # QuantizedTensor field: data, absmax, nested_absmax or offset
    offset: int  # byte offset in the buffer (multiple of ALIGN)
    shape: tuple  # the tensor's shape
    dtype: torch.dtype  # uint8 or float32

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor (without alignment padding)."""
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Where each piece of one QuantizedTensor lies in its flat buffer, plus the metadata that is not bytes."""
    shape: torch.Size  # the weight's logical (out, in)
    dtype: torch.dtype  # the weight's dtype (dequantized output)
    blocksize: int
    quant_type: str
    double_quant: bool
    pieces: tuple  # Piece per present tensor, in buffer order
    nbytes: int  # buffer length (the last piece padded to ALIGN)


def pack(q: QuantizedTensor) -> tuple[torch.Tensor, FlatLayout]:
    """(flat uint8 buffer (nbytes,) on q's device, its layout): q's tensors copied end to end, 16-byte aligned."""
    pieces, at = [], 0
    for name in ("data", "absmax", "nested_absmax", "offset"):
        t = getattr(q, name)
        if t is None:
            continue
        p = Piece(name, at, tuple(t.shape), t.dtype)
        pieces.append(p)
        at += -(-p.nbytes // ALIGN) * ALIGN
    flat = torch.zeros(at, dtype=torch.uint8, device=q.device)
    for p in pieces:
        src = getattr(q, p.name).detach().contiguous().reshape(-1).view(torch.uint8)
        flat[p.offset:p.offset + p.nbytes] = src
    layout = FlatLayout(shape=q.shape, dtype=q.dtype, blocksize=q.blocksize, quant_type=q.quant_type,
                        double_quant=q.double_quant, pieces=tuple(pieces), nbytes=at)
    return flat, layout


def unpack(flat: torch.Tensor, layout: FlatLayout) -> QuantizedTensor:
    """The QuantizedTensor whose tensors are views into `flat` (uint8 (layout.nbytes,), no copy)."""
    if flat.dtype != torch.uint8 or flat.shape != (layout.nbytes,):
        raise ValueError(f"flat buffer must be uint8 ({layout.nbytes},), got {flat.dtype} {tuple(flat.shape)}")
    views = {p.name: flat[p.offset:p.offset + p.nbytes].view(p.dtype).reshape(p.shape) for p in layout.pieces}
    return QuantizedTensor(data=views["data"], absmax=views["absmax"], shape=layout.shape, dtype=layout.dtype,
                           blocksize=layout.blocksize, quant_type=layout.quant_type,
                           double_quant=layout.double_quant, nested_absmax=views.get("nested_absmax"),
                           offset=views.get("offset"))


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor  # deferred: 0.9 s import, only for several processes
    return isinstance(t, DTensor)


class FlatQuantLinear(nn.Module):
    """y = x @ dequantize(weight).T + bias with the frozen (out, in) weight stored as one Parameter `packed`
    (layout.nbytes bytes held as STORAGE_DTYPE; `packed_bytes()` is its uint8 view).

    Built from a QuantizedTensor or a QuantLinear (`from_quant_linear`); `weight` is the QuantizedTensor view of
    the (gathered) buffer. Outside an FSDP forward a sharded buffer has no whole weight: `weight` raises there.
    """

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, QuantizedTensor) or len(weight.shape) != 2:
            raise TypeError(f"FlatQuantLinear needs a 2-D QuantizedTensor, got {type(weight).__name__}")
        flat, self.layout = pack(weight)
        self.packed = nn.Parameter(flat.view(STORAGE_DTYPE), requires_grad=False)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_quant_linear(cls, m: QuantLinear) -> "FlatQuantLinear":
        """The same weight and bias (bytes copied once into the flat buffer)."""
        return cls(m.weight, m.bias)

    @property
    def weight(self) -> QuantizedTensor:
        """The QuantizedTensor (views into `packed`, no copy). RuntimeError while `packed` is sharded."""
        if _is_sharded(self.packed):
            raise RuntimeError("FlatQuantLinear.weight: the packed weight is sharded across ranks (FSDP) outside "
                               "forward; state_dict() on every rank gathers it")
        return unpack(self.packed_bytes(), self.layout)

    def packed_bytes(self) -> torch.Tensor:
        """`packed` as uint8 (layout.nbytes,), detached (the bytes never take a gradient); this rank's shard when
        sharded."""
        p = self.packed.to_local() if _is_sharded(self.packed) else self.packed
        return p.detach().view(torch.uint8)

    def _apply(self, fn, recurse=True):
        # A dtype cast (.half(), .float(), .to(dtype)) would rewrite the bytes as numbers: let `fn` see them as
        # uint8, which casts skip (device moves still apply), and view the result back as STORAGE_DTYPE.
        packed = self._parameters.get("packed")
        if packed is None or _is_sharded(packed):
            return super()._apply(fn, recurse)
        self._parameters["packed"] = nn.Parameter(packed.detach().view(torch.uint8), requires_grad=False)
        try:
            super()._apply(fn, recurse)
        finally:
            moved = self._parameters["packed"]
            self._parameters["packed"] = nn.Parameter(moved.detach().view(STORAGE_DTYPE),
                                                      requires_grad=packed.requires_grad)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) bf16/fp16/fp32 -> (..., out_features) in x's dtype, via nf4_linear."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nf4_linear(x, self.weight, bias)

    def extra_repr(self) -> str:
        """Features, bias, quant_type, blocksize, double_quant, dtype and the buffer's bytes."""
        lay = self.layout
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={lay.quant_type}, blocksize={lay.blocksize}, double_quant={lay.double_quant}, "
                f"dtype={lay.dtype}, bytes={lay.nbytes}")

    # -- bitsandbytes Linear4bit state dict (QuantLinear's keys and bytes) ------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            b = self.bias.full_tensor() if _is_sharded(self.bias) else self.bias
            destination[prefix + "bias"] = b if keep_vars else b.detach()
        flat = self.packed.full_tensor() if _is_sharded(self.packed) else self.packed
        q = unpack(flat.detach().view(torch.uint8), self.layout)
        for k, v in q.state_dict(prefix).items():
            destination[k] = v.clone()  # standalone tensors: safetensors refuses views sharing one buffer

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if _is_sharded(self.packed):
            error_msgs.append(f"{prefix}weight: load the state dict before sharding (FlatQuantLinear is sharded)")
            return
        probe = QuantLinear(self.weight, self.bias)
        probe._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                    error_msgs)
        flat, layout = pack(probe.weight)
        if layout != self.layout:
            error_msgs.append(f"{prefix}weight: checkpoint layout {layout} != module layout {self.layout}")
            return
        with torch.no_grad():
            self.packed.copy_(flat.view(STORAGE_DTYPE))
            if self.bias is not None:
                self.bias.copy_(probe.bias)


def flatten_quantized(model: nn.Module) -> int:
    """Replace every QuantLinear in `model` (LoRA bases included) by a FlatQuantLinear, in place; returns how many.

    Call before fully_shard. Forward, gradients and the state dict are unchanged (same bytes, same kernels).
    """
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FlatQuantLinear.from_quant_linear(m))
    return len(targets)
