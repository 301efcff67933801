"""data.py: chat template rendering vs transformers, response-only labels, packing, padding, named format errors."""
import json

import pytest
import torch

from qlora_core import data as D
from tests._tiny import CHATML, make_tokenizer, swap_task, write_jsonl
from tests.helpers import label_runs


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tokenizer folders sharing one tokenizer.json: with a ChatML template, and without any template."""
    root = tmp_path_factory.mktemp("tok")
    tok = make_tokenizer([r["instruction"] + "\n" + r["response"] for r in swap_task(200, seed=1)]
                         + ["system user assistant ### Instruction Response hello world"] * 3)
    tok.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    out = {}
    for name, template, eos in (("chat", CHATML, "<|im_end|>"), ("plain", None, "<|im_end|>"),
                                ("llama3", LLAMA3, "<|eot_id|>")):
        d = root / name
        d.mkdir()
        tok.save(str(d / "tokenizer.json"))
        cfg = {"eos_token": {"content": eos}, "pad_token": "<|endoftext|>", "bos_token": "<|begin_of_text|>"}
        if template:
            cfg["chat_template"] = template
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        out[name] = d
    return out


# Llama-3 style: bos from the template, headers, trimmed content, <|eot_id|> ends a turn
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
EOS = {"chat": "<|im_end|>", "plain": "<|im_end|>", "llama3": "<|eot_id|>"}


CONVS = [
    [{"role": "user", "content": "reverse a b c"}, {"role": "assistant", "content": "c b a"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "world"}, {"role": "user", "content": "reverse d e"},
     {"role": "assistant", "content": "e d"}],
]


@pytest.mark.parametrize("kind", ["chat", "llama3"])
@pytest.mark.parametrize("conv", CONVS, ids=["one-turn", "multi-turn"])
def test_chat_template_matches_transformers(folders, conv, kind):
    transformers = pytest.importorskip("transformers", reason="test extra: transformers (reference renderer)")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folders[kind] / "tokenizer.json"),
                                               eos_token=EOS[kind], bos_token="<|begin_of_text|>")
    ref.chat_template = CHATML if kind == "chat" else LLAMA3
    tok = D.TextTokenizer.from_folder(folders[kind])
    for gen in (False, True):
        text = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        assert tok.render(conv, add_generation_prompt=gen) == text
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", ["chat", "plain", "llama3"])
@pytest.mark.parametrize("conv", CONVS, ids=["one-turn", "multi-turn"])
def test_labels_are_exactly_the_assistant_turns(folders, kind, conv):
    tok = D.TextTokenizer.from_folder(folders[kind])
    assert tok.template_name == ("plain" if kind == "plain" else "chat_template")
    s = D.encode_conversation(tok, conv)
    assert s.input_ids == tok.encode(tok.render(conv))  # the ids of the whole text, not of pieces
    assert len(s.labels) == len(s.input_ids)
    # labelled tokens form one run per assistant turn; each run decodes to the content + end-of-turn token
    want = [m["content"] + EOS[kind] for m in conv if m["role"] == "assistant"]
    assert label_runs(tok, s) == want


def test_instruction_record_equals_messages_record(folders):
    tok = D.TextTokenizer.from_folder(folders["chat"])
    a = D.record_to_messages({"instruction": "reverse a b", "response": "b a"}, "x:1")
    b = D.record_to_messages({"messages": [{"role": "user", "content": "reverse a b"},
                                           {"role": "assistant", "content": "b a"}]}, "x:1")
    assert D.encode_conversation(tok, a) == D.encode_conversation(tok, b)


@pytest.mark.parametrize("line, needle", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"instruction": "x"}', "'response' is missing"),
    ('{"instruction": 3, "response": "y"}', "'instruction' must be a string"),
    ('{"question": "x", "answer": "y"}', "expected keys"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
    ('{"messages": [{"role": "user"}]}', "messages[0]"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, needle):
    good = json.dumps({"instruction": "a", "response": "b"})
    f = tmp_path / "d.jsonl"
    f.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(D.DataFormatError) as e:
        D.read_jsonl(f)
    assert f"{f}:4:" in str(e.value) and needle in str(e.value)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(D.DataFormatError, match="no records"):
        D.read_jsonl(tmp_path / "e.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        D.read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(D.TokenizerFileError, match="tokenizer.json"):
        D.TextTokenizer.from_folder(tmp_path)


def _samples(lengths):
    out = []
    for i, n in enumerate(lengths):
        ids = [1000 * i + j for j in range(n)]
        out.append(D.Sample(ids, [D.IGNORE_INDEX] + ids[1:]))
    return out


@pytest.mark.parametrize("seq_len", [7, 16, 33])
def test_pack_keeps_order_content_and_limit(seq_len):
    lengths = [3, 7, 1, 5, 2, 6, 4, 7, 1, 1]
    samples = [s for s in _samples(lengths) if len(s) <= seq_len]
    rows = D.pack(samples, seq_len)
    assert all(len(r) <= seq_len for r in rows)
    assert sum((r.input_ids for r in rows), []) == sum((s.input_ids for s in samples), [])
    assert sum((r.labels for r in rows), []) == sum((s.labels for s in samples), [])
    # greedy: a row is closed only when the next sample would not fit
    starts = 0
    for r, nxt in zip(rows, rows[1:]):
        starts += len(r)
        assert len(r) + len(next(s for s in samples if s.input_ids[0] == nxt.input_ids[0])) > seq_len
    with pytest.raises(ValueError, match="longer than seq_len"):
        D.pack(_samples([9]), 8)


def test_collate_pads_right_to_longest():
    rows = _samples([3, 5, 1])
    ids, labels = D.collate(rows, pad_id=7)
    assert ids.shape == labels.shape == (3, 5) and ids.dtype == torch.long
    for i, r in enumerate(rows):
        assert ids[i, :len(r)].tolist() == r.input_ids and labels[i, :len(r)].tolist() == r.labels
        assert (ids[i, len(r):] == 7).all() and (labels[i, len(r):] == D.IGNORE_INDEX).all()


@pytest.mark.parametrize("seq_len", [7, 16])
def test_packed_positions_restart_per_sample_and_documents_count_samples(seq_len):
    samples = _samples([3, 5, 1, 2, 6])
    rows = D.pack(samples, seq_len)
    # every sample shows up as one run of positions 0..len-1, in order
    runs = []
    for r in rows:
        assert len(r.position_ids) == len(r)
        for p in r.position_ids:
            if p == 0:
                runs.append(0)
            runs[-1] += 1
    assert runs == [len(s) for s in samples]
    pos, doc = D.collate_positions(rows)
    assert pos.shape == doc.shape == (len(rows), max(len(r) for r in rows)) and pos.dtype == doc.dtype == torch.long
    for i, r in enumerate(rows):
        assert pos[i, :len(r)].tolist() == r.position_ids
        n_docs = r.position_ids.count(0)
        assert doc[i, :len(r)].max().item() == n_docs and doc[i, 0].item() == 1
        assert (doc[i, len(r):] == n_docs).all(), "padding must stay in the last document (never position 0)"
    # unpacked samples: plain 0..len-1 and one document
    pos, doc = D.collate_positions(_samples([4, 2]))
    assert pos[0].tolist() == [0, 1, 2, 3] and pos[1].tolist() == [0, 1, 2, 3] and (doc == 1).all()


def test_truncation_and_label_less_samples_dropped(folders):
    tok = D.TextTokenizer.from_folder(folders["chat"])
    long_prompt = [{"role": "user", "content": "a b c " * 50}, {"role": "assistant", "content": "c"}]
    short = CONVS[0]
    n = len(D.encode_conversation(tok, short))
    samples, counts = D.encode_all(tok, [long_prompt, short], seq_len=n)
    assert counts == {"samples": 1, "truncated": 1, "dropped_no_labels": 1}
    assert len(samples[0]) == n


def test_split_and_stream_are_deterministic_and_resumable():
    convs = list(range(40))
    tr, ev = D.split_holdout(convs, 0.1, seed=3)
    assert len(ev) == 4 and sorted(tr + ev) == convs and D.split_holdout(convs, 0.1, seed=3) == (tr, ev)
    rows = _samples([2] * 10)
    a = D.RowStream(rows, seed=5)
    seq = [r.input_ids[0] for r in a.take(25)]
    assert sorted(seq[:10]) == sorted(r.input_ids[0] for r in rows)  # each epoch visits every row once
    assert seq[:10] != seq[10:20]  # and epochs are shuffled differently
    b = D.RowStream(rows, seed=5, position=13)
    assert [r.input_ids[0] for r in b.take(12)] == seq[13:25]
