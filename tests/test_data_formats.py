"""The four record shapes of docs/data.md: {"messages"} with tool turns (rendered by the chat template, compared
with transformers' apply_chat_template), {"instruction", "input", "response"}, {"prompt", "completion"} (strings:
raw text; message lists: the completion's turns labelled) and {"text"} (every token labelled), each down to the
exact ids and labels, plus a training run on a file that mixes them."""
import json

import pytest

from qlora_core import data as D
from tests._tiny import CHATML, make_tokenizer, swap_task, write_jsonl
from tests.helpers import label_runs

transformers = pytest.importorskip("transformers", reason="test extra: transformers (reference renderer/tokenizer)")

# Qwen2.5's template, tool parts: tool schemas in the system turn, assistant tool_calls as <tool_call> blocks,
# consecutive tool results grouped into one user turn of <tool_response> blocks
TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_RECORD = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "weather in Paris and Lyon?"},
    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
    {"role": "tool", "name": "get_weather", "content": "sunny"},
    {"role": "tool", "name": "get_weather", "content": "rain"},
    {"role": "assistant", "content": "Paris is sunny, Lyon rainy."}]}
# what the two assistant turns are, as the template writes them (content + end-of-turn token)
TOOL_TURNS = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
              "Paris is sunny, Lyon rainy.<|im_end|>"]


@pytest.fixture(scope="module")
def tokfile(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    tok = make_tokenizer([r["instruction"] + "\n" + r["response"] for r in swap_task(200, seed=1)]
                         + ["weather Paris Lyon sunny rain tool_call tool_response name arguments city"] * 3)
    tok.add_special_tokens(["<|begin_of_text|>"])
    tok.save(str(root / "tokenizer.json"))
    return root / "tokenizer.json"


def _folder(root, tokfile, template, post_bos=False):
    """A tokenizer folder: tokfile (optionally with a post-processor that prepends <|begin_of_text|>, as Llama 3's
    does) and a tokenizer_config with the template."""
    from tokenizers import Tokenizer, processors
    root.mkdir(exist_ok=True)
    tok = Tokenizer.from_file(str(tokfile))
    if post_bos:
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(root / "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if template:
        cfg["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    return D.TextTokenizer.from_folder(root)


def _reference(tokfile, template):
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokfile), eos_token="<|im_end|>")
    ref.chat_template = template
    return ref


def test_tool_conversation_renders_as_transformers_and_labels_assistant_turns(tmp_path, tokfile):
    tok = _folder(tmp_path / "t", tokfile, TOOL_TEMPLATE)
    conv = D.record_to_messages(TOOL_RECORD, "x:1")
    assert isinstance(conv, D.Conversation) and conv.tools == TOOLS and [m["role"] for m in conv] == \
        ["user", "assistant", "tool", "tool", "assistant"]
    assert conv[2]["name"] == "get_weather" and conv[1]["tool_calls"] == [TOOL_CALL]
    ref = _reference(tokfile, TOOL_TEMPLATE)
    for gen in (False, True):
        want = ref.apply_chat_template(TOOL_RECORD["messages"], tools=TOOLS, tokenize=False,
                                       add_generation_prompt=gen)
        assert tok.render(conv, add_generation_prompt=gen, tools=conv.tools) == want
    s = D.encode_record(tok, conv)
    assert s.input_ids == ref(ref.apply_chat_template(TOOL_RECORD["messages"], tools=TOOLS, tokenize=False),
                              add_special_tokens=False)["input_ids"]
    assert label_runs(tok, s) == TOOL_TURNS  # the tool call is learned, the tool results are not


def test_tool_conversation_with_the_plain_template(tmp_path, tokfile):
    tok = _folder(tmp_path / "p", tokfile, None)
    s = D.encode_record(tok, D.record_to_messages(TOOL_RECORD, "x:1"))
    text = tok.decode(s.input_ids, skip_special_tokens=False)
    assert text.startswith("### Tools:\n[{") and "### Tool:\nsunny\n\n### Tool:\nrain" in text
    assert label_runs(tok, s) == [json.dumps([TOOL_CALL]) + "<|im_end|>", "Paris is sunny, Lyon rainy.<|im_end|>"]


def test_instruction_input_response_record(tmp_path, tokfile):
    tok = _folder(tmp_path / "c", tokfile, CHATML)
    rec = {"instruction": "reverse", "input": "a b c", "response": "c b a", "system": "be brief"}
    conv = D.record_to_messages(rec, "x:1")
    assert list(conv) == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse\n\na b c"},
                          {"role": "assistant", "content": "c b a"}]
    alpaca = {"instruction": "reverse", "input": "a b c", "output": "c b a", "system": "be brief"}
    assert D.encode_record(tok, D.record_to_messages(alpaca, "x:1")) == D.encode_record(tok, conv)
    assert label_runs(tok, D.encode_record(tok, conv)) == ["c b a<|im_end|>"]


@pytest.mark.parametrize("post_bos", [False, True])
def test_text_rows_label_every_token_and_end_with_eos(tmp_path, tokfile, post_bos):
    tok = _folder(tmp_path / "x", tokfile, CHATML, post_bos=post_bos)
    text = "reverse a b c\nc b a"
    row = D.record_to_messages({"text": text}, "x:1")
    assert row == D.TextRow("", text)
    s = D.encode_record(tok, row)
    # ids: what transformers' tokenizer(text) gives (its post-processor included), then the eos
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "x" / "tokenizer.json"))
    want = ref(text)["input_ids"] + [tok.eos_token_id]
    assert s.input_ids == want and s.labels == want
    assert (s.input_ids[0] == tok.tok.token_to_id("<|begin_of_text|>")) == post_bos


def test_prompt_completion_strings_label_only_the_completion(tmp_path, tokfile):
    tok = _folder(tmp_path / "s", tokfile, CHATML)
    row = D.record_to_messages({"prompt": "reverse a b c\n", "completion": "c b a"}, "x:1")
    assert row == D.TextRow("reverse a b c\n", "c b a")
    s = D.encode_record(tok, row)
    assert s.input_ids == tok.encode("reverse a b c\nc b a") + [tok.eos_token_id]  # no chat template
    assert label_runs(tok, s) == ["c b a<|im_end|>"]


def test_prompt_completion_messages_label_only_the_completion_turns(tmp_path, tokfile):
    tok = _folder(tmp_path / "m", tokfile, CHATML)
    prompt = [{"role": "user", "content": "reverse a b"}, {"role": "assistant", "content": "b a"},
              {"role": "user", "content": "reverse c d"}]
    completion = [{"role": "assistant", "content": "d c"}]
    conv = D.record_to_messages({"prompt": prompt, "completion": completion}, "x:1")
    assert conv.first_labelled == 3 and list(conv) == prompt + completion
    s = D.encode_record(tok, conv)
    full = D.encode_record(tok, D.record_to_messages({"messages": prompt + completion}, "x:1"))
    assert s.input_ids == full.input_ids  # the same text, rendered by the template
    assert label_runs(tok, full) == ["b a<|im_end|>", "d c<|im_end|>"] and label_runs(tok, s) == ["d c<|im_end|>"]


@pytest.mark.parametrize("rec, needle", [
    ({"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]}, "two strings or two message lists"),
    ({"prompt": "x", "completion": ""}, "'completion' is empty"),
    ({"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]},
     "'completion' has no assistant turn"),
    ({"text": 3}, "'text' must be a non-empty string, got a number"),
    ({"text": ""}, "'text' must be a non-empty string, got an empty string"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}, {"role": "assistant", "content": "y"}]},
     "'tool_calls' must be a list of objects, on an assistant"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}, "messages[1]"),
    ({"messages": [{"role": "assistant", "content": "y"}], "tools": {"a": 1}}, "'tools' must be a list"),
    ({"question": "x"}, "expected keys 'messages', 'instruction' + 'response', 'prompt' + 'completion' or 'text'"),
])
def test_malformed_records_name_the_problem(rec, needle):
    with pytest.raises(D.DataFormatError, match="^f.jsonl:7: ") as e:
        D.record_to_messages(rec, "f.jsonl:7")
    assert needle in str(e.value)


def test_training_on_a_file_mixing_every_shape(tmp_path):
    import qlora_core.train_loop as T
    from qlora_core.lora import LoraConfig
    from qlora_core.train_config import TrainConfig
    from tests._tiny import make_model_folder
    model = make_model_folder(tmp_path / "model")
    recs = []
    for i, r in enumerate(swap_task(48)):
        kind = i % 4
        if kind == 0:
            recs.append(r)
        elif kind == 1:
            recs.append({"messages": [{"role": "user", "content": r["instruction"]},
                                      {"role": "assistant", "content": r["response"]}]})
        elif kind == 2:
            recs.append({"prompt": r["instruction"] + "\n", "completion": r["response"]})
        else:
            recs.append({"text": r["instruction"] + "\n" + r["response"]})
    data = write_jsonl(tmp_path / "mixed.jsonl", recs)
    records = D.read_jsonl(data)
    assert [type(x).__name__ for x in records[:4]] == ["Conversation", "Conversation", "TextRow", "TextRow"]
    r = T.train(TrainConfig(model=str(model), data=str(data), output=str(tmp_path / "o"), max_steps=3,
                            batch_size=4, seq_len=64, eval_fraction=0.1, log_every=100, save_every=0,
                            lora=LoraConfig(r=2)))
    assert r.stopped is None and r.steps == 3 and all(x is not None for x in r.losses)
