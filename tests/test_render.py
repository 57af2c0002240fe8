"""Chat rendering: tool calls, tool turns and thinking, through the model's own chat template."""
import json

import pytest
from chat_templates import load, template

from localtune.errors import DataError
from localtune.train import data

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CHAT = [{"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "18C sunny", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is 18C and sunny."}]


@pytest.fixture(scope="module")
def tool_tokenizer(tmp_path_factory):
    return load(tmp_path_factory.mktemp("qwen25"), template("qwen25_tools"))


@pytest.fixture(scope="module")
def qwen3_tokenizer(tmp_path_factory):
    return load(tmp_path_factory.mktemp("qwen3"), template("qwen3"))


def trained_spans(tokenizer, ex) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    spans, run = [], []
    for token, trained in zip(ex.tokens.tolist(), ex.loss_mask.tolist()):
        if trained:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans + ([tokenizer.decode(run)] if run else [])


def test_tool_calls_are_trained_and_tool_results_masked(tool_tokenizer):
    ex = data.Encoder(tool_tokenizer).messages(CHAT, TOOLS)
    text = tool_tokenizer.decode(ex.tokens.tolist())
    assert '"name": "get_weather"' in text and "<tool_response>\n18C sunny" in text  # the tools were rendered
    assert trained_spans(tool_tokenizer, ex) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
        "It is 18C and sunny.<|im_end|>\n"]
    assert ex.skipped_turns == 0


def test_arguments_as_a_json_string_or_an_object_render_the_same(tool_tokenizer):
    as_object = [dict(m) for m in CHAT]
    as_object[1] = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]}  # content missing, arguments an object
    enc = data.Encoder(tool_tokenizer)
    assert enc.messages(as_object, TOOLS).tokens.tolist() == enc.messages(CHAT, TOOLS).tokens.tolist()


def test_a_tools_row_reads_and_encodes(tool_tokenizer, tmp_path):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": CHAT, "tools": TOOLS}) + "\n")
    rows, fmt = data.read_jsonl(path)
    ds = data.encode(rows, fmt, tool_tokenizer, 512)
    assert fmt == "messages" and len(ds) == 1 and ds.examples[0].row == 0


def test_the_evaluation_prompt_of_a_golden_tool_row(tool_tokenizer):
    enc = data.Encoder(tool_tokenizer)
    ids = enc.prompt_tokens(CHAT, TOOLS)  # the last assistant turn is what the model must write
    text = tool_tokenizer.decode(ids)
    assert "<tools>" in text and text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert ids == enc.template(CHAT[:-1], add_generation_prompt=True, tools=TOOLS)


@pytest.mark.parametrize("row,expected", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     'messages[1] must be {"role"'),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}]},
     "messages[1].tool_calls[0] must be"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{city: Paris}"}}]}]},
     "messages[1].tool_calls[0].function.arguments is not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [CALL]}, {"role": "assistant", "content": "x"}]},
     'messages[0] "tool_calls" must be a non-empty list on an assistant message'),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": None},
                   {"role": "assistant", "content": "x"}]}, 'messages[1] must be {"role"'),
    ({"messages": CHAT, "tools": {"name": "get_weather"}}, '"tools" must be a list of OpenAI function schemas'),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"parameters": {}}}]},
     "tools[0] has no function name"),
])
def test_bad_tool_rows_name_the_line_and_the_message(tmp_path, row, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CHAT, "tools": TOOLS}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        data.read_jsonl(path)
    assert err.value.message.startswith(f"{path}:2: ") and expected in err.value.message


def test_a_template_that_refuses_a_row_names_it(tmp_path):
    strict = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool role here') }}"
              "{% endif %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}")
    tok = load(tmp_path / "strict", strict)
    with pytest.raises(DataError, match=r"train.jsonl: row 2: the chat template cannot render this row: "
                                        r"no tool role here"):
        data.encode([{"messages": CHAT[:1] + CHAT[3:]}, {"messages": CHAT}], "messages", tok, 512, source="train.jsonl")
