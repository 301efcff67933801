"""The `qlora` command (also `python -m qlora_core`).

    qlora train    --model PATH|ID --data FILE.jsonl --output DIR [--max-steps N] [--lora-r R] ... [--resume]
                   [--nproc N [--parallel fsdp|ddp]]         # N processes (GPUs) through torchrun
    qlora generate --model PATH [--adapter DIR] --prompt TEXT
    qlora merge    --model PATH --adapter DIR --output DIR [--base quantized|dense]  # dense HF checkpoint
    qlora quantize --model PATH --output DIR [--quant nf4|fp4]  # bnb-4bit checkpoint (transformers + bitsandbytes)
    qlora demo     [--output DIR]                                # the main job: qlora_core/finetune_demo.py

`train` flags are generated from TrainConfig's fields, 1:1 (field max_steps -> --max-steps; the fields of its
LoraConfig as --lora-r, --lora-alpha, --lora-dropout, --target-modules, ...), with the field's metadata["help"]
(defaults.setting) as help text and its default, so the dataclasses are the single source of truth.

The training loop is imported only by `qlora train` and `qlora demo`: it brings the optimizer, whose import of
torch._dynamo takes ~1.2 s that `qlora --help` and the other commands do not need.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from . import distributed
from .adapter import load_adapter, read_adapter
from .data import TextTokenizer
from .defaults import DOUBLE_QUANT, DTYPE_NAMES, QUANT_TYPE
from .errors import NonFiniteError, QloraError, exit_code, one_line
from .export import MERGE_BASES, check_export_target, merge_adapter, save_quantized
from .formats import QUANT_TYPES
from .generation import generate
from .loading import load_llama, resolve_folder
from .lora import LORA_DTYPES, LoraConfig, lora_modules
from .train_config import TrainConfig, preflight


def _field_help(cls=TrainConfig) -> dict[str, str]:
    """field name -> its metadata["help"] (defaults.setting), "%" escaped for argparse; TrainConfig by default."""
    return {f.name: f.metadata["help"].replace("%", "%%") for f in dataclasses.fields(cls)}


def parse_targets(text: str | Sequence[str]) -> tuple[str, ...] | str:
    """--target-modules as given: "all-linear" as is, else a tuple of the comma-separated names ("q_proj, v_proj"
    or ["q_proj,v_proj", "gate_proj"])."""
    parts = [text] if isinstance(text, str) else list(text)
    names = tuple(n.strip() for part in parts for n in part.split(",") if n.strip())
    return "all-linear" if names == ("all-linear",) else names


def lora_flag(name: str) -> str:
    """The flag of LoraConfig field `name`: --lora-r, --lora-alpha, --lora-dropout, --lora-use-rslora, ...
    (a PEFT-style lora_ prefix is not doubled); target_modules is --target-modules."""
    if name == "target_modules":
        return "--target-modules"
    return "--lora-" + name.removeprefix("lora_").replace("_", "-")


def _add_lora_args(ap: argparse.ArgumentParser) -> None:
    default, helps = LoraConfig(), _field_help(LoraConfig)
    for f in dataclasses.fields(LoraConfig):
        flag, dest, value = lora_flag(f.name), "lora." + f.name, getattr(default, f.name)
        if f.name == "target_modules":
            value = value if isinstance(value, str) else ",".join(value)
            ap.add_argument(flag, "--lora-target-modules", dest=dest, nargs="+", default=[value], metavar="NAMES",
                            help=f"LoRA target modules: names (space or comma separated) or all-linear "
                                 f"(default {value})")
            continue
        if f.name == "dtype":
            value = str(value).removeprefix("torch.")
        h = f"LoRA {helps[f.name]} (default {value})"
        if f.type in ("bool", bool):
            ap.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=value, help=h)
        elif f.name == "dtype":
            names = [str(d).removeprefix("torch.") for d in LORA_DTYPES]
            ap.add_argument(flag, dest=dest, choices=names, default=value, help=h)
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            ap.add_argument(flag, dest=dest, type=typ, default=value, metavar=f.name.removeprefix("lora_").upper(),
                            help=h)


def add_train_args(ap: argparse.ArgumentParser) -> None:
    """Add one flag per TrainConfig field to `ap` (max_steps -> --max-steps), help from the field's
    metadata["help"] plus its default, and one per field of its LoraConfig `lora` (lora_flag: --lora-r,
    --lora-alpha, --lora-dropout, --target-modules, --lora-use-rslora, --lora-dtype).

    bool fields become --x / --no-x; --target-modules takes one or more values (joined with commas); --quant and
    --parallel are limited to their choices; int and float fields are typed, the rest are strings. --model,
    --data and --output are required. Also --nproc (not a TrainConfig field): launch N processes via torchrun.
    """
    helps = _field_help()
    required = {"model", "data", "output"}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "lora":
            _add_lora_args(ap)
            continue
        flag = "--" + f.name.replace("_", "-")
        h = helps[f.name] + ("" if f.name in required else f" (default {f.default})")
        if f.type in ("bool", bool):
            ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=h)
        elif f.name in ("quant", "parallel"):
            choices = [*QUANT_TYPES, "none"] if f.name == "quant" else list(distributed.PARALLEL_MODES)
            ap.add_argument(flag, dest=f.name, choices=choices, default=f.default, help=h)
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            ap.add_argument(flag, dest=f.name, type=typ, default=f.default, required=f.name in required, help=h)
    ap.add_argument("--nproc", type=int, default=1,
                    help="processes (one per GPU) to train with, launched through torchrun; 1 = this process")


def config_from_args(args) -> "TrainConfig":
    """The TrainConfig that `qlora train`'s parsed flags describe."""
    lora = {f.name: getattr(args, "lora." + f.name) for f in dataclasses.fields(LoraConfig)}
    lora["target_modules"] = parse_targets(lora["target_modules"])
    lora["dtype"] = getattr(torch, lora["dtype"])
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "lora"}
    return TrainConfig(**kw, lora=LoraConfig(**lora))


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_train(args) -> int:
    """`qlora train`: build a TrainConfig from the parsed flags and run train(); returns the exit code.

    0 when the run reached its last step (adapter and metrics.jsonl in --output), 5 when it stopped early on
    non-finite losses (the reason goes to stderr). Setting, loading and data errors propagate (main() prints
    them). With --nproc N > 1 (outside torchrun) the settings are checked (train_config.preflight) here, then the
    same command runs in N processes through torchrun and its exit code is returned.
    """
    from .train_loop import train  # deferred: ~1.2 s of imports (see the module docstring)
    cfg = config_from_args(args)
    if args.nproc > 1 and not distributed.launched():
        preflight(cfg)  # a user error is one line and its exit code here, not N ranks' errors under torchrun
        return distributed.launch(args.nproc, _without_nproc(args.argv))
    if distributed.launched():  # torchrun's summary then shows this rank's traceback if it fails
        result = distributed.record(train)(cfg)
    else:
        result = train(cfg)
    main = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank 0, or a lone process
    if result.stopped:  # only a run of non-finite steps stops early
        if main:
            print(f"error: {result.stopped}", file=sys.stderr)
        return NonFiniteError.exit_code
    if main:
        print(f"adapter written to {args.output} (adapter_config.json, adapter_model.safetensors, metrics.jsonl)")
    return 0


def _load(model: str, quant: str, dtype: str, device: str | None):
    distributed.check_device(device)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = None if dtype == "auto" else DTYPE_NAMES[dtype]  # None: load_llama's default for the device
    return load_llama(model, quantize=None if quant == "none" else quant, dtype=dt, device=dev)


class TokenPrinter:
    """Prints the text of a growing token list as chunks arrive (`qlora generate`'s stream callback).

    Each call decodes all tokens so far and prints what is new: byte-level tokenizers may split one character over
    several tokens, so text that ends in an incomplete character (U+FFFD) is held back until the next chunk.
    Special tokens (eos, the finished rows' padding) are skipped, as in a decode of the whole reply.
    """

    def __init__(self, tok, out=None):
        self.tok, self.out = tok, out
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, tokens: torch.Tensor) -> None:
        """tokens (1, m): the next m generated ids of the single row."""
        self.ids += tokens[0].tolist()
        self._show(self.tok.decode(self.ids), final=False)

    def finish(self) -> None:
        """Print what was held back, then a newline."""
        self._show(self.tok.decode(self.ids), final=True)
        print(file=self.out or sys.stdout, flush=True)

    def _show(self, text: str, final: bool) -> None:
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.shown):  # else an earlier piece decoded differently in context: print the rest
            print(text[len(self.shown):], end="", file=self.out or sys.stdout, flush=True)
        self.shown = text


def cmd_generate(args) -> int:
    """`qlora generate`: load the model (plus --adapter, base not checked), stream the reply to --prompt; returns 0.

    The prompt goes through the chat template with --system, or with --raw is tokenized as is (--system ignored).
    Greedy at --temperature 0, else top-k / top-p sampling seeded by --seed; stops at eos or --max-new-tokens.
    Only the new tokens are printed, special tokens skipped, as they come (every --sync-every tokens).
    """
    folder = resolve_folder(args.model)
    if args.adapter:
        read_adapter(args.adapter)  # a damaged or non-finite adapter fails before the model loads
    model = _load(args.model, args.quant, args.dtype, args.device)
    if args.adapter:
        load_adapter(model, args.adapter, check_base=False)
    model.eval()
    tok = TextTokenizer.from_folder(folder, use_chat_template=not args.raw)
    if args.raw:
        ids = tok.encode(args.prompt)
    else:
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tok.prompt_ids(msgs + [{"role": "user", "content": args.prompt}])
    x = torch.tensor([ids], device=model.lm_head.weight.device)
    g = torch.Generator(device=x.device).manual_seed(args.seed)
    printer = TokenPrinter(tok)
    generate(model, x, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
             eos_token_id=tok.eos_token_id, generator=g, stream=printer, sync_every=args.sync_every)
    printer.finish()
    return 0


def cmd_merge(args) -> int:
    """`qlora merge`: fold --adapter into the base and write an HF checkpoint to --output; returns 0.

    export.merge_adapter: --base quantized (default) re-creates the 4-bit base the adapter was trained on (the
    format the adapter records, else nf4/64/double quant) and folds the adapter onto its dequantized weights;
    --base dense folds it onto the original weights. Output checks as in merge_adapter, before anything loads.
    """
    merge_adapter(args.model, args.adapter, args.output, base=args.base, dtype=DTYPE_NAMES[args.dtype])
    n = len(read_adapter(args.adapter)[1]) // 2
    print(f"merged {n} LoRA layers into {args.output} ({args.dtype}, onto the {args.base} base)")
    return 0


def cmd_quantize(args) -> int:
    """`qlora quantize`: write a bitsandbytes 4-bit checkpoint of --model to --output; returns 0.

    Decoder linears are quantized to --quant (optionally double quant) on --device (default cuda if available);
    embeddings, norms and lm_head stay dense in --dtype. model.safetensors (Linear4bit keys) and config.json (with a
    quantization_config transformers reads) and the tokenizer files are written as one folder; --output is checked
    as for merge. Prints the size in MiB.
    """
    distributed.check_device(args.device)
    check_export_target(args.output, [resolve_folder(args.model)])
    model = load_llama(args.model, quantize=args.quant, double_quant=args.double_quant, dtype=DTYPE_NAMES[args.dtype],
                       device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    save_quantized(model, args.output)
    size = (Path(args.output) / "model.safetensors").stat().st_size
    print(f"wrote a bnb-4bit ({args.quant}{' + double quant' if args.double_quant else ''}) checkpoint to "
          f"{args.output} ({size / 2**20:.1f} MiB)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the command's one-line form: `error: qlora train: <message> (see ... --help)`,
    exit 2 (argparse's own code, also UsageError's); subcommand parsers inherit the class."""

    def error(self, message):
        """Print the one error line and exit 2."""
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


class _Defaults(argparse.HelpFormatter):
    """Help text with "(default: X)" appended to each option that has a default and does not state it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not (action.default is None or action.default is False or action.default == argparse.SUPPRESS
                or "default" in text):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The `qlora` parser: subcommands train, generate, merge, quantize and demo, each setting `fn` to its handler.

    `demo` is a placeholder (fn=None, no --help of its own): main() forwards its arguments before parsing.
    """
    ap = _Parser(prog="qlora", description="QLoRA fine-tuning from scratch (qlora_core)",
                 epilog="exit codes: 0 ok, 1 bug, 2 usage, 3 data, 4 file, 5 non-finite (docs/errors.md)")
    ap.add_argument("--debug", action="store_true",
                    help="show the traceback of an error (also QLORA_DEBUG=1); accepted anywhere on the line")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a LoRA adapter on a quantized model")
    add_train_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("generate", help="generate a reply (optionally with an adapter)", formatter_class=_Defaults)
    p.add_argument("--model", required=True, help="HF model folder or hub repo id")
    p.add_argument("--adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--prompt", required=True, help="user message (or raw text with --raw)")
    p.add_argument("--system", help="system message")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text as is")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens only (0 = all)")
    p.add_argument("--sync-every", type=int, default=16, help="print (and check for eos) every N tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--quant", choices=[*QUANT_TYPES, "none"], default=QUANT_TYPE, help="base weights (as in training)")
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("merge", help="fold an adapter into its base; write a dense HF checkpoint", formatter_class=_Defaults)
    p.add_argument("--model", required=True, help="HF model folder or hub repo id (the dense base)")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--output", required=True, help="output directory (new or empty)")
    p.add_argument("--base", choices=list(MERGE_BASES), default="quantized",
                   help="quantized (default): merge onto the dequantized 4-bit base the adapter was trained on "
                        "(quant type, blocksize, double quant and dtype as the adapter records them; an adapter "
                        "without that record: nf4, blocksize 64, double quant), so the merged model computes what "
                        "the trained one did; dense: onto the original weights, which the adapter never saw "
                        "(the result differs from the trained model by the 4-bit quantization error)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default="bfloat16",
                   help="dtype of the merged weights")
    p.set_defaults(fn=cmd_merge)

    p = sub.add_parser("quantize", help="write a bitsandbytes-format 4-bit checkpoint", formatter_class=_Defaults)
    p.add_argument("--model", required=True, help="HF model folder or hub repo id")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--quant", choices=list(QUANT_TYPES), default=QUANT_TYPE, help="4-bit data type")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=DOUBLE_QUANT,
                   help="quantize the absmax too (bnb_4bit_use_double_quant)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default="bfloat16",
                   help="dtype of embeddings/norms/lm_head and of the dequantized weights (bnb_4bit_compute_dtype)")
    p.add_argument("--device", help="where to quantize (default: cuda if available)")
    p.set_defaults(fn=cmd_quantize)

    p = sub.add_parser("demo", help="the main job: fine-tune SmolLM2-135M on dates (see finetune_demo.py)",
                       add_help=False)
    p.set_defaults(fn=None)
    return ap


# The caching allocator's settings: torch >= 2.9 reads PYTORCH_ALLOC_CONF (PYTORCH_CUDA_ALLOC_CONF, the older
# name, still wins when set); older torch only the CUDA one
ALLOC_ENVS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
EXPANDABLE = "expandable_segments:True"


def set_allocator_env(environ=os.environ) -> str | None:
    """Ask the CUDA caching allocator for expandable segments unless the user set either of ALLOC_ENVS; returns
    the variable it set (None: left alone).

    Why: at long context the block recompute's tensors change size every block and the allocator's fixed
    segments fragment: an 8B at batch 1 under "offload" measured 0.21 MiB/token allocated but 0.35 MiB/token
    reserved on an H100 (Unsloth sets the same). The allocator reads the variable once, when CUDA initialises, so
    this must run before any CUDA call; importing torch does not initialise CUDA."""
    if any(environ.get(n) for n in ALLOC_ENVS):
        return None
    name = ALLOC_ENVS[0] if torch.torch_version.TorchVersion(torch.__version__) >= "2.9" else ALLOC_ENVS[1]
    environ[name] = EXPANDABLE
    return name


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("QLORA_DEBUG", "").lower() in ("1", "true", "yes")


def main(argv=None) -> int:
    """Run the subcommand in argv (default sys.argv[1:]) and return its exit code.

    `demo ...` goes untouched to finetune_demo.main (then 0); a bad flag exits with status 2 (one error line). A
    QloraError (or an OSError: a file that cannot be read or written) prints one `error: <message>` line to stderr
    and returns its category's code (errors.EXIT_CODES); any other exception is a bug and keeps its traceback.
    `--debug` anywhere in argv, or QLORA_DEBUG=1, re-raises every error with its traceback. The CUDA allocator
    gets expandable segments unless the user configured it (set_allocator_env).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    before = os.environ.get("QLORA_DEBUG")
    if debug:
        os.environ["QLORA_DEBUG"] = "1"  # torchrun's worker processes (train --nproc) inherit it
    alloc = set_allocator_env()  # before any command touches CUDA; torchrun's workers inherit it too
    try:
        if argv[:1] == ["demo"]:
            from .finetune_demo import main as demo  # deferred: it imports the training loop (see above)
            demo(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args.fn(args)
    except (QloraError, OSError) as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return exit_code(e)
    finally:  # an in-process caller's environment is left as it was (CUDA, if it started, keeps the setting)
        if alloc:
            os.environ.pop(alloc, None)
        if before is None:
            os.environ.pop("QLORA_DEBUG", None)
        else:
            os.environ["QLORA_DEBUG"] = before


if __name__ == "__main__":
    sys.exit(main())
