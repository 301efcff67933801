"""Our Llama: the `Llama` nn.Module, run from a `LlamaConfig` (model_config.py: config.json's fields per family).

The same module runs the Llama family checkpoints whose blocks share Llama's math: Llama 2/3/3.1/3.2 and SmolLM
(model_type "llama"), Mistral ("mistral": no biases; a sliding window on every layer), Qwen2 / Qwen2.5 ("qwen2":
biases on q/k/v only; windows on the layers `layer_types` names), dense Qwen3 ("qwen3": a per-head RMSNorm on q
and k before RoPE, `qk_norm`; head_dim independent of hidden_size / heads), Phi-3 / Phi-4 ("phi3": no biases; q/k/v
fused into one `qkv_proj` and gate/up into one `gate_up_proj` as in the checkpoint, `fused_qkv_gate_up`; LongRoPE
on the long-context variants; partial rotary on Phi-4-mini; a window on every layer), and Gemma 3's text model
("gemma3_text"), whose differences are named LlamaConfig switches (model_config._family_fields): RMSNorm times (1 + w)
(`norm_unit_offset`), embeddings times sqrt(d) (`embed_scale`), four norms a block (`sandwich_norms`), GeGLU
(`hidden_act`), q/k norms, scale query_pre_attn_scalar^-0.5, sliding layers with their own RoPE base
(`rope_local_theta`). Any other model_type is a ConfigError.

Phi-3's fused linears stay one module each, with one LoRA over the whole stacked weight, so adapters keep PEFT's
names (`...self_attn.qkv_proj.lora_A.weight`) both ways; `lora.project` runs each as a group of one, which is the
same dequantize + GEMM the grouped q/k/v path runs. LongRoPE divides the inverse frequencies by short_factor while
the sequence (max position + 1) is at most original_max_position_embeddings and by long_factor beyond, and scales
cos/sin by attention_factor, as transformers does; `Llama.generate` re-encodes the sequence where it crosses.

Sliding-window attention (a query at i sees keys i - window < j <= i, as transformers' sliding_window_overlay):
`sdpa` folds the band into a bool mask (the reference; memory T*S bools, shared by every head), or on CUDA in eager
mode runs flex_attention with a block-sparse band mask (no (T, S) tensor; blocks outside the band are skipped).

Module names follow transformers' LlamaForCausalLM exactly (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, `model.norm`, `lm_head`, ...), so HF checkpoints load key for key and PEFT
adapter paths (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) line up.

The decoder-block linears are plain nn.Linear (dense) or `QuantLinear` (a frozen 4-bit QuantizedTensor whose forward
is `nf4_linear`). The blocks run them through `lora.project`: in training (and above 16 rows) the projections that
share an input are one group of ops/nf4_linear.py, dequantized into one buffer and multiplied by cuBLAS; at decode
(<= 16 rows) each QuantLinear runs `nf4_linear`, on CUDA the Triton decode kernels. `qlinear.quantize_model(llama)`
swaps one for the other in place (`load_llama(quantize=...)` while loading).
Embeddings, norms and lm_head always stay dense.

Math follows HF so fp32 logits agree to rounding: RMSNorm in fp32 then cast back before the weight multiply;
RoPE with the rotate-half layout (HF's permuted q/k weights), cos/sin computed in fp32 from positions and cast to
the activation dtype; llama3 frequency scaling; SDPA with GQA (enable_gqa, no K/V copies, where the
backend keeps a fast kernel); SwiGLU.
The rotary frequencies are NOT a buffer: `model.to(torch.bfloat16)` would round them (HF keeps an fp32 copy for
the same reason); they are recomputed per forward from the config (head_dim/2 floats, negligible).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .activation_checkpoint import POLICIES, BlockShape, HostOffload, MemoryBudget, run_block
from .generation import KVCache, _eos_ids, crosses_longrope, generate, longrope_switch
from .lora import project
from .model_config import HIDDEN_ACTS, LlamaConfig, rope_inv_freq
from .seq_chunks import chunked_rows
from .ops.rmsnorm import rms_norm
from .ops.rope import apply_rope_partial, apply_rope_qkv_
from .ops.swiglu import swiglu


class LongRopeCacheError(UsageError, ValueError):
    """A cached forward that crosses original_max_position_embeddings under LongRoPE: the cached keys were rotated
    with short_factor and the sequence now needs long_factor everywhere (Llama.generate re-encodes there)."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): halves [x1, x2] -> [-x2, x1] on the last dim (HF's rotate-half RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps) over the last dim; weight (dim,) starts at ones.

    Normalized in fp32 and cast back to x's dtype before the weight multiply, as HF does. unit_offset (Gemma):
    (1 + weight) * x / rms in fp32, cast to x's dtype after the multiply; weight starts at zeros.
    """

    def __init__(self, dim: int, eps: float, device=None, dtype=None, unit_offset: bool = False):
        super().__init__()
        init = torch.zeros if unit_offset else torch.ones  # the identity either way
        self.weight = nn.Parameter(init(dim, device=device, dtype=dtype))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) any float dtype -> (..., d): the norm in fp32, cast back to x's dtype, times the weight (so
        the result takes PyTorch's promotion of x's and the weight's dtypes, as transformers' LlamaRMSNorm does;
        with unit_offset x's dtype, as Gemma3RMSNorm)."""
        return rms_norm(x, self.weight, self.eps, self.unit_offset)


_TORCH_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _sdpa_gqa_ok(q: torch.Tensor, mask) -> bool:
    """Whether SDPA's enable_gqa (no K/V copies) keeps a fast kernel. On CUDA only the flash backend takes it,
    and flash needs fp16/bf16 and no explicit mask; otherwise SDPA would drop to the math kernel, so repeating
    K/V and keeping the efficient kernel is better (transformers makes the same call in `use_gqa_in_sdpa`)."""
    if not _TORCH_HAS_GQA:
        return False
    if q.device.type == "cuda":
        return mask is None and q.dtype in (torch.float16, torch.bfloat16)
    return True


# sdpa's ways, see sdpa_branch
SDPA_BRANCHES = ("mha", "gqa_native", "gqa_fold_one_query", "gqa_repeat_kv", "flex_window")


def sdpa_branch(q: torch.Tensor, k: torch.Tensor, mask, window: int | None = None) -> str:
    """Which of SDPA_BRANCHES sdpa takes for q (B, H, T, D), k (B, KVH, S, D), mask and window: "flex_window"
    (flex_attention, _flex_ok: CUDA, eager, causal self-attention longer than the window, no other mask), else
    "mha" (H == KVH), else "gqa_native" (SDPA's enable_gqa, where it keeps a fast kernel: _sdpa_gqa_ok), else
    "gqa_fold_one_query" (T == 1) or "gqa_repeat_kv". On the CPU only "mha" and "gqa_native" are chosen; tests
    force the others."""
    if _flex_ok(q, k, mask, window):
        return "flex_window"
    if q.shape[1] == k.shape[1]:
        return "mha"
    if _sdpa_gqa_ok(q, mask):
        return "gqa_native"
    return "gqa_fold_one_query" if q.shape[2] == 1 else "gqa_repeat_kv"


def _flex_ok(q: torch.Tensor, k: torch.Tensor, mask, window: int | None) -> bool:
    """flex_attention pays off where the band is narrower than the sequence; it runs compiled (torch.compile of
    the kernel alone) in eager CUDA code only: under an outer torch.compile the band mask keeps one graph."""
    T, S = q.shape[2], k.shape[2]
    return (window is not None and S > window and mask is None and T == S > 1 and q.device.type == "cuda"
            and flex_supports(q.shape[-1], q.dtype) and not torch.compiler.is_compiling())


FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def flex_supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether inductor's flex_attention kernel compiles for this head size and dtype: it refuses head_dim < 16
    ("NYI: embedding dimension ... must be at least 16") and float64 (its tl.dot has no fp64), both seen on an
    H100 with torch 2.11; the band-mask SDPA path serves those."""
    return head_dim >= 16 and dtype in FLEX_DTYPES


def _band(T: int, S: int, window: int, device) -> torch.Tensor:
    """(T, S) bool: query i (the last T of S positions) sees key j iff i - window < j <= i."""
    i = torch.arange(S - T, S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return (j <= i) & (j > i - window)


_FLEX: dict = {}  # "attention": the compiled flex_attention; (T, S, window, device): its block masks


def _flex_window(q, k, v, window: int, scale) -> torch.Tensor:
    """Causal sliding-window attention by flex_attention (GQA without K/V copies). On the CPU (tests) flex runs
    unfused; on CUDA compiled once, block masks cached per shape (one per training seq_len)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    T, S, dev = q.shape[2], k.shape[2], q.device
    key = (T, S, window, str(dev))
    if key not in _FLEX:
        def band(b, h, i, j):
            return (j <= i) & (j > i - window)
        _FLEX[key] = create_block_mask(band, None, None, T, S, device=dev)
    fn = flex_attention
    if dev.type == "cuda":
        fn = _FLEX.setdefault("attention", torch.compile(flex_attention))
    return fn(q, k, v, block_mask=_FLEX[key], scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, is_causal: bool,
         branch: str | None = None, *, scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """q (B, H, T, D) over k, v (B, KVH, S, D) -> (B, H, T, D); query head h reads K/V head h // (H / KVH).

    scale: of q k^T (None: D^-0.5). window: keys more than window - 1 positions before a query are hidden, the
    queries being the last T of the S positions (no cache, or KVCache); "flex_window" does it block-sparse, the
    other branches fold the band into the mask (`_band`, combined with mask or with is_causal).

    Where SDPA's enable_gqa would lose the fast kernel (see _sdpa_gqa_ok): a single query (T == 1, decoding)
    folds each K/V head's H / KVH query heads into query rows of that head, so no K/V is copied and the mask
    (B, 1, 1, S) broadcasts over them; longer queries repeat K/V (transformers' repeat_kv). At decode the copy
    would be 4x the whole cache per layer and token (8B, 32 rows, 1152 positions: 0.6 GB).
    `branch` (one of SDPA_BRANCHES) forces a way instead of sdpa_branch's choice (tests run each on the CPU).
    """
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    # within the window the band is the causal mask itself; past it, the band joins the mask before a branch is
    # chosen (a masked call keeps its own fast kernel on CUDA: see _sdpa_gqa_ok)
    if window is not None and S > window and (branch or sdpa_branch(q, k, mask, window)) != "flex_window":
        band = _band(T, S, window, q.device)
        mask, is_causal = (band if mask is None else mask & band), False
    branch = branch or sdpa_branch(q, k, mask, window)
    if branch == "flex_window":
        if mask is not None or not is_causal or window is None or T != S:
            raise ValueError("sdpa: flex_window is for causal self-attention with a window and no other mask")
        return _flex_window(q, k, v, window, scale)
    if branch == "mha":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    if branch == "gqa_native":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True,
                                              scale=scale)
    if branch == "gqa_fold_one_query":
        y = F.scaled_dot_product_attention(q.reshape(B, KVH, H // KVH, D), k, v, attn_mask=mask, scale=scale)
        return y.reshape(B, H, 1, D)
    if branch != "gqa_repeat_kv":
        raise ValueError(f"sdpa: branch must be one of {SDPA_BRANCHES}, got {branch!r}")
    k = k.repeat_interleave(H // KVH, dim=1)  # (B, H, S, D)
    v = v.repeat_interleave(H // KVH, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


class Attention(nn.Module):
    """Llama self-attention: q_proj (d -> H*D), k_proj and v_proj (d -> KVH*D), o_proj (H*D -> d), RoPE, SDPA.

    The projections start as nn.Linear (bias per cfg.attention_bias) and may be swapped in place for QuantLinear or
    LoRALinear; layer_idx picks this layer's slot in a shared KVCache. With cfg.qk_norm (Qwen3) q_norm and k_norm,
    RMSNorms of (head_dim,), normalize each q and k head before RoPE; without it they do not exist. With
    cfg.fused_qkv_gate_up (Phi-3) q/k/v are one qkv_proj (d -> (H + 2 KVH) D, rows [q; k; v]); RoPE rotates the
    first cfg.rotary_dim dims of each q and k head (all of them unless partial_rotary_factor < 1). A
    "sliding_attention" layer (cfg.layer_types) keeps `window` = cfg.sliding_window; scale per
    cfg.query_pre_attn_scalar.
    """
    fuse_projections = True  # q/k/v and o through lora.project groups (False: module by module, the reference path)

    def __init__(self, cfg: LlamaConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        H, KVH, D, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        kw = dict(bias=cfg.attention_bias, device=device, dtype=dtype)
        if cfg.fused_qkv_gate_up:  # Phi-3: one (H + 2 KVH) D x d weight, rows [q; k; v], one LoRA over it
            self.qkv_proj = nn.Linear(d, (H + 2 * KVH) * D, **kw)
            self._qkv_names = ("qkv_proj",)
        else:
            self.q_proj = nn.Linear(d, H * D, **kw)
            self.k_proj = nn.Linear(d, KVH * D, **kw)
            self.v_proj = nn.Linear(d, KVH * D, **kw)
            self._qkv_names = ("q_proj", "k_proj", "v_proj")
        self.o_proj = nn.Linear(H * D, d, **{**kw, "bias": cfg.o_proj_bias})
        self.H, self.KVH, self.D, self.layer_idx = H, KVH, D, layer_idx
        self.rotary_dim = cfg.rotary_dim
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, device, dtype, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, device, dtype, cfg.norm_unit_offset)
        self.window = cfg.sliding_window if cfg.layer_types[layer_idx] == "sliding_attention" else None
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5

    def _norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv (B, T, (H + 2 KVH) D) -> a new one whose q and k heads went through q_norm / k_norm (per head, over
        D, as transformers' Qwen3Attention), v as is; RoPE then rotates it in place."""
        q, k, v = qkv.split([self.H * self.D, self.KVH * self.D, self.KVH * self.D], dim=-1)
        q = self.q_norm(q.unflatten(-1, (self.H, self.D))).flatten(-2)
        k = self.k_norm(k.unflatten(-1, (self.KVH, self.D))).flatten(-2)
        return torch.cat((q, k, v.to(q.dtype)), dim=-1)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        """x (B, T, d) -> (B, T, d): RoPE'd causal SDPA with GQA; appends K/V to `cache` when given."""
        B, T, _ = x.shape
        qkv = project(x, [getattr(self, n) for n in self._qkv_names], self)  # (B, T, (H + 2 KVH) D), one GEMM
        if self.qk_norm:
            qkv = self._norm_qk(qkv)
        if self.rotary_dim == self.D:
            qkv = apply_rope_qkv_(qkv, self.H + self.KVH, cos, sin)  # q and k heads rotated in place
        else:  # partial rotary (Phi-4-mini): the reference math on the leading rotary_dim of each head, a new tensor
            qkv = apply_rope_partial(qkv, self.H + self.KVH, self.D, cos, sin)
        q, k, v = qkv.split([self.H * self.D, self.KVH * self.D, self.KVH * self.D], dim=-1)
        q = q.view(B, T, self.H, self.D).transpose(1, 2)    # (B, H, T, D)
        k = k.view(B, T, self.KVH, self.D).transpose(1, 2)  # (B, KVH, T, D)
        v = v.view(B, T, self.KVH, self.D).transpose(1, 2)
        is_causal = True if mask is None and T > 1 else False  # a plain bool for SDPA even when T is symbolic
        if cache is not None:  # KVCache, or generation.StaticKVCache (written in place at device positions)
            k, v, is_causal = cache.update(self.layer_idx, k, v, is_causal)
        # a StaticKVCache's keys are not the queries' last positions: its caller's mask holds the band instead
        window = None if getattr(cache, "mask_has_window", False) else self.window
        y = sdpa(q, k, v, mask, is_causal, scale=self.scale, window=window)  # (B, H, T, D)
        return project(y.transpose(1, 2).reshape(B, T, self.H * self.D), (self.o_proj,), self)


class MLP(nn.Module):
    """SwiGLU (GeGLU with cfg.hidden_act gelu_pytorch_tanh): gate_proj, up_proj (d -> intermediate_size), down_proj
    (back to d); bias per cfg.mlp_bias. With cfg.fused_qkv_gate_up (Phi-3) gate and up are one gate_up_proj
    (d -> 2 * intermediate_size)."""
    fuse_projections = True  # gate/up and down through lora.project groups (False: module by module)
    chunk_tokens = 0  # > 0: long-context mode, forward in sequence chunks of this many tokens (seq_chunks.py)

    def __init__(self, cfg: LlamaConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=cfg.mlp_bias, device=device, dtype=dtype)
        if cfg.fused_qkv_gate_up:  # Phi-3: one 2I x d weight, rows [gate; up] (Phi3MLP chunks its output in two)
            self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, **kw)
            self._gate_up_names = ("gate_up_proj",)
        else:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
            self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
            self._gate_up_names = ("gate_proj", "up_proj")
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.activation = HIDDEN_ACTS[cfg.hidden_act]

    def forward(self, x):
        """x (B, T, d) -> (B, T, d): SwiGLU, down(silu(gate(x)) * up(x)) (or gelu_tanh for GeGLU)."""
        if 0 < self.chunk_tokens < x.numel() // x.shape[-1]:  # the (B*T, 3I) intermediates only per chunk
            return chunked_rows(self.forward, x, self.chunk_tokens, self.parameters())
        gate_up = project(x, [getattr(self, n) for n in self._gate_up_names], self)  # (B, T, 2I): [gate | up]
        return project(swiglu(gate_up, activation=self.activation), (self.down_proj,), self)


class DecoderLayer(nn.Module):
    """One pre-norm Llama block: x + attn(input_layernorm(x)), then + mlp(post_attention_layernorm(.)).

    With cfg.sandwich_norms (Gemma 3) post_attention_layernorm norms the attention output instead, and
    pre_feedforward_layernorm / post_feedforward_layernorm the MLP's input and output.
    """

    def __init__(self, cfg: LlamaConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, device, dtype)
        self.mlp = MLP(cfg, device, dtype)
        norms = ("input_layernorm", "post_attention_layernorm")
        if cfg.sandwich_norms:
            norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        for n in norms:
            setattr(self, n, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype, cfg.norm_unit_offset))
        self.sandwich_norms = cfg.sandwich_norms

    def forward(self, x, cos, sin, mask=None, cache=None):  # cos, sin: (T, D) or (B, 1, T, D)
        """x (B, T, d) -> (B, T, d): pre-norm attention and MLP residual blocks."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if self.sandwich_norms:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, decoder blocks and final norm: input_ids (B, T) -> hidden states (B, T, d)."""

    def __init__(self, cfg: LlamaConfig, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, device, dtype) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype, cfg.norm_unit_offset)
        # per-block checkpointing: a policy of activation_checkpoint.POLICIES, a list of one per block, or an
        # activation_checkpoint.MemoryBudget that plans itself; applies in train mode, grad enabled, no KV cache
        self.checkpoint_policy: str | list[str] | MemoryBudget = "none"
        self.offload_every = 1  # "offload" blocks keep one host input per this many (activation_checkpoint.py)
        self._inv_freq: dict = {}

    @property
    def gradient_checkpointing(self) -> bool:
        """True when any block is recomputed in backward (checkpoint_policy other than "none")."""
        p = self.checkpoint_policy
        return isinstance(p, MemoryBudget) or self.checkpoint_plan() != ["none"] * len(self.layers)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.checkpoint_policy = "full" if on else "none"

    def checkpoint_plan(self, batch: int = 1, seq: int = 1, device=None) -> list[str]:
        """checkpoint_policy as one policy per block (validated); a MemoryBudget plans for (batch, seq) tokens."""
        p = self.checkpoint_policy
        if isinstance(p, MemoryBudget):
            c = self.config
            shape = BlockShape(tokens=batch * seq, seq=seq, hidden=c.hidden_size, heads=c.num_attention_heads,
                               kv_heads=c.num_key_value_heads, head_dim=c.head_dim, intermediate=c.intermediate_size,
                               elem=self.embed_tokens.weight.element_size())
            p = p.plan(shape, len(self.layers), device or self.embed_tokens.weight.device, self)
        plan = [p] * len(self.layers) if isinstance(p, str) else list(p)
        bad = [q for q in plan if q not in POLICIES]
        if bad or len(plan) != len(self.layers):
            raise ValueError(f"checkpoint_policy must be one of {POLICIES} or a list of {len(self.layers)} of them, "
                             f"got {p!r}")
        return plan

    def rope(self, positions: torch.Tensor, dtype: torch.dtype, local: bool = False):
        """cos, sin in `dtype` (computed in fp32) for integer positions (T,) -> (T, R), or (B, T) -> (B, 1, T, R);
        R = config.rotary_dim (head_dim unless partial rotary); local: the sliding layers' (rope_inv_freq)."""
        freqs = positions.float()[..., None] * self._rope_inv_freq(positions, local)   # (..., T, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        if emb.dim() == 3:
            emb = emb[:, None]  # broadcast over heads
        s = self.config.rope_scaling
        if s is not None and s["rope_type"] == "longrope":  # transformers scales in fp32 before the cast
            return (emb.cos() * s["attention_factor"]).to(dtype), (emb.sin() * s["attention_factor"]).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _rope_inv_freq(self, positions: torch.Tensor, local: bool = False) -> torch.Tensor:
        """(R/2,) fp32 inverse frequencies for this forward. LongRoPE takes long_factor once the sequence (max
        position + 1, as transformers) exceeds original_max_position_embeddings: chosen on the device with
        torch.where, so no host sync (CUDA graphs, torch.compile)."""
        dev = positions.device
        if (dev, local) not in self._inv_freq:
            self._inv_freq[dev, local] = rope_inv_freq(self.config, dev, local)
        s = self.config.rope_scaling
        if s is None or s["rope_type"] != "longrope":
            return self._inv_freq[dev, local]
        if ("long", dev) not in self._inv_freq:
            self._inv_freq["long", dev] = rope_inv_freq(self.config, dev, long=True)
        long = positions.max() + 1 > s["original_max_position_embeddings"]
        return torch.where(long, self._inv_freq["long", dev], self._inv_freq[dev, local])

    def ropes(self, positions: torch.Tensor, dtype: torch.dtype) -> list:
        """(cos, sin) per layer (see rope): the sliding layers' own only where cfg.rope_local_theta is set."""
        full = self.rope(positions, dtype)
        if self.config.rope_local_theta is None:
            return [full] * len(self.layers)
        local = self.rope(positions, dtype, local=True)
        return [local if t == "sliding_attention" else full for t in self.config.layer_types]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> (B, T, d) in the embedding dtype; times sqrt(d) with cfg.embed_scale, the factor
        rounded to that dtype first (Gemma's Gemma3TextScaledWordEmbedding: sqrt(3072) is 55.5 in bf16)."""
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale:
            x = x * torch.tensor(self.config.hidden_size ** 0.5).to(x.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) int64 -> final hidden states (B, T, d) after the last norm (no lm_head).

        document_ids (B, T) int (packed training rows, no cache): a token attends only to earlier tokens of its
        own document; pass position_ids restarting at 0 per document with it (data.collate_positions).
        """
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {past} used + {T} new does not fit")
        if past and past <= longrope_switch(self.config, default=past + T) < past + T:
            raise LongRopeCacheError(f"{past} cached + {T} new tokens cross original_max_position_embeddings "
                                     f"{longrope_switch(self.config)}: the cache holds short-factor keys; re-encode "
                                     f"the whole sequence without the cache")
        x = self.embed(input_ids)  # (B, T, d)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)
        ropes = self.ropes(position_ids, x.dtype)  # (cos, sin) per layer
        mask = _attn_mask(B, T, past, attention_mask, x.device)
        if document_ids is not None:
            mask = _document_mask(document_ids, mask, cache)
        plan = None
        if self.training and torch.is_grad_enabled() and cache is None:
            plan = self.checkpoint_plan(B, T, x.device)
        offload = HostOffload(x.device, self.offload_every) if plan and "offload" in plan else None
        for i, layer in enumerate(self.layers):
            if plan:
                x = run_block(layer, plan[i], x, *ropes[i], mask, offload=offload)
            else:
                x = layer(x, *ropes[i], mask, cache)
        if cache is not None:
            cache.pos += T
        return self.norm(x)


def _generate_across_switch(model: "Llama", ids: torch.Tensor, n: int, switch: int, eos: tuple[int, ...],
                            attention_mask, **kw) -> torch.Tensor:
    """`generate` for a LongRoPE model whose prompt (B, T) fits the short factors and whose output does not, as
    transformers' Phi3ForCausalLM does it: decode while the sequence is <= switch, then re-encode it all (long
    factors) and go on. Rows that finished in the first part keep emitting eos[0]; the output stops after the
    first token at which every row is done, as one call would."""
    T = ids.shape[-1]
    n1 = switch - T + 1  # how many tokens come from sequences of <= switch tokens
    out = generate(model, ids, n1, eos_token_id=list(eos) or None, attention_mask=attention_mask, **kw)
    if out.shape[-1] < T + n1:  # every row finished
        return out
    mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask.new_ones(len(ids), n1)], 1)
    out = generate(model, out, n - n1, eos_token_id=list(eos) or None, attention_mask=mask, **kw)
    if not eos:
        return out
    eos_t = torch.tensor(eos, device=out.device)
    new = out[:, T + n1:]
    new[torch.isin(out[:, T:T + n1], eos_t).any(-1)] = eos[0]
    done = (torch.isin(out[:, T:], eos_t).cumsum(1) > 0).all(0).nonzero()
    return out[:, :T + int(done[0]) + 1] if len(done) else out


def _document_mask(document_ids: torch.Tensor, mask, cache) -> torch.Tensor:
    """Causal mask restricted to same-document pairs: bool (B, 1, T, T), combined with `mask` when given.

    Why: packed rows hold several samples; without it a sample attends to the unrelated samples before it.
    Each query still sees itself, so no row is all-False.
    """
    if cache is not None:
        raise ValueError("document_ids is for packed training rows; it cannot be combined with a KV cache")
    B, T = document_ids.shape
    i = torch.arange(T, device=document_ids.device)
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    doc = (same & (i[None, None, :] <= i[None, :, None]))[:, None]
    return doc if mask is None else doc & mask


def _attn_mask(B, T, past, attention_mask, device):
    """None when plain causal attention (SDPA is_causal) or a single query suffices; else a bool (B|1,1,T,S) mask.

    attention_mask (B, past+T) marks real tokens with 1 (right or left padding). Each query also sees itself,
    so rows of padding queries never go all-False (which SDPA turns into NaN).
    """
    S = past + T
    if attention_mask is None and (past == 0 or T == 1):
        return None
    i = torch.arange(T, device=device)[:, None] + past
    j = torch.arange(S, device=device)[None, :]
    mask = (j <= i)[None, None]  # (1, 1, T, S) bottom-right causal
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask must have shape (B, past+T)=({B}, {S}), "
                             f"got {tuple(attention_mask.shape)}")
        mask = (mask & attention_mask.bool()[:, None, None, :]) | (j == i)[None, None]
    return mask


class Llama(nn.Module):
    """LlamaForCausalLM look-alike: `model(input_ids) -> logits (B, T, vocab)`, plus KV-cache `generate`."""

    def __init__(self, cfg: LlamaConfig, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, device, dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether each decoder block is recomputed in backward (applies in train mode with grad on, no KV cache)."""
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        """Recompute each decoder block in backward (train mode, grad enabled, no KV cache)."""
        self.model.gradient_checkpointing = bool(on)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) int64 -> logits (B, T, vocab) in the lm_head dtype.

        attention_mask (B, past+T), 1 = real token, masks padded keys; position_ids (T,) or (B, T) default to
        past..past+T-1 (pass them for left-padded rows); cache: a KVCache, advanced by T; document_ids (B, T):
        packed rows, attention only within a document (see LlamaModel.forward).
        """
        return self.lm_head(self.model(input_ids, attention_mask, cache, position_ids, document_ids))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: int | list[int] | None = None, generator: torch.Generator | None = None,
                 attention_mask: torch.Tensor | None = None, top_k: int = 0) -> torch.Tensor:
        """Prompt (B, T) -> (B, T + n) ids, n <= max_new_tokens: `qlora_core.generation.generate` (static KV
        cache; on CUDA the one-token step is a replayed CUDA graph).

        temperature 0 is greedy; > 0 samples from softmax(logits / temperature) restricted to the top_k best tokens
        (0 = all) and then to the smallest set whose probability reaches top_p. Rows that emitted an eos_token_id
        keep emitting it; decoding stops early once every row has. Prompts of different lengths go in left-padded,
        with attention_mask (B, T) marking real tokens (1); each row then decodes as it would alone. LongRoPE
        (Phi-3 long context): once the sequence outgrows original_max_position_embeddings it is re-encoded with
        the long factors, as transformers does.
        """
        kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
        if crosses_longrope(self.config, input_ids.shape[-1], max_new_tokens):
            return _generate_across_switch(self, input_ids, max_new_tokens, longrope_switch(self.config),
                                           _eos_ids(eos_token_id), attention_mask, **kw)
        return generate(self, input_ids, max_new_tokens, eos_token_id=eos_token_id, attention_mask=attention_mask,
                        **kw)
