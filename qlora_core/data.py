"""Instruction data for the training loop: JSONL -> chat-formatted token ids with response-only labels, packed rows.

Pipeline (each step a function, so tests and the CLI can call any of them):
  read_jsonl(path)            -> list of records: a Conversation (messages, with tools) or a TextRow (raw text).
                                 A line holds {"messages": [...]} (tool turns included), {"instruction",
                                 "response"} (optional "input", "system"; "output" for "response"), {"prompt",
                                 "completion"} (two strings, or two message lists) or {"text"} (docs/data.md).
                                 A malformed line raises DataFormatError naming the file and line number.
  TextTokenizer.from_folder   -> the checkpoint's tokenizer.json through the `tokenizers` library (never
                                 transformers), its special tokens, and its chat template.
  encode_record(tok, rec)     -> Sample(input_ids, labels). A conversation (encode_conversation): labels are
                                 -100 everywhere except the tokens of the assistant turns (their content and the
                                 end-of-turn token; for prompt/completion messages, the completion's turns only).
                                 A TextRow (encode_text): no template, the completion's tokens and an eos labelled
                                 ({"text"} rows: every token).
  pack(samples, seq_len)      -> rows of up to seq_len tokens, short samples concatenated greedily in order.
  collate(rows, pad_id)       -> (input_ids, labels) tensors padded on the right to the longest row of the batch.
  collate_positions(rows)     -> (position_ids, document_ids) of the same rows, for per-sample attention.

Chat template: the Jinja template from tokenizer_config.json ("chat_template", a string or a list of named
templates) or chat_template.jinja (transformers 5 writes it there), rendered with jinja2 in a sandbox as
transformers' apply_chat_template does. Without a template, or without jinja2, a plain template is used:
"### Instruction:\\n...\\n\\n### Response:\\n<response><eos>".

Which tokens are the response is decided on characters, not by tokenizing pieces separately: the whole
conversation is rendered once, the character span of each assistant turn is found by rendering the
conversation up to that turn with and without it, and a token is a label when its character offset falls in a
span. So the ids are exactly those of tokenizing the full text (what the model sees at inference).

Packing note: a packed row carries position ids that restart at 0 for each sample; `collate_positions` turns
them into (position_ids, document_ids), and the training loop (TrainConfig.pack_isolate, on by default) passes
both to the model so each sample attends only to itself with its own RoPE positions, exactly as if it were
alone in the batch. With pack_isolate off, samples in one row attend to the samples before them (plain causal
attention, as TRL's packing without position ids), which keeps flash attention on the GPU. No label crosses a
sample boundary either way: each sample starts with prompt tokens whose labels are -100. Right padding needs no
attention mask: a causal model's real tokens never look at the padding after them.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from .errors import DataError, FileLoadError

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding); PyTorch's cross_entropy default
ROLES = ("system", "user", "assistant", "tool")
TOOL_KEYS = ("tool_calls", "name", "tool_call_id")  # message keys chat templates read for tool use, kept as given
PLAIN_TEMPLATE = "plain"


class DataFormatError(DataError, ValueError):
    """A JSONL line is not valid JSON or not one of the accepted record shapes (message names file:line)."""


class DataFileError(DataError, FileNotFoundError):
    """A data path that is not a readable file."""


class TokenizerFileError(FileLoadError, OSError):
    """The model folder has no usable tokenizer.json."""


class ChatTemplateError(DataError, ValueError):
    """The chat template cannot be rendered, or its output is not prefix-stable (turn spans cannot be found)."""


# -- records -----------------------------------------------------------------------------------------------------
class Conversation(list):
    """A record's messages ([{"role", "content", ...}], a plain list to everything that iterates it) plus what the
    record adds: `tools`, the function schemas handed to the chat template (None without), and `first_labelled`,
    the index of the first message whose assistant turns carry loss (0; len(prompt) for prompt/completion)."""

    def __init__(self, messages=(), tools: list | None = None, first_labelled: int = 0):
        super().__init__(messages)
        self.tools, self.first_labelled = tools, first_labelled


@dataclasses.dataclass
class TextRow:
    """A plain language-model record, tokenized as written (no chat template): `prompt` carries no loss, every
    token of `completion` does, and an eos token is appended (labelled) so the model learns where text ends.
    {"text": ...} rows have an empty prompt, so every token is labelled."""
    prompt: str  # context only ("" for {"text"} rows)
    completion: str  # the text to learn


# -- reading -----------------------------------------------------------------------------------------------------
def _messages(msgs, where: str, field: str) -> list[dict]:
    """A validated copy of a message list: role in ROLES, string content (None allowed beside an assistant's
    tool_calls), the TOOL_KEYS kept for the chat template."""
    if not isinstance(msgs, list) or not msgs:
        raise DataFormatError(f"{where}: {field!r} must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataFormatError(f"{where}: {field}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataFormatError(f"{where}: {field}[{i}] has role {m['role']!r}; expected one of {ROLES}")
        calls = m.get("tool_calls")
        if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list)
                                  or not all(isinstance(c, dict) for c in calls)):
            raise DataFormatError(f"{where}: {field}[{i}]: 'tool_calls' must be a list of objects, on an assistant "
                                  f"message")
        if not isinstance(m.get("content"), str) and not (m.get("content") is None and calls):
            raise DataFormatError(f"{where}: {field}[{i}] must be an object with string 'role' and 'content' "
                                  f"(content may be null only beside tool_calls)")
        out.append({"role": m["role"], "content": m.get("content"), **{k: m[k] for k in TOOL_KEYS if k in m}})
    return out


def _kind(v) -> str:
    """A JSON value's type as error messages name it: null, a string, a number, a list, an object, a boolean."""
    names = {"NoneType": "null", "str": "a string", "list": "a list", "dict": "an object", "bool": "a boolean",
             "int": "a number", "float": "a number"}
    return names.get(type(v).__name__, type(v).__name__)


def _tools(rec: dict, where: str) -> list | None:
    tools = rec.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise DataFormatError(f"{where}: 'tools' must be a list of objects (function schemas)")
    return tools


def _prompt_completion(rec: dict, where: str) -> Conversation | TextRow:
    """{"prompt", "completion"}: two strings -> TextRow; two message lists -> Conversation labelled from the
    completion on (TRL's prompt-completion formats)."""
    p, c = rec.get("prompt"), rec.get("completion")
    for key in ("prompt", "completion"):
        if key not in rec:
            raise DataFormatError(f"{where}: {key!r} is missing (a 'prompt' needs a 'completion' and vice versa)")
    if isinstance(p, str) and isinstance(c, str):
        if not c:
            raise DataFormatError(f"{where}: 'completion' is empty, so nothing to learn")
        return TextRow(p, c)
    if isinstance(p, list) and isinstance(c, list):
        prompt, completion = _messages(p, where, "prompt"), _messages(c, where, "completion")
        if not any(m["role"] == "assistant" for m in completion):
            raise DataFormatError(f"{where}: 'completion' has no assistant turn, so nothing to learn")
        return Conversation(prompt + completion, tools=_tools(rec, where), first_labelled=len(prompt))
    raise DataFormatError(f"{where}: 'prompt' and 'completion' must be two strings or two message lists, got "
                          f"{_kind(p)} and {_kind(c)}")


def record_to_messages(rec, where: str) -> Conversation | TextRow:
    """One parsed JSONL record -> a Conversation ([{"role", "content"}, ...] with tools) or a TextRow (prompt /
    completion strings, text rows); DataFormatError(where: ...) when malformed."""
    if not isinstance(rec, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {_kind(rec)}")
    if "messages" in rec:
        out = Conversation(_messages(rec["messages"], where, "messages"), tools=_tools(rec, where))
        if not any(m["role"] == "assistant" for m in out):
            raise DataFormatError(f"{where}: 'messages' has no assistant turn, so nothing to learn")
        return out
    if "prompt" in rec or "completion" in rec:
        return _prompt_completion(rec, where)
    if "output" in rec and "response" not in rec and "instruction" in rec:  # Alpaca's spelling
        rec = {**rec, "response": rec["output"]}
    if "instruction" in rec or "response" in rec:
        for key in ("instruction", "response"):
            if key not in rec:
                raise DataFormatError(f"{where}: {key!r} is missing (an 'instruction' needs a 'response' and "
                                      f"vice versa)")
            if not isinstance(rec.get(key), str):
                raise DataFormatError(f"{where}: {key!r} must be a string, got {_kind(rec[key])}")
        for key in ("input", "system"):
            if key in rec and not isinstance(rec[key], str):
                raise DataFormatError(f"{where}: {key!r} must be a string, got {_kind(rec[key])}")
        user = rec["instruction"] + (("\n\n" + rec["input"]) if rec.get("input") else "")
        msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
        return Conversation(msgs + [{"role": "user", "content": user},
                                    {"role": "assistant", "content": rec["response"]}])
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            got = "an empty string" if rec["text"] == "" else _kind(rec["text"])
            raise DataFormatError(f"{where}: 'text' must be a non-empty string, got {got}")
        return TextRow("", rec["text"])
    raise DataFormatError(f"{where}: expected keys 'messages', 'instruction' + 'response', 'prompt' + 'completion' "
                          f"or 'text' (docs/data.md); got {sorted(rec)}")


def read_jsonl(path: str | os.PathLike) -> list[Conversation | TextRow]:
    """All records of a JSONL file (record_to_messages; blank lines skipped); DataFormatError names file and line
    number (also for bytes that are not UTF-8; a UTF-8 byte order mark is skipped). DataFileError when the path
    is not a readable file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataFileError(f"data file {path!r} not found" + (" (it is a folder)" if os.path.isdir(path) else ""))
    convs = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataFileError(f"data file {path!r} cannot be read: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{where}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at column "
                                      f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            except (ValueError, RecursionError) as e:  # an int of > 4300 digits; nesting deeper than the stack
                raise DataFormatError(f"{where}: invalid JSON ({type(e).__name__}: {e})") from None
            convs.append(record_to_messages(rec, where))
    if not convs:
        raise DataFormatError(f"{path}: no records")
    return convs


# -- tokenizer and template --------------------------------------------------------------------------------------
def _token_text(v) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _load_template(folder: Path, cfg: dict) -> str | None:
    t = cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if isinstance(t, str) and t:
        return t
    f = folder / "chat_template.jinja"
    return f.read_text(encoding="utf-8") if f.exists() else None


class TextTokenizer:
    """tokenizer.json (the `tokenizers` library) + special tokens + chat template of one model folder."""

    def __init__(self, tokenizer, eos_token: str | None, bos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, eos_token_id: int | None = None):
        self.tok = tokenizer
        self.eos_token, self.bos_token = eos_token, bos_token
        eid = tokenizer.token_to_id(eos_token) if eos_token else None
        self.eos_token_id = eid if eid is not None else eos_token_id
        pid = tokenizer.token_to_id(pad_token) if pad_token else None
        self.pad_token_id = pid if pid is not None else (self.eos_token_id if self.eos_token_id is not None else 0)
        self.chat_template = chat_template
        self._compiled = None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, use_chat_template: bool = True) -> "TextTokenizer":
        """Read folder/tokenizer.json with the `tokenizers` library, plus tokenizer_config.json,
        special_tokens_map.json and config.json when present.

        Special tokens come from tokenizer_config.json, then special_tokens_map.json; the eos falls back to
        config.json's eos_token_id (the first of a list). use_chat_template=False ignores the checkpoint's template
        (the plain template is used). Raises TokenizerFileError when tokenizer.json is missing or unreadable.
        """
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerFileError(f"{folder} has no tokenizer.json (the `tokenizers` library format is required)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception subclass
            raise TokenizerFileError(f"{path} is not a readable tokenizer.json: {e}") from None
        cfg = {}
        if (folder / "tokenizer_config.json").is_file():
            cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        special = {}
        if (folder / "special_tokens_map.json").is_file():
            special = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
        pick = lambda k: _token_text(cfg.get(k)) or _token_text(special.get(k))  # noqa: E731
        eos_id = None
        if (folder / "config.json").is_file():  # fallback when tokenizer_config names no eos token
            e = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("eos_token_id")
            eos_id = e[0] if isinstance(e, list) and e else e if isinstance(e, int) else None
        eos = pick("eos_token") or (tok.id_to_token(eos_id) if eos_id is not None else None)
        template = _load_template(folder, cfg) if use_chat_template else None
        return cls(tok, eos, pick("bos_token"), pick("pad_token"), template, eos_id)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def template_name(self) -> str:
        """Which template render() uses: "chat_template" (the checkpoint's) or "plain" (none, or no jinja2)."""
        return "chat_template" if self._jinja() is not None else PLAIN_TEMPLATE

    def _jinja(self):
        """The compiled chat template, or None (no template, or jinja2 not installed: plain template)."""
        if self.chat_template is None:
            return None
        if self._compiled is None:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                self.chat_template = None
                return None

            def raise_exception(msg):
                raise ChatTemplateError(f"chat template raised: {msg}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)  # Llama 3.1+ templates
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            self._compiled = env.from_string(self.chat_template)
        return self._compiled

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
        """The conversation as text, with the chat template (or the plain one); tools: function schemas the template
        renders (transformers' apply_chat_template(tools=...)), None without."""
        t = self._jinja()
        if t is not None:
            try:
                # what transformers' apply_chat_template passes: messages without None-valued keys (templates
                # test a missing key, e.g. an assistant's content beside tool_calls), tools/documents or None
                messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
                return t.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                documents=None, bos_token=self.bos_token or "", eos_token=self.eos_token or "")
            except ChatTemplateError:
                raise
            except Exception as e:  # noqa: BLE001 - jinja raises many types
                raise ChatTemplateError(f"cannot render the chat template: {type(e).__name__}: {e}") from None
        return _render_plain(messages, add_generation_prompt, self.eos_token or "", tools)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as written (add_special_tokens=False: no BOS/EOS added)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str,
                            add_special_tokens: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, [(start, end) character offsets into `text`, one per id]); with add_special_tokens the
        tokenizer.json post-processor adds its tokens (a Llama 3 BOS, ...) as transformers' tokenizer(text) does,
        at zero-width offsets."""
        e = self.tok.encode(text, add_special_tokens=add_special_tokens)
        return e.ids, e.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (eos, chat markers) are dropped unless skip_special_tokens=False."""
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of `messages` followed by the assistant header (what generate() continues)."""
        return self.encode(self.render(messages, add_generation_prompt=True))


def _render_plain(messages: Sequence[dict], add_generation_prompt: bool, eos: str, tools: list | None = None) -> str:
    parts = [f"### Tools:\n{json.dumps(tools, ensure_ascii=False)}\n\n"] if tools else []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"] + "\n\n")
        elif m["role"] == "user":
            parts.append(f"### Instruction:\n{m['content']}\n\n")
        elif m["role"] == "tool":
            parts.append(f"### Tool:\n{m['content']}\n\n")
        else:
            calls = json.dumps(m["tool_calls"], ensure_ascii=False) if m.get("tool_calls") else ""
            parts.append(f"### Response:\n{m['content'] or ''}{calls}{eos}\n\n")
    if add_generation_prompt:
        parts.append("### Response:\n")
    return "".join(parts)


# -- samples -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Sample:
    """One tokenized conversation or packed row: input_ids and labels of equal length.

    labels are the ids themselves where a token carries loss, IGNORE_INDEX elsewhere; the next-token shift happens
    in the loss (train_loop.batch_loss), not here.
    """
    input_ids: list[int]  # token ids of the whole rendered conversation
    labels: list[int]  # same length; IGNORE_INDEX outside assistant turns
    position_ids: list[int] | None = None  # packed rows: positions restart at 0 for each sample; None = 0..len-1

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_labels(self) -> int:
        """Number of positions whose label is not IGNORE_INDEX."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def assistant_spans(tok: TextTokenizer, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end) character span of each assistant turn]).

    A turn's span runs from the end of the prompt that precedes it (rendered with the generation prompt) to the end
    of its own end-of-turn token (the eos string) when the template writes one, else to the end of the turn.
    A Conversation's tools go to every render; its assistant turns before first_labelled get no span.
    """
    tools = getattr(messages, "tools", None)
    first = getattr(messages, "first_labelled", 0)
    full = tok.render(messages, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        before = tok.render(messages[:i], add_generation_prompt=True, tools=tools)
        upto = tok.render(messages[: i + 1], tools=tools)
        if not upto.startswith(before) or not full.startswith(upto):
            raise ChatTemplateError("the chat template does not render conversations prefix-stably, so the "
                                    "assistant turns cannot be located in the text")
        start, end = len(before), len(upto)
        eos = tok.eos_token
        if eos:
            k = upto.find(eos, start + len(m["content"] or ""))
            if k != -1:
                end = k + len(eos)
        spans.append((start, end))
    return full, spans


def encode_conversation(tok: TextTokenizer, messages: Sequence[dict]) -> Sample:
    """Render `messages` once, tokenize the whole text, and label the assistant turns: a Sample, not truncated.

    labels[i] = ids[i] when token i's character span lies inside an assistant span (assistant_spans: the content and
    its end-of-turn token), else IGNORE_INDEX (zero-width tokens too). Raises ChatTemplateError when the template
    cannot be rendered or is not prefix-stable.
    """
    full, spans = assistant_spans(tok, messages)
    ids, offsets = tok.encode_with_offsets(full)
    labels = []
    for t, (a, b) in zip(ids, offsets):
        inside = any(s <= a and b <= e and b > a for s, e in spans)
        labels.append(t if inside else IGNORE_INDEX)
    return Sample(ids, labels)


def encode_text(tok: TextTokenizer, row: TextRow) -> Sample:
    """A TextRow as a Sample: prompt + completion tokenized as one text with the tokenizer's own special tokens
    (add_special_tokens, like transformers' tokenizer(text)), then the eos id. labels: the tokens that start at or
    after the completion's first character (a token straddling the boundary counts as prompt) and the eos; every
    real token when the prompt is empty."""
    ids, offsets = tok.encode_with_offsets(row.prompt + row.completion, add_special_tokens=True)
    start = len(row.prompt)
    labels = [t if a >= start and (b > a or start == 0) else IGNORE_INDEX for t, (a, b) in zip(ids, offsets)]
    eos = tok.eos_token_id
    if eos is not None and ids and ids[-1] == eos:  # the post-processor appended it (zero-width): label it
        labels[-1] = eos
    elif eos is not None:
        ids, labels = ids + [eos], labels + [eos]
    return Sample(ids, labels)


def encode_record(tok: TextTokenizer, rec: Conversation | TextRow | Sequence[dict]) -> Sample:
    """One record of read_jsonl as a Sample: encode_text for a TextRow, encode_conversation for messages."""
    return encode_text(tok, rec) if isinstance(rec, TextRow) else encode_conversation(tok, rec)


def encode_all(tok: TextTokenizer, convs: Sequence[Conversation | TextRow], seq_len: int) -> tuple[list[Sample], dict]:
    """Encode (encode_record), truncate to seq_len and drop samples left without any label; (samples, counts)."""
    out, truncated, dropped = [], 0, 0
    for msgs in convs:
        s = encode_record(tok, msgs)
        if len(s) > seq_len:
            s, truncated = Sample(s.input_ids[:seq_len], s.labels[:seq_len]), truncated + 1
        if s.num_labels == 0:
            dropped += 1
            continue
        out.append(s)
    return out, {"samples": len(out), "truncated": truncated, "dropped_no_labels": dropped}


def pack(samples: Sequence[Sample], seq_len: int) -> list[Sample]:
    """Concatenate consecutive samples into rows of at most seq_len tokens (first fit in order, no splitting).

    Each sample's first label becomes IGNORE_INDEX: a document's first token cannot be predicted inside it (in a
    row of its own it is shifted out), and in a packed row it would be predicted from the previous document. So
    packing never changes which tokens are labels ({"text"} rows label their first token; chat rows never do).
    """
    rows: list[Sample] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_pos: list[int] = []
    for s in samples:
        if len(s) > seq_len:
            raise ValueError(f"sample of {len(s)} tokens is longer than seq_len={seq_len}; truncate first")
        if cur_ids and len(cur_ids) + len(s) > seq_len:
            rows.append(Sample(cur_ids, cur_labels, cur_pos))
            cur_ids, cur_labels, cur_pos = [], [], []
        cur_ids = cur_ids + s.input_ids
        cur_labels = cur_labels + [IGNORE_INDEX] * min(1, len(s.labels)) + s.labels[1:]
        cur_pos = cur_pos + list(range(len(s)))
    if cur_ids:
        rows.append(Sample(cur_ids, cur_labels, cur_pos))
    return rows


def collate(rows: Sequence[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both (B, T) int64 with T the longest row; padding is pad_id / IGNORE_INDEX on the right."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[i, : len(r)] = torch.tensor(r.labels, dtype=torch.long)
    return ids, labels


def collate_positions(rows: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, document_ids), both (B, T) int64 like `collate`'s tensors: each row's own positions
    (restarting at 0 per packed sample; 0..len-1 when it has none), padding continuing the last document.
    document_ids count the samples of a row: a new document starts wherever the position is 0."""
    T = max(len(r) for r in rows)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        own = r.position_ids if r.position_ids is not None else list(range(len(r)))
        last = own[-1] if own else -1
        pos[i, : len(r)] = torch.tensor(own, dtype=torch.long)
        pos[i, len(r):] = torch.arange(last + 1, last + 1 + T - len(r))
    return pos, (pos == 0).long().cumsum(1)


def split_holdout(convs: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) by a seeded shuffle; held-out gets round(fraction * n) records (at least 1 if fraction > 0)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    n_eval = 0 if fraction == 0 else max(1, round(fraction * len(convs)))
    if n_eval >= len(convs):
        raise DataFormatError(f"{len(convs)} record(s) are too few to hold out {n_eval} for evaluation and still "
                              f"train; pass --eval-fraction 0 (no eval) or --eval-data FILE")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(convs), generator=g).tolist()
    held = set(perm[:n_eval])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


class RowStream:
    """Endless, deterministic row order: epoch e visits the rows in randperm(n, seed + e). Position = rows consumed,
    so a checkpoint needs one integer to resume the exact stream."""

    def __init__(self, rows: Sequence[Sample], seed: int, position: int = 0):
        if not rows:
            raise ValueError("no training rows")
        self.rows, self.seed, self.position = rows, seed, position
        self._epoch, self._perm = -1, None

    @property
    def epoch(self) -> float:
        """Rows consumed / rows per epoch, as a float (1.5 = halfway through the second epoch)."""
        return self.position / len(self.rows)

    def take(self, k: int) -> list[Sample]:
        """The next k rows, advancing `position` by k; crosses epoch boundaries (a new permutation per epoch)."""
        out = []
        for _ in range(k):
            e, i = divmod(self.position, len(self.rows))
            if e != self._epoch:
                g = torch.Generator().manual_seed(self.seed + e)
                self._perm, self._epoch = torch.randperm(len(self.rows), generator=g).tolist(), e
            out.append(self.rows[self._perm[i]])
            self.position += 1
        return out
