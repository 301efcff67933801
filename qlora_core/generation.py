"""Text generation: a static KV cache and a one-token decode step that CUDA replays as a graph.

Design
- Why: decoding one token of an 8B NF4 model launches ~1,500 small kernels; from Python that is ~66 ms of host
  work per token while the GPU needs a few ms, so the eager loop ran at 15 tokens/s whatever the batch. Here
  the step is captured once in a `torch.cuda.CUDAGraph` and replayed: one launch per token, no host sync.
- Everything the step reads or writes lives in static device buffers (`_Decoder`): the KV cache
  (L, B, KVH, S, D) written in place at a device slot (`StaticKVCache`, through `KVCache.update`'s interface),
  the token rows `seq` (B, S), the current slot, each row's left padding and its done flag. Slots, RoPE
  positions (slot - padding) and the attention mask (the row's real prompt tokens and every slot up to the
  query's) are computed on the device from them, so one graph serves every prompt length up to S.
  Prefill is an ordinary forward over the whole prompt into the same cache; only the last position goes through
  lm_head.
- Sampling runs inside the step (`sample`): temperature, then top-k, then top-p over the renormalized rest, then
  an exponential race, argmax_i p_i / E_i with E_i ~ Exp(1) (token i wins with probability p_i / sum p; gpt-fast
  samples the same way). Why not torch.multinomial: a race needs only torch.rand, which CUDA graphs support
  through PyTorch's graph-safe Philox state: a capture records the generator's offset increments and every
  replay advances the generator by that total, so each replay draws fresh numbers. The default CUDA generator
  is registered by the capture itself; a caller's generator is registered with
  `CUDAGraph.register_generator_state`. E = -log(u) with u = torch.rand in [0, 1) lies in (0, inf], so no
  division by zero, and filtered tokens score -1, below every kept one: they can never win.
- Stop test on the device: a finished row's token becomes eos[0] and its done flag is set inside the step.
  With eos ids or a stream, the host copies the new tokens every `sync_every` steps (its only sync), streams
  them, and stops once every row has produced an eos; the extra steps of the last chunk are cut off, so the
  result is exactly what a per-token check returns. With neither, every step is queued and the host syncs once.
- One decoder (cache + graph) is kept per model and reused while batch, cache length (prompt + new tokens,
  rounded up to CACHE_ROUND), sampling settings, eos ids, generator and the identity of every weight tensor
  stay the same (`_weights_key`: merging or unmerging LoRA, moving or reloading the model all rebuild it;
  in-place updates such as optimizer steps are seen by the graph). `release(model)` frees it.
- On the CPU (and with cuda_graph=False) the same step runs eagerly: same code path, no capture.
Reference: `generate_reference`, the dynamic-cache loop over `Llama.forward` and `sample_next`; tests
check greedy tokens are identical and the sampler's distribution against float64.
Limits: no beam search, repetition penalty or per-row sampling settings; prompts must be left-padded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Callable

import torch
from torch import nn

from .errors import UsageError
from . import backend
from .ops.quant4 import QuantizedTensor

CACHE_ROUND = 128  # cache length granularity: calls with nearby prompt lengths reuse one captured graph
WARMUP_STEPS = 2  # eager steps on a side stream before capture (Triton compiles, cuBLAS handles, workspaces)


class GenerationError(UsageError, ValueError):
    """A generate() argument out of range (the message names the argument and its value)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked from the logits of the last position."""
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 divides the logits before softmax
    top_p: float = 1.0  # keep the smallest set of best tokens whose probability reaches top_p (1 = all)
    top_k: int = 0  # keep only the k best tokens (0 = all); applied before top_p

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax (temperature 0)."""
        return self.temperature == 0


# -- sampling -------------------------------------------------------------------------------------------------------
def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) int64 token ids, without a host sync (safe inside a CUDA-graph capture).

    Greedy: argmax. Otherwise softmax(logits / temperature) restricted to the top_k best tokens, then to the
    smallest prefix of them (best first) whose probability reaches top_p, sampled by an exponential race with
    random numbers from `generator` (None: the device's default generator).
    """
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    idx = None  # token ids of the columns of `logits` once it is sorted
    k = min(cfg.top_k, logits.shape[-1])
    if cfg.top_p < 1.0:
        logits, idx = logits.sort(dim=-1, descending=True)
        if k:
            logits, idx = logits[:, :k], idx[:, :k]
    elif k:
        logits, idx = logits.topk(k, dim=-1)
    probs = logits.softmax(dim=-1)
    if cfg.top_p < 1.0:
        # drop a token when the tokens ranked above it already reach top_p (the best one always stays)
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= cfg.top_p, 0.0)
    choice = _race(probs, generator)
    return choice if idx is None else idx.gather(-1, choice[:, None]).squeeze(-1)


def _race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) probabilities (rows need not sum to 1) -> (B,) index i with probability p_i / sum(p)."""
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=torch.float32)
    score = probs / -torch.log(u)  # E = -log(u) in (0, inf]: u = 0 gives a score of 0, never a NaN
    return torch.where(probs > 0, score, -1.0).argmax(dim=-1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) token ids: argmax at temperature 0, else nucleus sampling with torch.multinomial
    (generate_reference's sampler; `sample` is held to the same distribution)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
        drop = (p_sorted.cumsum(dim=-1) - p_sorted) >= top_p
        p_sorted = p_sorted.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, p_sorted)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -- KV caches and the decoder -------------------------------------------------------------------------------------
def _kv_buffers(cfg, batch: int, max_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed keys and values (L, B, KVH, max_len, D) for a model with LlamaConfig `cfg`."""
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)


class KVCache:
    """Preallocated keys/values for every layer: (L, B, KVH, max_len, D); `pos` tokens are filled.

    cfg: the model's LlamaConfig. Passed to Llama.forward as `cache`: each Attention.forward writes through
    `update`, LlamaModel.forward advances `pos`.
    """

    def __init__(self, cfg, batch: int, max_len: int, device=None, dtype=torch.float32):
        self.k, self.v = _kv_buffers(cfg, batch, max_len, device, dtype)
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, is_causal: bool):
        """Write one layer's new keys/values (B, KVH, T, D) at positions pos..pos+T-1 (LlamaModel advances pos after
        the last layer). Returns the keys and values to attend over, (B, KVH, pos+T, D), and whether SDPA's
        is_causal still holds: only without a past (with one, the bottom-right causal mask comes in `mask`)."""
        p, T = self.pos, k.shape[2]
        self.k[layer, :, :, p:p + T] = k
        self.v[layer, :, :, p:p + T] = v
        return self.k[layer, :, :, :p + T], self.v[layer, :, :, :p + T], is_causal and p == 0


class StaticKVCache:
    """Keys and values (L, B, KVH, S, D) written in place at `slots`, a device tensor of T positions.

    `update` (called by Attention.forward, like KVCache.update) returns the whole buffers: the caller's mask
    hides unwritten and padded slots, so the shapes never change and the step can be captured. Its keys are not
    the queries' last positions, so the caller's mask for sliding layers holds the window band too
    (`mask_has_window`: Attention then passes no window to sdpa).
    """
    mask_has_window = True

    def __init__(self, cfg, batch: int, max_len: int, device, dtype: torch.dtype):
        self.k, self.v = _kv_buffers(cfg, batch, max_len, device, dtype)
        self.slots: torch.Tensor | None = None  # (T,) int64 on the device, set before each forward

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, is_causal: bool):
        """k, v (B, KVH, T, D) -> the layer's whole (B, KVH, S, D) keys and values after writing them at `slots`;
        is_causal is False (the mask is always explicit)."""
        self.k[layer].index_copy_(2, self.slots, k.to(self.k.dtype))  # a no-op cast unless under autocast
        self.v[layer].index_copy_(2, self.slots, v.to(self.v.dtype))
        return self.k[layer], self.v[layer], False


@contextlib.contextmanager
def _unfused(model: nn.Module):
    """Projections module by module (lora.project's `fuse_projections = False`) inside the step. Why: above 16
    rows the fused group reads LoRA through copies cached per parameter `_version`; a graph would keep reading a
    capture-time copy after an optimizer step, or its freed memory once an eager forward rebuilt it. Module by
    module every weight is read through its own Parameter (at <= 16 rows project does this anyway)."""
    owners = [m for layer in model.model.layers for m in (layer.self_attn, layer.mlp)]
    before = [m.__dict__.get("fuse_projections") for m in owners]
    for m in owners:
        m.fuse_projections = False
    try:
        yield
    finally:
        for m, b in zip(owners, before):
            if b is None:
                del m.fuse_projections
            else:
                m.fuse_projections = b


def _forward_last(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor, masks: dict,
                  cache: StaticKVCache) -> torch.Tensor:
    """ids (B, T), RoPE positions (B, T), additive masks (B, 1, T, S) per layer type ("full_attention",
    "sliding_attention") -> logits (B, V) of the last position.

    LlamaModel.forward without its host-side cache bookkeeping (cache.pos, mask from a 2-D attention_mask),
    which a captured step cannot have; lm_head runs on the last position only.
    """
    m = model.model
    x = m.embed(ids)  # (B, T, d)
    ropes = m.ropes(pos, x.dtype)  # (cos, sin) (B, 1, T, D) per layer
    for layer, rope, kind in zip(m.layers, ropes, model.config.layer_types):
        x = layer(x, *rope, masks[kind], cache)
    return model.lm_head(m.norm(x[:, -1]))


class _Decoder:
    """Static buffers of one (model, batch, cache length, sampling) combination, and its captured step."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, cfg: SamplingConfig, eos: tuple[int, ...],
                 generator: torch.Generator | None, key: tuple):
        w = model.model.embed_tokens.weight
        self.device, self.dtype, self.key = w.device, w.dtype, key
        self._model = weakref.ref(model)  # the registry maps model -> decoder: no strong cycle
        self.cfg, self.generator = cfg, generator
        self.window = model.config.sliding_window  # None: no sliding layer
        self.cache = StaticKVCache(model.config, batch, max_len, w.device, w.dtype)
        dev = dict(device=w.device, dtype=torch.long)
        self.seq = torch.zeros(batch, max_len, **dev)  # prompt, then one generated token per step
        self.slot = torch.zeros(1, **dev)  # slot of the token the next step reads
        self.pad = torch.zeros(batch, 1, **dev)  # left padding per row
        self.arange = torch.arange(max_len, **dev)
        self.done = torch.zeros(batch, dtype=torch.bool, device=w.device)
        self.eos = torch.tensor(eos, **dev) if eos else None
        self.graph: torch.cuda.CUDAGraph | None = None

    # The step and the prefill share these three pieces.
    def _mask(self, q: torch.Tensor) -> dict:
        """Query slots q (T,) -> additive masks (B, 1, T, S) in the cache dtype per layer type: 0 where a row's
        query may look (its real prompt tokens and generated slots up to the query's; on sliding layers only the
        last `sliding_window` slots, as transformers counts them, padding included), -inf elsewhere. A padding
        query sees itself, so no row is all -inf (SDPA would give NaN, and NaN keys would poison later rows)."""
        j, w = self.arange, self.window
        ok = (j <= q[:, None]) & (j >= self.pad[:, :, None]) | (j == q[:, None])  # (B, T, S)
        masks = {"full_attention": ok}
        if w is not None:
            masks["sliding_attention"] = ok & (j > q[:, None] - w)
        return {kind: torch.zeros(m.shape, dtype=self.dtype, device=self.device).masked_fill_(~m, float("-inf"))
                [:, None] for kind, m in masks.items()}

    def _emit(self, logits: torch.Tensor) -> None:
        """Sample from logits (B, V), turn finished rows' tokens into eos[0], write seq[:, slot + 1], advance."""
        nxt = sample(logits.float(), self.cfg, self.generator)  # (B,)
        if self.eos is not None:
            nxt = torch.where(self.done, self.eos[0], nxt)
            self.done.logical_or_((nxt[:, None] == self.eos).any(dim=-1))
        self.seq.index_copy_(1, self.slot + 1, nxt[:, None])
        self.slot.add_(1)

    def _step(self) -> None:
        """One token for every row: reads seq[:, slot], writes seq[:, slot + 1]. Device work only."""
        model = self._model()
        self.cache.slots = self.slot
        with _unfused(model):
            logits = _forward_last(model, self.seq.index_select(1, self.slot), self.slot - self.pad,
                                   self._mask(self.slot), self.cache)
        self._emit(logits)

    def prefill(self, ids: torch.Tensor, pad: torch.Tensor) -> None:
        """ids (B, T) left-padded with pad (B,) tokens per row: fill cache slots 0..T-1, sample seq[:, T]."""
        T = ids.shape[1]
        self.cache.k.zero_()  # stale slots are masked, but a non-finite one would still turn 0 * x into NaN
        self.cache.v.zero_()
        self.seq.zero_()
        self.seq[:, :T] = ids
        self.pad.copy_(pad[:, None])
        self.done.zero_()
        q = self.arange[:T]
        self.cache.slots = q
        logits = _forward_last(self._model(), ids, (q - self.pad).clamp(min=0), self._mask(q), self.cache)
        self.slot.fill_(T - 1)
        self._emit(logits)

    def step(self) -> None:
        """Advance every row by one token: replay the captured graph, or run the step eagerly."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def capture(self) -> None:
        """Capture the step (before the prefill, which resets every buffer the warm-up moved): warm up on a side
        stream as PyTorch's recipe says, put the RNG state back, capture one step."""
        rng = _rng_state(self.device, self.generator)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        _set_rng_state(self.device, self.generator, rng)  # warm-up draws must not shift the caller's stream
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            graph.register_generator_state(self.generator)  # the default generator registers itself
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph


def _rng_state(device: torch.device, generator: torch.Generator | None):
    if generator is not None:
        return generator.get_state()
    return torch.cuda.get_rng_state(device)


def _set_rng_state(device, generator, state) -> None:
    if generator is not None:
        generator.set_state(state)
    else:
        torch.cuda.set_rng_state(state, device)
# -- the cached decoder per model -----------------------------------------------------------------------------------
_DECODERS: "weakref.WeakKeyDictionary[nn.Module, _Decoder]" = weakref.WeakKeyDictionary()


def release(model: nn.Module) -> None:
    """Free the decoder `generate` keeps for `model` (its static KV cache and CUDA graph), if there is one."""
    _DECODERS.pop(model, None)


def _weights_key(model: nn.Module) -> tuple:
    """What a captured step reads by address: every module, its parameters, buffers and 4-bit weight tensors, and
    LoRA's merged flags. When any of them changes, a replay would read stale or freed memory: rebuild."""
    key = []
    for mod in model.modules():
        key.append(id(mod))
        key.extend(t.data_ptr() for t in mod.parameters(recurse=False))
        key.extend(t.data_ptr() for t in mod.buffers(recurse=False))
        w = getattr(mod, "weight", None)
        if isinstance(w, QuantizedTensor):
            key.extend(t.data_ptr() for t in (w.data, w.absmax, w.nested_absmax, w.offset) if t is not None)
        key.append(getattr(mod, "merged", None))
    return tuple(key)


def _decoder(model: nn.Module, batch: int, max_len: int, cfg: SamplingConfig, eos: tuple[int, ...],
             generator: torch.Generator | None, use_graph: bool) -> _Decoder:
    """The model's cached decoder when it fits this call, else a new one (captured when use_graph)."""
    w = model.model.embed_tokens.weight
    key = (batch, max_len, w.device, w.dtype, cfg, eos, use_graph, backend.choose(w.device), _weights_key(model))
    old = _DECODERS.pop(model, None)
    if old is not None and old.key == key and old.generator is generator:
        _DECODERS[model] = old
        return old
    del old  # free its cache and graph before allocating the new ones
    dec = _Decoder(model, batch, max_len, cfg, eos, generator, key)
    if use_graph:
        with torch.cuda.device(w.device):
            dec.capture()
    _DECODERS[model] = dec
    return dec


# -- generate -------------------------------------------------------------------------------------------------------
def _eos_ids(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    ids = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise GenerationError(f"eos_token_id must be None, an int >= 0 or a list of them, got {eos_token_id!r}")
    return ids


def _check_prompt(model: nn.Module, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) int64, left padding per row (B,) int64), both on the model's device; GenerationError if bad."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise GenerationError(f"input_ids must be a non-empty (B, T) tensor, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise GenerationError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    device = model.model.embed_tokens.weight.device
    ids = input_ids.to(device=device, dtype=torch.long)
    V = model.config.vocab_size
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= V:
        raise GenerationError(f"input_ids must lie in [0, vocab_size={V}), got values in [{lo}, {hi}]")
    B, T = ids.shape
    if attention_mask is None:
        return ids, torch.zeros(B, dtype=torch.long, device=device)
    mask = attention_mask.to(device=device, dtype=torch.long)
    if (tuple(mask.shape) != (B, T) or not bool(((mask == 0) | (mask == 1)).all())
            or not bool((mask[:, 1:] >= mask[:, :-1]).all()) or not bool(mask[:, -1].all())):
        raise GenerationError(f"attention_mask must be (B, T)=({B}, {T}) of 0/1 and left-padded (0...0 1...1 per "
                              f"row), got shape {tuple(mask.shape)}")
    return ids, T - mask.sum(dim=-1)


def longrope_switch(cfg, default=None):
    """LongRoPE's original_max_position_embeddings (longer sequences take long_factor), else `default`."""
    s = getattr(cfg, "rope_scaling", None)
    return s["original_max_position_embeddings"] if s is not None and s["rope_type"] == "longrope" else default


def crosses_longrope(cfg, T: int, max_new_tokens: int) -> bool:
    """Whether decoding max_new_tokens after a T-token prompt takes a step from a sequence of <= switch tokens to
    a longer one (the LongRoPE switch, `longrope_switch`): the last token comes from T + max_new_tokens - 1."""
    switch = longrope_switch(cfg)
    return switch is not None and T <= switch <= T + max_new_tokens - 2


def _check_longrope(cfg, T: int, max_new_tokens: int) -> None:
    """GenerationError when a LongRoPE (Phi-3 long-context) decode would cross original_max_position_embeddings:
    the cached keys hold the short factors and from there on the sequence needs the long ones everywhere."""
    if crosses_longrope(cfg, T, max_new_tokens):
        raise GenerationError(f"prompt {T} + max_new_tokens {max_new_tokens} cross this checkpoint's LongRoPE "
                              f"original_max_position_embeddings {longrope_switch(cfg)}, where the whole sequence "
                              f"must be re-encoded with the long factors: use model.generate (Llama.generate), "
                              f"which does")


def _check_run(model: nn.Module, max_new_tokens, generator, sync_every, cuda_graph) -> bool:
    """Validate the loop arguments; returns whether to use a CUDA graph."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise GenerationError(f"sync_every must be an int >= 1, got {sync_every!r}")
    device = model.model.embed_tokens.weight.device
    if generator is not None:
        gd = generator.device
        if gd.type != device.type or (device.type == "cuda" and (gd.index or 0) != (device.index or 0)):
            raise GenerationError(f"generator is on {gd} but the model is on {device}")
    if cuda_graph and device.type != "cuda":
        raise GenerationError(f"cuda_graph=True needs a CUDA model, this one is on {device}")
    return device.type == "cuda" if cuda_graph is None else bool(cuda_graph)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, eos_token_id: int | list[int] | None = None,
             generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
             stream: Callable[[torch.Tensor], None] | None = None, sync_every: int = 16,
             cuda_graph: bool | None = None) -> torch.Tensor:
    """Prompt ids (B, T) -> (B, T + n) int64 ids on input_ids' device, n <= max_new_tokens new tokens per row.

    model: a `Llama` (dense or 4-bit linears, LoRA merged or not; put in eval mode while decoding, so no LoRA
    dropout, then restored). Sampling: see `sample` (temperature 0 = greedy). eos_token_id (int or list): a row
    that produced one keeps emitting eos_token_id[0]; decoding stops once every row has. attention_mask (B, T),
    1 = real token, for left-padded prompts: each row decodes as it would alone. generator: on the model's
    device (None: the default one). stream(tokens): called with each new chunk of tokens, (B, m) int64 on the
    CPU: the first token right after the prefill, then every `sync_every` tokens (the host's only syncs, also
    made for the eos check); together the chunks are out[:, T:]. cuda_graph: None = on CUDA, False = eager everywhere.
    Raises GenerationError naming the bad argument. Reproducibility: with a seeded generator, dense models repeat
    their tokens exactly; 4-bit models on CUDA may not when sampling, since the decode kernels add
    split-K partials with fp32 atomics (logits vary in the last bits, which can flip a token near a boundary).
    """
    cfg = SamplingConfig(temperature, top_p, top_k)
    eos = _eos_ids(eos_token_id)
    use_graph = _check_run(model, max_new_tokens, generator, sync_every, cuda_graph)
    ids, pad = _check_prompt(model, input_ids, attention_mask)
    if max_new_tokens == 0:
        return input_ids.to(torch.long).clone()
    B, T = ids.shape
    _check_longrope(model.config, T, max_new_tokens)
    max_len = -(-(T + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND
    was_training = model.training
    model.eval()
    try:
        dec = _decoder(model, B, max_len, cfg, eos, generator, use_graph)
        n = _decode(dec, ids, pad, max_new_tokens, eos, stream, sync_every)
        return dec.seq[:, :T + n].to(input_ids.device, copy=True)
    finally:
        model.train(was_training)


def _decode(dec: _Decoder, ids: torch.Tensor, pad: torch.Tensor, max_new_tokens: int, eos: tuple[int, ...],
            stream, sync_every: int) -> int:
    """Prefill, then steps in chunks of sync_every; returns how many new tokens the result keeps."""
    B, T = ids.shape
    dec.prefill(ids, pad)
    if not eos and stream is None:  # nothing to check or show on the way: queue every step, sync once at the end
        for _ in range(max_new_tokens - 1):
            dec.step()
        return max_new_tokens
    made, kept = 1, 0  # tokens in dec.seq[:, T:T + made]; of them, handed to the host so far
    finished = torch.zeros(B, dtype=torch.bool)  # host copy: the row has produced an eos
    eos_cpu = torch.tensor(eos, dtype=torch.long)
    while True:
        new = dec.seq[:, T + kept:T + made].cpu()  # (B, m): the only sync of a chunk
        stop = made == max_new_tokens
        if eos:
            done = finished[:, None] | (torch.isin(new, eos_cpu).cumsum(dim=1) > 0)  # (B, m)
            all_done = done.all(dim=0).nonzero()
            if len(all_done):  # cut after the first token at which every row is done (extra steps are all eos)
                new, stop = new[:, :int(all_done[0]) + 1], True
            finished = done[:, -1]
        kept += new.shape[1]
        if stream is not None and new.shape[1]:
            stream(new)
        if stop:
            return kept
        for _ in range(min(sync_every, max_new_tokens - made)):
            dec.step()
        made = min(made + sync_every, max_new_tokens)


@torch.no_grad()
def generate_reference(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                       top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                       generator: torch.Generator | None = None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The plain loop `generate` replaces, kept as its reference: a growing `KVCache`, `model(...)` per token, a
    host check of the eos flags after every token, `sample_next` (torch.multinomial). Same arguments and
    result as `generate` (no top_k); slow on a GPU (launch-bound)."""
    SamplingConfig(temperature, top_p)
    eos = _eos_ids(eos_token_id)
    ids, pad = _check_prompt(model, input_ids, attention_mask)
    B, T = ids.shape
    mask = pos = None
    if attention_mask is not None:
        mask = (torch.arange(T, device=ids.device)[None] >= pad[:, None]).long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each row's real tokens start at position 0
    eos_t = torch.tensor(eos, device=ids.device, dtype=torch.long)
    cache = KVCache(model.config, B, T + max_new_tokens, ids.device, model.model.embed_tokens.weight.dtype)
    out = [ids]
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    was_training = model.training
    model.eval()
    try:
        logits = model(ids, mask, cache, pos)[:, -1]
        for step in range(max_new_tokens):
            nxt = sample_next(logits.float(), temperature, top_p, generator)  # (B,)
            if eos:
                nxt = torch.where(done, eos_t[0], nxt)
                done |= torch.isin(nxt, eos_t)
            out.append(nxt[:, None])
            if step == max_new_tokens - 1 or (eos and bool(done.all())):
                break
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
                pos = pos[:, -1:] + 1
            logits = model(nxt[:, None], mask, cache, pos)[:, -1]
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1).to(input_ids.device)
