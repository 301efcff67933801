"""Tiny model folders for the data/train/CLI tests: a random Llama saved as an HF checkpoint plus a small byte-level
BPE tokenizer.json trained on the test task's text, with a ChatML-style chat template (or none)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(corpus: list[str], vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def swap_task(n: int, seed: int = 0) -> list[dict]:
    """"a b c" -> "c b a" over a few letters: learnable by a tiny model in a few dozen steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = [rng.choice("abcdef") for _ in range(3)]
        out.append({"instruction": "reverse " + " ".join(w), "response": " ".join(reversed(w))})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_model_folder(folder: Path, chat_template: bool = True, hidden: int = 64, layers: int = 2, seed: int = 0,
                      tie: bool = False) -> Path:
    """A random Llama (fp32, GQA 4/2 heads, head_dim 16) with a tokenizer trained on the swap task's text."""
    from safetensors.torch import save_file

    from qlora_core.llama import Llama
    from qlora_core.model_config import LlamaConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [r["instruction"] + "\n" + r["response"] for r in swap_task(200, seed=99)]
    corpus += ["### Instruction:\n### Response:\nuser assistant system\n"] * 5
    tok = make_tokenizer(corpus)
    tok.save(str(folder / "tokenizer.json"))
    tcfg = {"eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>"}
    if chat_template:
        tcfg["chat_template"] = CHATML
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                      tie_word_embeddings=tie, eos_token_id=tok.token_to_id("<|im_end|>"),
                      bos_token_id=tok.token_to_id("<|im_start|>"), pad_token_id=tok.token_to_id("<|endoftext|>"),
                      max_position_embeddings=512)
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if tie:
        sd.pop("lm_head.weight")
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf_config()
    hf["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    return folder


def write_tiny_hf_llama(dest: Path, weight_std: float | None = None) -> str:
    """transformers' own tiny random LlamaForCausalLM (vocab 96, hidden 64, 2 layers, GQA 4/2 heads, untied) saved
    as an HF folder; weight_std re-draws every matrix from N(0, std) (0.1 gives logits of a few units). Returns the
    folder as a string (what transformers records as name_or_path)."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    if weight_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, weight_std)
    model.save_pretrained(str(dest))
    return str(dest)


def nf4_lora_llama(layers: int = 2, model_type: str = "llama"):
    """A tiny random Llama (hidden 64, 4/2 heads, q/k/v biases) with NF4 linears and LoRA r=4/alpha=8 on every
    projection, B drawn N(0, 0.1) so the adapters matter (a fresh B is zero); in train mode, on the CPU, fp32.
    model_type "qwen3" adds the per-head q/k norms (weights ones, as built)."""
    from qlora_core.llama import Llama
    from qlora_core.model_config import LlamaConfig
    from qlora_core.qlinear import quantize_model
    from qlora_core.lora import apply_lora
    from tests.helpers import nonzero_lora_b
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True, model_type=model_type)
    torch.manual_seed(0)
    model = quantize_model(Llama(cfg))
    apply_lora(model, r=4, alpha=8)
    nonzero_lora_b(model, 0.1)
    return model.train()
