"""Tokens/s, peak GPU memory and host memory of one QLoRA training step: ours against transformers + PEFT +
bitsandbytes ("hf"), Unsloth ("unsloth") and HF + Liger-Kernel ("liger"), all measured in the same run.

    python3 benchmarks/bench_train.py                        # 1B and 8B, batch 1 and 4, seq 2048, all four stacks
    python3 benchmarks/bench_train.py --models llama-3.1-8b llama-3.2-1b:4 --deadline 480   # 1B at batch 4 only
    python3 benchmarks/bench_train.py --stacks ours hf --models llama-3.2-1b --iters 3        # quick
    python3 benchmarks/bench_train.py --frontier --models llama-3.1-8b:4 --policy full --budget 10 14 20
    python3 benchmarks/bench_train.py --stacks ours --packed-docs 8   # cost of per-document attention in packed rows
    python3 benchmarks/bench_train.py --stacks ours hf --models qwen3-8b:1,4 gemma-3-12b:1,4   # other families
    python3 benchmarks/bench_train.py --smoke                # CPU: the plumbing on a tiny model (no measurement)
    python3 benchmarks/bench_train.py --smoke --models tiny-qwen3 tiny-gemma3   # the same on tiny Qwen3, Gemma 3
    python3 benchmarks/bench_train.py --stacks ours unsloth --models llama-3.1-8b:1 --max-context 22  # longest T
    python3 benchmarks/bench_train.py --stacks ours unsloth --models llama-3.1-8b:1 --context-table   # tok/s by T
    python3 benchmarks/bench_train.py --smoke --stacks ours --max-context 0.625 --context-table  # CPU plumbing

Models (SHAPES): Llama 3.2 1B, 3.1 8B, 3.1 70B, Qwen3-8B and Gemma-3-12B (text) at their published shapes, each
entry the config.json fields of its family (model_type, RoPE, eps, ...): ours reads them with the loader
(LlamaConfig.from_hf_config), the peers with transformers' config class of that model_type.

A step is what `qlora_core.train` does per optimizer step: forward over (B, T) tokens with every position
labelled, backward, grad-norm clipping (1.0), paged 8-bit AdamW (lr 1e-3), zero_grad. The tokens are a learnable
stream (_checks.learnable_stream: Zipf tokens, each row's second half repeating its first), the same for every
stack, and each row is checked to train (_checks.train_failure: the loss of the first timed batch falls by 1% over
the timed steps, every LoRA grad of the last step finite and nonzero; else the row is FAILED, a "FAILED train
check" line is printed and the exit status is non-zero). Every stack: random weights (_checks.init_param: the
same in every stack), decoder
linears NF4 + double quant (blocksize 64), bf16 elsewhere, LoRA r=16 alpha=32 dropout 0 on all 7 projections,
gradient checkpointing per block, bf16 autocast.
- ours: qlora_core Llama built block by block on the GPU + QuantLinear (Triton NF4 kernels) + apply_lora (fp32
  A/B) + PagedAdamW(optim_bits=8) + train.batch_loss (label-only, chunked lm_head / cross entropy); the
  checkpointing policy is `--policy` / `--budget` (below).
- hf: transformers AutoModelForCausalLM (Llama/Qwen3/Gemma3ForCausalLM) with bnb Linear4bit, PEFT
  get_peft_model, bnb PagedAdamW8bit, model(input_ids, labels=labels).loss (full fp32 logits).
  prepare_model_for_kbit_training is NOT called (it upcasts norms/embeddings to fp32, which only adds memory).
- liger: the hf stack after liger_kernel's apply_liger_kernel_to_llama (RoPE, RMSNorm, SwiGLU, fused linear
  cross entropy: no logits tensor), applied before the model exists. Llama models only (LLAMA_ONLY_STACKS).
- unsloth: `import unsloth` first (before transformers / peft), FastLanguageModel.from_pretrained of a random
  bf16 checkpoint folder (built by a subprocess into /dev/shm while Unsloth imports; QLORA_BENCH_CKPT moves it)
  with load_in_4bit (its bnb NF4 + double quant), get_peft_model(r=16, alpha=32, dropout 0, 7 projections,
  use_gradient_checkpointing="unsloth"), bnb PagedAdamW8bit, model(input_ids, labels).loss. Its defaults stay on:
  it compiles each decoder block (the warm-up steps pay 20-45 s), sets PYTORCH_ALLOC_CONF=expandable_segments,
  and its "unsloth" checkpointing offloads block inputs to pinned host memory (the "pinned" column). Llama only.
Each (stack, model) runs in its own subprocess (ours: one per policy point), so one's allocations, caches and
patches never touch another's numbers; they run one after another, never at the same time.

Checkpointing policy (ours): each `--policy` name (OUR_POLICIES) and each `--budget` GiB is handed to
`qlora_core.activation_checkpoint.apply_policy(model, policy[, budget_gib=GiB]) -> str | None` once the model is
built and before the first step; the string it returns (the plan it chose) is printed with the row. Without that
function in the library only "full" (recompute every block: today's behaviour) and no budget are accepted. A plan
that depends on the batch shape reads it at the first forward: the process runs its --batches in order.
`--frontier` measures ours at every (policy, budget) point and each peer's one point, prints them as a table
and plots tokens/s against peak GPU GiB into --png (pinned host GiB drawn as a dotted extension of the point).

Timing: `--warmup` steps (Triton / torch.compile, optimizer pages), then at least `--iters` timed steps and
at least `--min-seconds` of them (1B steps of ~0.2 s vary by +-30% between calls), each synchronized; the
median is reported. Memory, per batch shape, over the timed steps:
- GPU GiB = torch.cuda.max_memory_allocated (model, LoRA and optimizer state included); "reserved" and
  "device used" (total - free from cudaMemGetInfo, polled: CUDA context, cuBLAS workspaces, memory outside
  torch's allocator) are in the detail table and the JSON;
- pinned GiB = pinned host memory held by torch's pinned allocator at its peak (torch.cuda.host_memory_stats;
  cached blocks included, since they stay locked in host RAM): what offloading moved off the GPU. RSS peak and RSS growth (peak during the timed steps minus RSS before this shape's warm-up; catches
  host buffers outside the pinned allocator) are in the detail table and the JSON.
Output: the detail table (every row), the comparison table (one row per model and B x T: each stack's tok/s,
GPU GiB, pinned GiB, then ours/HF and ours/Unsloth), the frontier table with --frontier, and one JSON line last.
A stack that fails or times out prints its stderr tail and shows "-" (or "OOM").

Long context (_max_context.py; docs/benchmarks.md has the device commands): `--max-context GIB ...` runs one
worker per (stack, budget) that caps the GPU at the budget and searches the longest T at batch 1 whose training
step completes within it (doubling from --mc-start, then bisection to --mc-step tokens; a probe that would not
finish in the worker's time is not started); ours plans per T for 90% of the budget unless --policy / --budget
say otherwise. `--context-table [T ...]` times one step after one warm-up at each T (no cap). Every probe is a
ROW line printed and appended to --log as it happens; the tables (every probe, max T per stack and budget with
tok/s and host memory there, tok/s by T) and the JSON come at the end. No train check on these rows (one step
at lr 1e-3 may raise a long batch's loss): their losses before and after the update are printed instead.

Offline wheels (benchmarks/device_setup.sh does this: `source` it; `--offline-wheels` prints it): the device
machine has torch, triton, transformers and peft but no internet; carry `.whl` (bitsandbytes) and `.peerwhl`
(unsloth, unsloth_zoo, liger_kernel, trl, datasets, dill, multiprocess: ../shared/peer-wheels copied into an
ignored folder of the checkout), then from the repository root:

    python3 -c "import zipfile,glob;[zipfile.ZipFile(w).extractall('/tmp/site') \
        for w in sorted(glob.glob('.whl/*.whl')+glob.glob('.peerwhl/*.whl'))]"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
    export HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

The whole comparison in one device call (8B at B=1 and 4, 1B at B=4; about 8-9 minutes, --deadline keeps it
under the call's 10; carry .whl and .peerwhl; files come back from $OUT):

    source benchmarks/device_setup.sh && python3 benchmarks/bench_train.py --models llama-3.1-8b llama-3.2-1b:4 \
        --deadline 540 --timeout 150 unsloth=270 --log $OUT/bench_train.log --json $OUT/bench_train.json
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import torch

SCRIPT = os.path.abspath(__file__)  # workers chdir to WORKDIR, so resolved now
ROOT = os.path.dirname(os.path.dirname(SCRIPT))
sys.path.insert(0, os.path.dirname(SCRIPT))  # _checks beside this file (also when a test loads it by path)
from _checks import MIN_DROP, clip_grads, grad_summary, init_param, learnable_stream, train_failure  # noqa: E402
import _max_context as mc  # noqa: E402

# Each family's config.json fields besides the shape: what its published checkpoints set (the Llama entries keep
# the values every earlier row was measured with: Llama 3.2's llama3 rope scaling, Llama 3's eps 1e-5).
LLAMA3 = dict(model_type="llama", rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
              rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192})
QWEN3 = dict(model_type="qwen3", rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960,
             attention_bias=False, tie_word_embeddings=False)  # q/k RMSNorm: the family's code, no field
# Gemma 3 (text): per layer type RoPE (transformers 5 form, as the loader reads it): full layers base 1e6 with
# linear scaling x8 (4B and up), sliding layers base 1e4 unscaled; GeGLU; tied embeddings
GEMMA3 = dict(model_type="gemma3_text", rms_norm_eps=1e-6, max_position_embeddings=131072,
              hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})


def gemma3_layer_types(layers: int, pattern: int = 6) -> list[str]:
    """Gemma3TextConfig's default layer_types: every `pattern`-th layer full attention, the others sliding."""
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]


# config.json fields of each benchmarked model (family fields above + its shape): ours reads them with the loader's
# LlamaConfig.from_hf_config, the peers with transformers' config class of the model_type (hf_config)
SHAPES = {
    "llama-3.2-1b": dict(LLAMA3, vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama-3.1-8b": dict(LLAMA3, vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "llama-3.1-70b": dict(LLAMA3, vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "qwen3-8b": dict(QWEN3, vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "gemma-3-12b": dict(GEMMA3, vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=1024, layer_types=gemma3_layer_types(48)),
    # --smoke only: the plumbing on the CPU, never a measurement. Hidden 256, not 64: LoRA moves the logits in
    # proportion to the width, and at 64 the loss fell ~1% in 10 steps at LR (too close to the train check's bar)
    "tiny": dict(LLAMA3, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    "tiny-qwen3": dict(QWEN3, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    # one sliding layer (window 16 < --smoke's seq 64) and one full layer: both attention kinds and RoPE bases run;
    # query_pre_attn_scalar 256 (the family's default) != head_dim 64, so a scale read from the wrong field shows
    "tiny-gemma3": dict(GEMMA3, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=256,
                        sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
}
# The peers build the dense bf16 model first (hf, liger: on the GPU; unsloth: a checkpoint in host RAM), which
# at 70B (140 GB) fits neither, so 70B rows are ours alone. 8B (16 GB) and 12B (24 GB) fit an 80 GB card.
PEER_MODELS = ("llama-3.2-1b", "llama-3.1-8b", "qwen3-8b", "gemma-3-12b", "tiny", "tiny-qwen3", "tiny-gemma3")
# Unsloth and Liger are wired for Llama here (apply_liger_kernel_to_llama, the Llama checkpoint writer): other
# families' rows are HF and ours alone
LLAMA_ONLY_STACKS = ("unsloth", "liger")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STACKS = ("ours", "hf", "unsloth", "liger")
LABEL = {"ours": "ours", "hf": "HF", "unsloth": "Unsloth", "liger": "HF+Liger"}
REQUIRES = {"ours": (), "hf": ("transformers", "peft", "bitsandbytes"),  # checked before a worker starts
            "liger": ("transformers", "peft", "bitsandbytes", "liger_kernel"),
            "unsloth": ("unsloth", "unsloth_zoo", "bitsandbytes")}
# --policy choices (qlora_core.activation_checkpoint.apply_policy)
OUR_POLICIES = ("none", "save_attn", "full", "offload")
# Every stack: AdamW (8-bit paged on CUDA), this lr, no schedule. 1e-3 (not the 2e-4 of a long run) so the loss
# visibly falls within the warm-up + timed steps of an 8B row: the row's train check needs it to.
LR = 1e-3
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
WORKDIR = os.environ.get("QLORA_BENCH_WORK", "/tmp/qlora_bench_work")  # workers' cwd: Unsloth writes its cache here
GIB = 2**30
LONG_MARGIN_S = 10  # a long-context worker stops starting probes this long before its timeout (exit, teardown)
DONE = ".complete-named-init"  # a checkpoint's last file; renamed when its weights changed (older folders rebuild)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# -- ours ---------------------------------------------------------------------------------------------------------
def use_checkout() -> None:
    """Import qlora_core from this checkout. The repository root joins sys.path only in processes that run ours:
    its top-level kernels/ folder would stand in for the PyPI `kernels` package that transformers probes for."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def apply_our_policy(model, policy: str, budget_gib: float | None) -> str | None:
    """Hand (policy, budget) to qlora_core.activation_checkpoint.apply_policy when the library has it; returns its
    plan string.

    Without apply_policy only policy "full" and no budget are valid (check_points refuses the rest earlier)."""
    hook = getattr(importlib.import_module("qlora_core.activation_checkpoint"), "apply_policy", None)
    if hook is None:
        return None
    plan = hook(model, policy) if budget_gib is None else hook(model, policy, budget_gib=budget_gib)
    return None if plan is None else str(plan)


def ours_config(name: str):
    """Our LlamaConfig of SHAPES[name]: the loader's reading of its config.json fields (LlamaConfig.from_hf_config,
    as load_llama reads a checkpoint's), so each family's switches come from the same code as for real weights.
    The special token ids stay None (hf_config sets them): bench_generate's rows never stop at an eos."""
    use_checkout()
    from qlora_core.model_config import LlamaConfig

    return LlamaConfig.from_hf_config(SHAPES[name])


def ours_model(name: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, quantize: bool = True):
    """Our model of SHAPES[name] (any family of qlora_core.llama), random weights built one block at a time on
    `device`: NF4 + double quant decoder linears, `dtype` elsewhere (also bench_generate.py's model).
    quantize=False keeps the linears dense in `dtype` (tests compare it with dense_hf_model)."""
    use_checkout()
    from qlora_core.llama import Llama
    from qlora_core.qlinear import QuantLinear

    cfg = ours_config(name)
    with torch.device("meta"):
        model = Llama(cfg, dtype=dtype)
    # materialize one block at a time: peak = quantized model + one dense block (never a 70B model in bf16)
    tops = [("model.embed_tokens", model.model.embed_tokens), ("model.norm", model.model.norm)]
    for prefix, mod in tops + ([] if cfg.tie_word_embeddings else [("lm_head", model.lm_head)]):
        mod.to_empty(device=device)
        init_param(prefix + ".weight", mod.weight)  # the peers' weights too (hf_model): same names, same values
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for i, layer in enumerate(model.model.layers):
        layer.to_empty(device=device)
        for n, p in layer.named_parameters():
            init_param(f"model.layers.{i}.{n}", p)
        for parent in (layer.self_attn, layer.mlp) if quantize else ():
            for child, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):  # not q_norm / k_norm (Qwen3, Gemma 3)
                    setattr(parent, child, QuantLinear.from_linear(lin, "nf4", 64, True))
        if device == "cuda":
            torch.cuda.empty_cache()
    return model


def build_ours(name: str, policy: str = "full", budget_gib: float | None = None, packed_docs: int = 0,
               device: str = "cuda"):
    """(step(ids, labels, train=True) -> (loss, LoRA grad norms), notes) of our stack on SHAPES[name], built one
    block at a time on `device`; train=False: the forward alone, without autograd -> (loss, None)."""
    use_checkout()  # before the first qlora_core import: the device image has no installed copy
    from qlora_core.lora import apply_lora
    from qlora_core.optim import PagedAdamW
    from qlora_core.train_loop import batch_loss

    model = ours_model(name, device)
    apply_lora(model, r=16, alpha=32, dropout=0.0, target_modules=TARGETS, dtype=torch.float32)
    model.gradient_checkpointing = True
    model.train()
    notes = {"policy": policy, "budget_gib": budget_gib, "plan": apply_our_policy(model, policy, budget_gib)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(params, lr=LR, weight_decay=0.0, optim_bits=8)

    def packing(B, T):
        """position_ids / document_ids of rows made of `packed_docs` equal documents (what TrainConfig.pack_isolate
        passes for packed rows), or (None, None)."""
        if not packed_docs:
            return None, None
        L = -(-T // packed_docs)
        pos = (torch.arange(T, device=device) % L).expand(B, T)
        return pos, (torch.arange(T, device=device) // L).expand(B, T)

    def step(ids, labels, train: bool = True):
        pos, doc = packing(*ids.shape)
        with torch.autocast(device, dtype=torch.bfloat16), torch.set_grad_enabled(train):
            s, n = batch_loss(model, ids, labels, pos, doc)
        loss = s / n
        if not train:
            return loss, None
        loss.backward()
        norms = clip_grads(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), norms
    return step, notes


# -- transformers + PEFT + bitsandbytes, with or without Liger ----------------------------------------------------
def special_ids(vocab: int) -> dict[str, int]:
    """Llama-3's bos / eos / pad ids (128000, 128001, 128004 of 128256), placed the same way in any vocabulary."""
    return {"bos": vocab - 256, "eos": vocab - 255, "pad": vocab - 252}


def hf_config(name: str):
    """transformers' config of SHAPES[name] (LlamaConfig, Qwen3Config or Gemma3TextConfig, by its model_type) with
    special_ids placed in its vocabulary and the KV cache off (training)."""
    from transformers import AutoConfig

    ids = special_ids(SHAPES[name]["vocab_size"])
    return AutoConfig.for_model(**SHAPES[name], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                pad_token_id=ids["pad"], use_cache=False)


def quantize_hf_linears(model, device: str) -> None:
    """Decoder linears -> bnb Linear4bit (NF4, double quant, blocksize 64, bf16 compute), layer by layer."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", blocksize=64).to(device)
                setattr(parent, child, q)
        torch.cuda.empty_cache()


def dense_hf_model(name: str, device: str, dtype: torch.dtype = torch.bfloat16):
    """transformers' *ForCausalLM of hf_config(name) (AutoModelForCausalLM), built on `device` in `dtype` with
    _checks.init_param weights: ours_model's values under the same parameter names."""
    from transformers import AutoModelForCausalLM

    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config(name))
    finally:  # an OOM in the build must not leave bf16 the default for the rest of the process
        torch.set_default_dtype(torch.float32)
    for n, p in model.named_parameters():  # tied lm_head: listed once, as the embedding
        init_param(n, p)
    return model


def hf_model(name: str, device: str = "cuda"):
    """dense_hf_model of SHAPES[name]; on CUDA the decoder linears become bnb Linear4bit (quantize_hf_linears).
    Also bench_generate.py's peer model."""
    model = dense_hf_model(name, device)
    if device == "cuda":
        quantize_hf_linears(model, device)
    return model


def build_hf(name: str, device: str = "cuda", liger: bool = False):
    """(step, notes) of the HF stack; liger=True patches the Llama modules with Liger's kernels first. On the CPU
    (--smoke) the linears stay dense bf16 and the optimizer is torch AdamW: bnb's 4-bit and paged paths need CUDA."""
    notes = {}
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # before the model exists: patches LlamaRMSNorm, LlamaMLP (SwiGLU), apply_rotary_pos_emb and
        # LlamaForCausalLM.forward (fused linear cross entropy: training never materializes the logits)
        apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
                                    swiglu=True)
    from peft import LoraConfig, get_peft_model

    model = hf_model(name, device)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS),
                                             task_type="CAUSAL_LM"))
    model.train()
    if liger:
        import transformers.models.llama.modeling_llama as ml

        notes["liger_patched"] = {"mlp": ml.LlamaMLP.__name__, "norm": ml.LlamaRMSNorm.__name__,
                                  "rope": ml.apply_rotary_pos_emb.__module__}
    return peer_step(model, device), notes


def peer_step(model, device: str):
    """step(ids, labels, train=True) -> (loss, LoRA grad norms) of a transformers-style model: bf16 autocast
    forward with labels, backward, clip, bnb PagedAdamW8bit (torch AdamW on the CPU), zero_grad. train=False:
    the forward alone, without autograd -> (loss, None) (the row's check after the timed steps)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if device == "cuda":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=LR, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def step(ids, labels, train: bool = True):
        with torch.autocast(device, dtype=torch.bfloat16), torch.set_grad_enabled(train):
            loss = model(input_ids=ids, labels=labels).loss
        if not train:
            return loss, None
        loss.backward()
        norms = clip_grads(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), norms
    return step


# -- Unsloth ------------------------------------------------------------------------------------------------------
def param_bytes(name: str) -> int:
    """bf16 bytes of SHAPES[name]'s weights (what its checkpoint folder holds)."""
    s = SHAPES[name]
    h, i, L, d = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["head_dim"]
    attn = h * d * (2 * s["num_attention_heads"] + 2 * s["num_key_value_heads"])
    embed = s["vocab_size"] * h * (1 if s["tie_word_embeddings"] else 2)
    return 2 * (embed + L * (attn + 3 * h * i))


def ckpt_dir(name: str) -> str:
    """Where model `name`'s checkpoint folder goes: QLORA_BENCH_CKPT/name, else /dev/shm (tmpfs: written and
    read at memory speed) when a complete one is there or it has room with a margin, else /tmp."""
    if os.environ.get("QLORA_BENCH_CKPT"):
        return os.path.join(os.environ["QLORA_BENCH_CKPT"], name)
    shm = os.path.join("/dev/shm/qlora_bench_ckpt", name)
    try:
        roomy = shutil.disk_usage("/dev/shm").free > 1.25 * param_bytes(name) + 2 * GIB
    except OSError:
        roomy = False
    if roomy or os.path.exists(os.path.join(shm, DONE)):
        return shm
    return os.path.join("/tmp/qlora_bench_ckpt", name)


def save_tokenizer(folder: str, vocab: int) -> None:
    """A word-level tokenizer over the whole Llama-3 vocabulary: only ids matter, but Unsloth loads one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = special_ids(vocab)
    names = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|finetune_right_pad_id|>"}
    words = {f"<t{i}>": i for i in range(vocab) if i not in ids.values()}
    words.update({names[k]: i for k, i in ids.items()})
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="<t0>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=names["bos"], eos_token=names["eos"],
                                  pad_token=names["pad"], model_max_length=131072)
    tok.save_pretrained(folder)


def make_checkpoint(name: str, folder: str, device: str) -> None:
    """Write a random-weight bf16 HF folder for SHAPES[name] (_checks.init_param: ours_model's weights) plus a tokenizer
    into `folder` once (its DONE marker is written last); a second builder waits on the folder's lock."""
    import fcntl

    os.makedirs(folder, exist_ok=True)
    lock = open(os.path.join(folder, ".lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(folder, DONE)):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = dense_hf_model(name, device)
        model.save_pretrained(folder, max_shard_size="5GB")
        save_tokenizer(folder, SHAPES[name]["vocab_size"])
        open(os.path.join(folder, DONE), "w").write("ok\n")
        log(f"checkpoint {folder}: {time.perf_counter() - t0:.1f} s")


def build_unsloth(name: str, seq: int, device: str = "cuda"):
    """(step, notes) of Unsloth. The checkpoint folder is written by a subprocess while `import unsloth` runs."""
    if importlib.util.find_spec("unsloth") is None:
        raise ImportError("No module named 'unsloth' (carry .peerwhl and source benchmarks/device_setup.sh)")
    folder = ckpt_dir(name)
    notes = {"checkpoint": folder}
    builder = subprocess.Popen([sys.executable, SCRIPT, "--mkckpt", name, folder,
                                "--device", device], stdout=sys.stderr, stderr=sys.stderr)
    t0 = time.perf_counter()
    env_before = dict(os.environ)
    try:
        import unsloth  # noqa: F401  (must come before transformers / peft / trl: it patches them)
        from unsloth import FastLanguageModel
    except BaseException:
        builder.kill()
        raise
    notes["import_s"] = round(time.perf_counter() - t0, 1)
    notes["env_set_by_unsloth"] = {k: v for k, v in os.environ.items() if env_before.get(k) != v}
    if builder.wait() != 0:
        raise RuntimeError(f"checkpoint builder for {name} exited {builder.returncode}")
    notes["ckpt_ready_s"] = round(time.perf_counter() - t0, 1)
    model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=seq, dtype=torch.bfloat16,
                                                 load_in_4bit=True, use_gradient_checkpointing="unsloth")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, bias="none",
                                             target_modules=list(TARGETS), use_gradient_checkpointing="unsloth",
                                             random_state=3407)
    FastLanguageModel.for_training(model)
    model.train()
    notes["loaded_s"] = round(time.perf_counter() - t0, 1)
    return peer_step(model, device), notes


# -- measuring ----------------------------------------------------------------------------------------------------
def rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Sampler:
    """Peak RSS and device memory in use (total - free), polled on a daemon thread every `period` s and after
    each step: levels that no allocator counter records (unpinned host buffers, CUDA context, cuBLAS workspaces)."""

    def __init__(self, cuda: bool, period: float = 0.025):
        self.cuda, self.period = cuda, period
        self.rss_peak = self.dev_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def poll(self) -> None:
        self.rss_peak = max(self.rss_peak, rss_bytes() or 0)
        if self.cuda:
            free, total = torch.cuda.mem_get_info()
            self.dev_peak = max(self.dev_peak, total - free)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.poll()

    def __enter__(self):
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self.rss_peak = self.dev_peak = 0
        self.poll()


def pinned_stats() -> dict:
    """Pinned host GiB held at its peak (cached blocks included: they stay locked in host RAM) and in use at its
    peak, from torch's pinned allocator; None where this torch keeps no such counter. The counters' names moved
    (2.13: allocated_bytes = held, active_bytes = in use; earlier: reserved_bytes = held, allocated_bytes = in
    use); held >= in use in both, so held is the largest of the peaks and in use the smallest."""
    stats = getattr(torch.cuda, "host_memory_stats", dict)()
    peaks = [stats[k] / GIB for k in ("allocated_bytes.peak", "reserved_bytes.peak", "active_bytes.peak") if k in stats]
    return {"pinned_gib": max(peaks, default=None), "pinned_active_gib": min(peaks, default=None)}


def measure(step, batch: int, seq: int, vocab: int, iters: int, device: str, warmup: int = 2,
            min_seconds: float = 0.0, max_steps: int = 200, check: bool = True) -> dict:
    """Warm up, then time >= iters and >= min_seconds synchronized steps on the learnable stream (every position
    labelled; `_checks.learnable_stream`, the same tokens for every stack); the row: median step time, tok/s, GPU /
    pinned / RSS peaks over the timed steps, the loss of the first step (loss_start, before any update), of the
    first and last timed steps, loss_after (after the timed steps, a forward alone on the first timed step's
    tokens: the same batch as loss_first, so no batch-to-batch noise), the last step's LoRA grad norms and the
    train check ("failed": why, or None, from loss_first vs loss_after; check=False: no verdict, for
    --context-table's single timed step at long T, where one update can raise the loss)."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # a new seed per shape also draws a new Zipf ranking: the frequent ids of the previous shape (same process,
    # same LoRA) turn rare, so this shape's loss starts high and must fall again rather than sit near the entropy
    pool = [ids.to(device) for ids in learnable_stream(warmup + iters, batch, seq, vocab, seed=batch * 100_003 + seq)]
    rss0 = rss_bytes() or 0
    losses = []  # every step's loss tensor: read once, after the timed steps (no sync of its own)
    with Sampler(cuda) as mem:
        warm = []
        for ids in pool[:warmup]:
            t0 = time.perf_counter()
            losses.append(step(ids, ids)[0])
            sync()
            warm.append(round(time.perf_counter() - t0, 3))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            getattr(torch.cuda, "reset_peak_host_memory_stats", lambda: None)()
        mem.reset()
        times = []
        while len(times) < max_steps and (len(times) < iters or sum(times) < min_seconds):
            ids = pool[warmup + len(times) % iters]
            t0 = time.perf_counter()
            loss, norms = step(ids, ids)
            sync()
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            mem.poll()
    med = statistics.median(times)
    loss = torch.stack(losses).float().cpu().tolist()
    grads = grad_summary(norms)
    row = {"batch": batch, "seq": seq, "steps": len(times), "step_s": med, "tok_s": batch * seq / med,
           "times_s": [round(t, 4) for t in times], "warmup_s": warm, "loss_start": loss[0],
           "loss_first": loss[warmup], "loss_last": loss[-1], **grads,
           "rss_peak_gib": mem.rss_peak / GIB, "rss_growth_gib": (mem.rss_peak - rss0) / GIB}
    if cuda:  # read before the check's forward below, which is not part of the timed steps
        row.update(gpu_gib=torch.cuda.max_memory_allocated() / GIB, reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                   device_used_gib=mem.dev_peak / GIB, **pinned_stats())
    row["loss_after"] = loss_after(step, pool[warmup], row)
    if not check:
        return row
    row["failed"] = train_failure(loss[warmup], row["loss_after"] if row["loss_after"] is not None else loss[-1],
                                  grads)
    return row


def loss_after(step, ids: torch.Tensor, row: dict) -> float | None:
    """The loss of `ids` (the first timed step's tokens) after the timed steps: one forward without autograd,
    outside the timed region. None (and row["eval_error"]) when the stack's forward refuses to run that way."""
    try:
        return float(step(ids, ids, train=False)[0])
    except Exception as e:  # the timing stands; the check then falls back to the last timed step's loss
        row["eval_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return None


def profile(step, batch: int, seq: int, vocab: int, top: int = 18) -> None:
    """One step under torch.profiler: the kernels with the most device time, grouped by name."""
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(ids, ids)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_s = sum(e.self_device_time_total for e in events) / 1e6
    print(f"profiled step: wall {wall:.3f} s (with profiler overhead), device time {device_s:.3f} s")
    print(events.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=70))


def build(stack: str, name: str, a) -> tuple:
    """(step, notes) of `stack` on model `name` from the worker's arguments."""
    if stack == "ours":
        return build_ours(name, a.policy[0], a.budget[0] if a.budget else None, a.packed_docs, a.device)
    if stack == "unsloth":
        return build_unsloth(name, a.seq, a.device)
    return build_hf(name, a.device, liger=stack == "liger")


def worker(stack: str, name: str, a) -> None:
    """Build one stack in this process and print one `ROW {json}` line per batch size (an OOM is a row too)."""
    if a.device == "cpu":
        torch.set_num_threads(1)  # tiny smoke shapes: extra threads only wait on each other (tests/conftest.py)
    cap = None
    if a.mc_budget:  # before the stack allocates anything: the cap holds the caching allocator from the start
        # the cap initialises CUDA before Unsloth's import could set this (as it does otherwise): same for all.
        # The driver sets it in the worker's environment already (long_context_env); this is the fallback for a
        # worker started by hand, and it only holds while nothing has read torch's allocator settings yet
        os.environ.update(long_context_env({}, os.environ))
        cap = mc.GpuCap(a.mc_budget, a.device)
        cap_notes = dict(cap.apply(), alloc_conf=os.environ.get("PYTORCH_ALLOC_CONF")
                         or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    if a.mc_budget or a.context_table:
        a.seq = long_context_seq(a)
    t0 = time.perf_counter()
    try:
        step, notes = build(stack, name, a)
    except ImportError as e:
        log(f"bench_train worker: {stack} cannot be imported: {type(e).__name__}: {e}")
        sys.exit(3)
    notes["build_s"] = round(time.perf_counter() - t0, 1)
    notes.update(cap_notes if cap else {})
    vocab = SHAPES[name]["vocab_size"]
    if a.mc_budget or a.context_table:
        long_context_worker(step, stack, name, a, notes, cap)
        return
    if a.profile:
        measure(step, a.batches[0], a.seq, vocab, 1, a.device, a.warmup)
        profile(step, a.batches[0], a.seq, vocab)
        return
    for b in a.batches:
        try:
            row = measure(step, b, a.seq, vocab, a.iters, a.device, a.warmup, a.min_seconds)
        except torch.OutOfMemoryError as e:
            row = {"batch": b, "seq": a.seq, "error": f"OOM: {str(e)[:160]}"}
            torch.cuda.empty_cache()
        row.update(stack=stack, model=name, notes=notes,
                   gpu=torch.cuda.get_device_name() if a.device == "cuda" else "cpu")
        print("ROW " + json.dumps(row), flush=True)


def long_context_env(env: dict, current) -> dict:
    """`env` plus PYTORCH_ALLOC_CONF=expandable_segments:True unless `current` (the environment the worker
    inherits) sets PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF. A --max-context worker gets it in its
    environment from the start: set after `import torch`, it counts only if nothing read the allocator's
    settings before CUDA starts."""
    if current.get("PYTORCH_ALLOC_CONF") or current.get("PYTORCH_CUDA_ALLOC_CONF"):
        return dict(env)
    return dict(env, PYTORCH_ALLOC_CONF="expandable_segments:True")


def long_context_seq(a) -> int:
    """Unsloth's max_seq_length in a long-context worker: the longest T it probes (a --max-context worker: the
    ceiling; the table's worker: its longest T). Not more: above the config's max_position_embeddings Unsloth's
    from_pretrained replaces the config's RoPE scaling (llama3) with linear scaling by the ratio."""
    return a.mc_ceiling if a.mc_budget else max(a.context_table)


def long_context_worker(step, stack: str, name: str, a, notes: dict, cap) -> None:
    """--max-context (a.mc_budget: one budget per worker) or --context-table in a worker whose stack is built:
    rows are printed (and appended to a.live_log) as they come, so a killed run keeps what it measured."""
    gpu = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    tag = {"kind": "probe" if a.mc_budget else "table", "stack": stack, "model": name, "notes": notes, "gpu": gpu}
    if a.mc_budget:
        emit = mc.emitter(dict(tag, budget_gib=a.mc_budget), a.live_log)
        mc.max_context_worker(step, SHAPES[name]["vocab_size"], a, cap, emit, Sampler, pinned_stats)
    else:
        mc.table_worker(step, SHAPES[name]["vocab_size"], a, mc.emitter(tag, a.live_log), measure)


# -- driver -------------------------------------------------------------------------------------------------------
def parse_models(specs: list[str], batches: list[int]) -> list[tuple[str, list[int]]]:
    """["llama-3.1-8b", "llama-3.2-1b:4"] -> [(name, batch sizes)]: a ":B,B" suffix overrides --batches."""
    plan = []
    for spec in specs:
        name, _, bs = spec.partition(":")
        if name not in SHAPES:
            raise SystemExit(f"bench_train.py: --models {spec!r}: unknown model {name!r} (one of {', '.join(SHAPES)})")
        try:
            sizes = [int(b) for b in bs.split(",")] if bs else list(batches)
        except ValueError:
            raise SystemExit(f"bench_train.py: --models {spec!r}: batch sizes after ':' must be integers like 1,4")
        plan.append((name, sizes))
    return plan


def parse_timeouts(items: list[str]) -> dict[str, float]:
    """["200", "unsloth=400"] -> seconds per stack's subprocess: a bare number sets every stack, STACK=S one."""
    out = dict.fromkeys(STACKS, 300.0)
    for item in items:
        stack, _, sec = item.rpartition("=")
        try:
            value = float(sec)
        except ValueError:
            raise SystemExit(f"bench_train.py: --timeout {item!r}: expected SECONDS or STACK=SECONDS")
        if stack and stack not in STACKS:
            raise SystemExit(f"bench_train.py: --timeout {item!r}: unknown stack {stack!r} "
                             f"(one of {', '.join(STACKS)})")
        out.update({stack: value} if stack else dict.fromkeys(STACKS, value))
    return out


def our_points(policies: list[str] | None, budgets: list[float], frontier: bool) -> list[tuple[str, float | None]]:
    """Ours' (policy, budget GiB or None) points: each policy alone, then each budget (a budget plans its own
    per-block policies, so it is not combined with --policy); checked here, before any subprocess starts, against
    OUR_POLICIES and what qlora_core.activation_checkpoint offers. Without --policy: every policy with --frontier,
    none besides the budgets when --budget is given (`--budget 70` is the one point ("full", 70)), else "full"."""
    policies = policies or (list(OUR_POLICIES) if frontier else [] if budgets else ["full"])
    bad = [p for p in policies if p not in OUR_POLICIES]
    if bad:
        raise SystemExit(f"bench_train.py: --policy {bad[0]!r}: not one of OUR_POLICIES {OUR_POLICIES}")
    if any(b <= 0 for b in budgets):
        raise SystemExit(f"bench_train.py: --budget {budgets}: every budget must be > 0 GiB")
    use_checkout()
    has_hook = hasattr(importlib.import_module("qlora_core.activation_checkpoint"), "apply_policy")
    if not has_hook and (budgets or policies != ["full"]):
        raise SystemExit("bench_train.py: --policy other than 'full' and --budget need "
                         "qlora_core.activation_checkpoint.apply_policy, which this checkout does not define")
    points = [(p, None) for p in policies] + [("full", b) for b in budgets]
    if len(points) > 1 and not frontier:
        raise SystemExit(f"bench_train.py: {len(points)} --policy/--budget points need --frontier "
                         "(one point otherwise)")
    return points


def check_long_context(a) -> None:
    """Refuse --max-context / --context-table settings before any worker starts."""
    if a.frontier or a.profile:
        raise SystemExit("bench_train.py: --max-context / --context-table take no --frontier or --profile")
    if any(b <= 0 for b in a.max_context or []) or any(t < 2 for t in a.context_table):
        raise SystemExit("bench_train.py: --max-context budgets must be > 0 GiB and --context-table T >= 2")
    try:
        mc.Ladder(a.mc_start, a.mc_step, a.mc_ceiling, mc.ALIGN if a.device == "cuda" else 64)
    except ValueError as e:
        raise SystemExit(f"bench_train.py: {e}")


def point_label(point: tuple[str, float | None] | None) -> str | None:
    if point is None:
        return None
    policy, budget = point
    return policy if budget is None else f"budget {budget:g}GiB"


def versions() -> dict:
    """Installed versions (package metadata: nothing is imported, so Unsloth patches nothing in this process)."""
    from importlib.metadata import PackageNotFoundError, version

    v = {}
    for pkg in ("torch", "triton", "bitsandbytes", "transformers", "peft", "unsloth", "unsloth_zoo", "liger_kernel"):
        try:
            v[pkg] = version(pkg)
        except PackageNotFoundError:
            v[pkg] = None
    return v


def worker_env(stack: str) -> dict:
    """The environment of a worker: offline settings; a peer's PYTHONPATH loses this checkout (use_checkout)."""
    env = dict(os.environ, **OFFLINE_ENV)
    if stack != "ours":
        keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != ROOT]
        env["PYTHONPATH"] = os.pathsep.join(keep)
    return env


def run_worker(cmd: list[str], env: dict, timeout: float, log_path: str | None
               ) -> tuple[list[dict], str | None, str, float]:
    """Run one worker in its own session with stdout/stderr in files; kill its whole process group afterwards
    (compile workers, a checkpoint builder). Returns (ROW dicts, why it failed or None, stderr, wall seconds)."""
    os.makedirs(WORKDIR, exist_ok=True)
    paths = [os.path.join(WORKDIR, f"worker{os.getpid()}.{k}") for k in ("out", "err")]
    t0 = time.perf_counter()
    with open(paths[0], "w") as out, open(paths[1], "w") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=WORKDIR, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()
    wall = time.perf_counter() - t0
    stdout, stderr = (open(path, errors="replace").read() for path in paths)
    for path in paths:
        os.remove(path)  # --log keeps them
    if log_path:
        with open(log_path, "a") as f:
            f.write(f"\n==== {' '.join(cmd[2:])} (rc={rc}, {wall:.0f} s)\n{stdout}\n---- stderr\n{stderr}")
    rows = [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("ROW ")]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if rc is None:
        why = f"timeout after {timeout:.0f} s"
    else:
        why = None if rc == 0 else (lines[-1] if lines else f"exit {rc}")
    return rows, why, stderr, wall


def load_reused(path: str | None) -> dict:
    """Peer rows (with tok/s) of an earlier run's JSON (the --json file or a log whose last line is the JSON),
    keyed (stack, model, batch, seq)."""
    if not path:
        return {}
    data = json.loads(open(path).read().strip().splitlines()[-1])
    return {(r["stack"], r["model"], r["batch"], r["seq"]): dict(r, reused=path)
            for r in data["rows"] if r.get("stack") != "ours" and "tok_s" in r}


def worker_cmd(a, stack: str, name: str, batches: list[int], point) -> list[str]:
    cmd = [sys.executable, SCRIPT, "--worker", stack, name, "--device", a.device,
           "--seq", str(a.seq), "--iters", str(a.iters), "--warmup", str(a.warmup),
           "--min-seconds", str(a.min_seconds), "--packed-docs", str(a.packed_docs),
           "--batches", *map(str, batches)]
    if point is not None:
        cmd += ["--policy", point[0]] + ([] if point[1] is None else ["--budget", str(point[1])])
    return cmd


def skip_reason(stack: str, name: str, left: float, deadline: float) -> str | None:
    """Why (stack, model) is not run at all, or None."""
    missing = [m for m in REQUIRES[stack] if importlib.util.find_spec(m) is None]
    if stack != "ours" and name not in PEER_MODELS:
        return "not run: the peers build the dense bf16 model first, which does not fit at this size"
    if stack in LLAMA_ONLY_STACKS and SHAPES[name]["model_type"] != "llama":
        return f"not run: {LABEL[stack]} is wired for Llama here, not {SHAPES[name]['model_type']}"
    if missing:
        return f"not installed: {', '.join(missing)} (carry .whl and .peerwhl, source benchmarks/device_setup.sh)"
    if left < 30:
        return f"skipped: --deadline {deadline:.0f} s reached"
    return None


def run_stack(a, base: dict, batches: list[int], timeout: float) -> tuple[list[dict], dict | None]:
    """One worker for (stack, model[, point]): its rows plus an error row per missing batch, and the failure."""
    tag = " ".join(filter(None, [base["stack"], base["model"], base["point"]]))
    point = None if base["stack"] != "ours" else next(p for p in a.points if point_label(p) == base["point"])
    cmd = worker_cmd(a, base["stack"], base["model"], batches, point)
    got, why, stderr, wall = run_worker(cmd, worker_env(base["stack"]), timeout, a.log)
    for r in got:
        r.update(point=base["point"], wall_s=round(wall, 1))
    done = {r["batch"] for r in got}
    print(f"# {tag}: {wall:.0f} s, {len(done)}/{len(batches)} shapes", flush=True)
    if len(done) == len(batches):
        return got, None
    why = why or "the worker printed no row"
    print(f"# {tag} failed: {why}\n#   stderr tail:\n" +
          "\n".join("#   " + ln for ln in stderr[-a.tail:].splitlines()), flush=True)
    return got + [dict(base, batch=b, error=why) for b in batches if b not in done], \
        dict(base, error=why)


def run_all(a, plan: list[tuple[str, list[int]]]) -> tuple[list[dict], list[dict]]:
    """Every (model, stack[, ours point]) in order, one subprocess each; rows not measured carry an error."""
    rows, failures = [], []
    reused = load_reused(a.reuse)
    t_start = time.perf_counter()
    for name, batches in plan:
        for stack in a.stacks:
            for point in (a.points if stack == "ours" else [None]):
                base = {"stack": stack, "model": name, "seq": a.seq, "point": point_label(point)}
                old = [reused.get((stack, name, b, a.seq)) for b in batches]
                left = a.deadline - (time.perf_counter() - t_start) if a.deadline else math.inf
                why = skip_reason(stack, name, left, a.deadline)
                if all(old):
                    rows += old
                    print(f"# {stack} {name}: rows reused from {a.reuse}", flush=True)
                elif why:
                    rows += [dict(base, batch=b, error=why) for b in batches]
                    print(f"# {stack} {name}: {why}", flush=True)
                else:
                    got, failure = run_stack(a, base, batches, min(a.timeout[stack], left))
                    rows += got
                    failures += [failure] if failure else []
    return rows, failures


def long_context_jobs(a, stack: str) -> list[tuple[float | None, tuple | None]]:
    """(budget GiB or None for the --context-table worker, ours' point or None) of one stack's workers. Ours
    takes --policy / --budget as given; with neither, under --max-context it plans per T (MemoryBudget) for
    mc.PLAN_SHARE of the probe's budget, and the table uses the default point."""
    point = a.points[0] if stack == "ours" else None
    jobs = [(b, ("full", round(mc.PLAN_SHARE * b, 2)) if stack == "ours" and not a.user_point else point)
            for b in a.max_context or []]
    return jobs + ([(None, point)] if a.context_table else [])


def long_context_cmd(a, stack: str, name: str, budget: float | None, point, timeout: float) -> list[str]:
    """A worker's command line: --mc-budget (one budget) or --context-table, its stop time and the live log."""
    cmd = worker_cmd(a, stack, name, [1], point) + [
        "--mc-start", str(a.mc_start), "--mc-step", str(a.mc_step), "--mc-ceiling", str(a.mc_ceiling),
        "--stop-at", str(time.time() + timeout - LONG_MARGIN_S)]
    cmd += ["--mc-budget", str(budget)] if budget else ["--context-table", *map(str, a.context_table)]
    return cmd + (["--live-log", os.path.abspath(a.log)] if a.log else [])


def run_long_context(a, plan) -> tuple[list[dict], list[dict]]:
    """--max-context / --context-table: per model, per stack, one worker per budget, then the table's worker;
    all rows (every probe) and the workers that failed."""
    rows, failures = [], []
    t_start = time.perf_counter()
    for name, _ in plan:
        for stack in a.stacks:
            for budget, point in long_context_jobs(a, stack):
                tag = f"{stack} {name} " + (f"max context {budget:g} GiB" if budget else "context table")
                left = a.deadline - (time.perf_counter() - t_start) if a.deadline else math.inf
                why = skip_reason(stack, name, left, a.deadline)
                if why:
                    failures.append({"stack": stack, "model": name, "budget_gib": budget, "error": why})
                    print(f"# {tag}: {why}", flush=True)
                    continue
                timeout = min(a.timeout[stack], left)
                cmd = long_context_cmd(a, stack, name, budget, point, timeout)
                env = long_context_env(worker_env(stack), os.environ) if budget else worker_env(stack)
                got, why, stderr, wall = run_worker(cmd, env, timeout, a.log)
                rows += [dict(r, point=point_label(point)) for r in got]
                print(f"# {tag}: {wall:.0f} s, {len(got)} rows", flush=True)
                if why and budget:  # the search's table says the worker was cut, not that T reached the ceiling
                    rows.append({"kind": "probe", "stack": stack, "model": name, "budget_gib": budget, "T": None,
                                 "outcome": "killed", "error": why, "point": point_label(point)})
                if why:
                    failures.append({"stack": stack, "model": name, "budget_gib": budget, "error": why})
                    print(f"# {tag} failed: {why}\n#   stderr tail:\n" +
                          "\n".join("#   " + ln for ln in stderr[-a.tail:].splitlines()), flush=True)
    return rows, failures


def long_context_report(a, rows: list[dict], failures: list[dict], info: dict) -> None:
    """The probe, max-context and context tables, the losses' note and the JSON (every probe)."""
    if a.max_context:
        print_table(*mc.probe_rows(rows, LABEL))
        print_table(*mc.max_context_rows(rows, LABEL))
        print("max T = the longest T (batch 1) whose one training step completed with reserved and device-used "
              "peaks within the budget; stopped by = the shortest T that failed (oom / over the budget) or was not "
              "started (slow: its estimate exceeded the worker's time). One step per probe says nothing about "
              "training: the losses are the probe batch's before > after its update, no train check.")
    if a.context_table:
        print_table(*mc.context_rows(rows, LABEL, a.stacks))
        print("tok/s of one timed step after one warm-up step at each T, batch 1, no GPU cap; GPU GiB = "
              "max_memory_allocated, pinned GiB = pinned host memory held at its peak.")
    info["gpu"] = next((r["gpu"] for r in rows if "gpu" in r), None)
    result = rounded({"bench": "train_long_context", "argv": sys.argv[1:], "versions": info,
                      "budgets_gib": a.max_context, "context_table": a.context_table, "rows": rows,
                      "failures": failures})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f)
    print(json.dumps(result))


# -- tables -------------------------------------------------------------------------------------------------------
def print_table(header: list[str], body: list[list[str]]) -> None:
    """A markdown table, padded so it also reads as plain text."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print("\n" + line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for cells in body:
        print(line(cells))


def cell(row: dict | None, key: str, spec: str) -> str:
    """row[key] formatted, or "OOM" / "-" when the row failed or lacks the value."""
    if row is None or "error" in row:
        return "OOM" if row and row["error"].startswith("OOM") else "-"
    v = row.get(key)
    return "-" if v is None else format(v, spec)


def ratio(a: dict | None, b: dict | None, key: str) -> str:
    ok = a and b and a.get(key) is not None and b.get(key)
    return f"{a[key] / b[key]:.2f}x" if ok else "-"


def find(rows: list[dict], stack: str, model: str, batch: int) -> dict | None:
    """The row of (stack, model, batch); for ours its first point's (rows keep the order of the points)."""
    return next((r for r in rows if (r["stack"], r["model"], r["batch"]) == (stack, model, batch)), None)


def detail_table(rows: list[dict]) -> None:
    head = ["stack", "point", "model", "B x T", "steps", "step s", "tok/s", "GPU GiB", "reserved", "dev used",
            "pinned GiB", "pinned act", "RSS GiB", "RSS +GiB", "loss", "LoRA gnorm", "trains", "note"]
    body = []
    for r in rows:
        note = r.get("error") or r.get("failed") or (r.get("notes") or {}).get("plan") or \
            ("reused" if r.get("reused") else "")
        loss = f"{r['loss_first']:.3f}>{r['loss_after'] or r['loss_last']:.3f}" if "loss_after" in r else "-"
        body.append([LABEL[r["stack"]], r.get("point") or "", r["model"], f"{r['batch']}x{r['seq']}",
                     cell(r, "steps", "d"), cell(r, "step_s", ".3f"), cell(r, "tok_s", ",.0f"),
                     cell(r, "gpu_gib", ".2f"), cell(r, "reserved_gib", ".2f"), cell(r, "device_used_gib", ".2f"),
                     cell(r, "pinned_gib", ".2f"), cell(r, "pinned_active_gib", ".2f"),
                     cell(r, "rss_peak_gib", ".2f"), cell(r, "rss_growth_gib", ".2f"), loss,
                     cell(r, "grad_norm", ".3g"), verdict(r), str(note)[:60]])
    print_table(head, body)
    print("loss = the first timed step's batch before > after the timed steps (the learnable stream: it must fall "
          f"by {MIN_DROP:.0%}); LoRA gnorm = the last step's global LoRA grad norm before clipping; trains = the "
          "train check (_checks.train_failure)")


def verdict(row: dict) -> str:
    """The train check's cell: "ok", "FAILED", or "-" for a row not measured (error) or measured without it
    (a row reused from a JSON written before the check existed)."""
    if "error" in row or "failed" not in row:
        return "-"
    return "FAILED" if row["failed"] else "ok"


def report_failures(rows: list[dict]) -> int:
    """Print one FAILED line per measured row whose train check failed; return how many."""
    bad = [r for r in rows if r.get("failed")]
    for r in bad:
        print(f"FAILED train check: {r['stack']} {r['model']} {r['batch']}x{r['seq']} {r.get('point') or ''}: "
              f"{r['failed']}", flush=True)
    return len(bad)


def comparison_table(rows: list[dict], plan, stacks: list[str], seq: int) -> None:
    """One row per (model, B x T): each stack's tok/s, GPU GiB and pinned host GiB, then ours/HF and ours/Unsloth."""
    head = ["model", "B x T"]
    for s in stacks:
        head += [f"{LABEL[s]} tok/s", f"{LABEL[s]} GPU GiB", f"{LABEL[s]} pinned GiB"]
    vs = [s for s in ("hf", "unsloth") if s in stacks and "ours" in stacks]
    for s in vs:
        head += [f"ours/{LABEL[s]} tok/s", f"ours/{LABEL[s]} GPU"]
    body = []
    for name, batches in plan:
        for b in batches:
            got = {s: find(rows, s, name, b) for s in stacks}
            line = [name, f"{b}x{seq}"]
            for s in stacks:
                line += [cell(got[s], key, spec) for key, spec in (("tok_s", ",.0f"), ("gpu_gib", ".2f"),
                                                                    ("pinned_gib", ".2f"))]
            for s in vs:
                line += [ratio(got["ours"], got[s], "tok_s"), ratio(got["ours"], got[s], "gpu_gib")]
            body.append(line)
    print_table(head, body)
    print("GPU GiB = torch.cuda.max_memory_allocated; pinned GiB = pinned host memory held (torch's pinned "
          "allocator) at its peak, i.e. what offloading moved off the GPU; both over the timed steps.")


def frontier_table(rows: list[dict], plan, seq: int) -> None:
    head = ["model", "B x T", "stack", "point", "tok/s", "GPU GiB", "pinned GiB", "tok/s / HF", "GPU / HF",
            "tok/s / Unsloth", "GPU / Unsloth"]
    body = []
    for name, batches in plan:
        for b in batches:
            hf, un = find(rows, "hf", name, b), find(rows, "unsloth", name, b)
            for r in rows:
                if (r["model"], r["batch"]) == (name, b):
                    body.append([name, f"{b}x{seq}", LABEL[r["stack"]], r.get("point") or "",
                                 cell(r, "tok_s", ",.0f"), cell(r, "gpu_gib", ".2f"), cell(r, "pinned_gib", ".2f"),
                                 ratio(r, hf, "tok_s"), ratio(r, hf, "gpu_gib"), ratio(r, un, "tok_s"),
                                 ratio(r, un, "gpu_gib")])
    print_table(head, body)


def plot_frontier(rows: list[dict], plan, seq: int, png: str) -> str | None:
    """Tokens/s against peak GPU GiB, one panel per (model, B x T): ours' points joined in memory order and
    labelled by policy, each peer's one point; pinned host GiB drawn as a dotted extension to the right. CPU rows
    (--smoke) have no GPU peak and are drawn against peak RSS instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if "tok_s" in r]
    xkey = "gpu_gib" if any("gpu_gib" in r for r in good) else "rss_peak_gib"
    panels = [(n, b) for n, bs in plan for b in bs if any((r["model"], r["batch"]) == (n, b) for r in good)]
    if not panels:
        print("# frontier: no measured point, no plot")
        return None
    cols = min(2, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(7 * cols, 5 * -(-len(panels) // cols)),
                             squeeze=False)
    style = {"ours": ("o-", "C0"), "hf": ("s", "C1"), "unsloth": ("^", "C2"), "liger": ("D", "C3")}
    for ax, (name, b) in zip(axes.flat, panels):
        for stack in STACKS:
            pts = sorted((r for r in good if (r["stack"], r["model"], r["batch"]) == (stack, name, b)),
                         key=lambda r: r[xkey])
            if not pts:
                continue
            marker, color = style[stack]
            ax.plot([r[xkey] for r in pts], [r["tok_s"] for r in pts], marker, color=color, label=LABEL[stack])
            for r in pts:
                text = r.get("point") or LABEL[stack]
                if r.get("pinned_gib", 0) >= 0.01:
                    ax.plot([r[xkey], r[xkey] + r["pinned_gib"]], [r["tok_s"]] * 2, ":", color=color)
                    text += f" (+{r['pinned_gib']:.1f} GiB pinned)"
                ax.annotate(text, (r[xkey], r["tok_s"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_title(f"{name} {b}x{seq}")
        ax.set_xlabel("peak GPU GiB (max_memory_allocated)" if xkey == "gpu_gib" else "peak RSS GiB (CPU smoke)")
        ax.set_ylabel("tokens/s")
        ax.margins(0.15)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"# frontier plot: {png}")
    return png


def rounded(obj):
    """obj with every float cut to 5 significant digits: the JSON line stays short enough to read in a log tail."""
    if isinstance(obj, float):
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


# -- command line -------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None,
                    help=f"models in run order, each NAME or NAME:B,B to override --batches ({', '.join(SHAPES)}); "
                    "default llama-3.2-1b llama-3.1-8b (--smoke: tiny)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=5, help="timed steps per shape at least (median reported)")
    ap.add_argument("--min-seconds", type=float, default=5.0, help="timed seconds per shape at least (more steps)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per shape first (compile, optimizer pages)")
    ap.add_argument("--stacks", nargs="+", default=list(STACKS), choices=STACKS)
    ap.add_argument("--policy", nargs="+", help=f"ours' checkpointing policies (of {OUR_POLICIES}); default full, "
                    "with --frontier all of them")
    ap.add_argument("--budget", nargs="+", type=float, default=[], help="ours' GPU memory budgets in GiB (each "
                    "combined with each --policy) for qlora_core.activation_checkpoint.apply_policy")
    ap.add_argument("--frontier", action="store_true", help="every policy/budget point of ours and each peer's "
                    "point: a frontier table and a tokens/s vs peak GiB plot into --png")
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "train_frontier.png"), help="frontier plot path")
    ap.add_argument("--timeout", nargs="+", default=["300"], help="seconds per (stack, model) subprocess: "
                    "SECONDS for all stacks and/or STACK=SECONDS (e.g. 200 unsloth=360)")
    ap.add_argument("--deadline", type=float, default=0, help="seconds for the whole run: no subprocess starts "
                    "later and each is cut at it, so the tables always print (0: none)")
    ap.add_argument("--tail", type=int, default=2500, help="characters of a failed worker's stderr to print")
    ap.add_argument("--log", help="append every worker's stdout and stderr to this file")
    ap.add_argument("--json", help="also write the final JSON object to this file")
    ap.add_argument("--reuse", metavar="JSON", help="take peer rows (hf, unsloth, liger) of the same model, batch "
                    "and seq from an earlier run's --json file instead of measuring them again (marked reused)")
    ap.add_argument("--packed-docs", type=int, default=0,
                    help="ours: rows of N packed documents with per-document attention (TrainConfig.pack_isolate)")
    ap.add_argument("--profile", nargs=2, metavar=("STACK", "MODEL"),
                    help="profile one step of STACK on MODEL at the first --batches value (in this process)")
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check on a tiny model (seq 64, batches "
                    "1 2, 2 warm-up + 8 timed steps: the loss must fall): no measurement. Model 'tiny' unless "
                    "--models names others (tiny-qwen3 tiny-gemma3)")
    ap.add_argument("--max-context", nargs="+", type=float, metavar="GIB", help="per stack and budget (GiB of "
                    "GPU memory, one worker each): the longest T at batch 1 whose training step fits (doubling from "
                    "--mc-start, then bisection to --mc-step); ours without --policy/--budget plans per T")
    ap.add_argument("--context-table", nargs="*", type=int, metavar="T", help="tok/s per stack at each T, batch 1, "
                    f"one warm-up + one timed step (default {' '.join(map(str, mc.CONTEXT_TABLE))})")
    ap.add_argument("--mc-start", type=int, help="--max-context's first T (default 16384; --smoke 256)")
    ap.add_argument("--mc-step", type=int, help="--max-context's bisection granularity in tokens (default 8192)")
    ap.add_argument("--mc-ceiling", type=int, help="--max-context's largest T (default 262144)")
    ap.add_argument("--offline-wheels", action="store_true", help="print benchmarks/device_setup.sh and exit")
    ap.add_argument("--mc-budget", type=float, help=argparse.SUPPRESS)  # a long-context worker's one budget
    ap.add_argument("--stop-at", type=float, default=math.inf, help=argparse.SUPPRESS)  # epoch s: no probe after
    ap.add_argument("--live-log", help=argparse.SUPPRESS)  # where a long-context worker appends each row
    ap.add_argument("--worker", nargs=2, metavar=("STACK", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--mkckpt", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        a.device, a.batches, a.seq, a.iters, a.warmup, a.min_seconds = "cpu", [1, 2], 64, 8, 2, 0
    a.models = a.models or (["tiny"] if a.smoke else ["llama-3.2-1b", "llama-3.1-8b"])  # an explicit --models wins
    # --smoke: tiny steps on the CPU, the stand-in cap at 1 MiB per token (a budget of 0.625 GiB fits 640)
    small = a.smoke or a.device == "cpu"
    if a.context_table is not None and not a.context_table:
        a.context_table = [128, 256, 512] if small else list(mc.CONTEXT_TABLE)
    a.context_table = a.context_table or []
    a.mc_start = a.mc_start or (256 if small else 16384)
    a.mc_step = a.mc_step or (128 if small else 8192)
    a.mc_ceiling = a.mc_ceiling or (4096 if small else 262144)
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.offline_wheels:
        print(open(os.path.join(ROOT, "benchmarks", "device_setup.sh")).read())
        return
    if a.mkckpt:
        make_checkpoint(*a.mkckpt, a.device)
        return
    if a.worker or a.profile:
        a.policy = a.policy or ["full"]
        os.makedirs(WORKDIR, exist_ok=True)
        os.chdir(WORKDIR)  # Unsloth writes unsloth_compiled_cache/ into the working directory
        stack, name = a.worker or a.profile
        worker(stack, name, a)
        return
    plan = parse_models(a.models, a.batches)
    a.timeout = parse_timeouts(a.timeout)
    a.user_point = bool(a.policy or a.budget)
    a.points = our_points(a.policy, a.budget, a.frontier)
    info = versions()
    print(f"# {info}", flush=True)
    if a.max_context or a.context_table:
        check_long_context(a)
        rows, failures = run_long_context(a, plan)
        long_context_report(a, rows, failures, info)
        return
    rows, failures = run_all(a, plan)
    detail_table(rows)
    comparison_table(rows, plan, a.stacks, a.seq)
    if a.frontier:
        frontier_table(rows, plan, a.seq)
        plot_frontier(rows, plan, a.seq, a.png)
    info["gpu"] = next((r["gpu"] for r in rows if "gpu" in r), None)
    untrained = report_failures(rows)
    result = rounded({"bench": "train_step", "argv": sys.argv[1:], "versions": info, "seq": a.seq,
                      "points": [point_label(p) for p in a.points], "rows": rows, "failures": failures})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f)
    print(json.dumps(result))
    if untrained:
        sys.exit(f"bench_train.py: {untrained} row(s) FAILED the train check (lines 'FAILED train check' above)")


if __name__ == "__main__":
    main()
