"""The tool_call metric, the tool-calling template and data/tool_calls."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import invoke, only_run, write_recipe

from localtune.integrity import tool_calls

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "recipes" / "chatml-tools.jinja"
GOLDEN = {"messages": [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "",
          "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                           "arguments": '{"city": "Oslo", "days": 2}'}}]}]}


@pytest.mark.parametrize("answer, expected", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>', (1, 1, 1)),
    ('{"name": "get_weather", "arguments": {"days": 2.0, "city": "Oslo"}}', (1, 1, 1)),  # bare, JSON-equal
    ('Sure! <tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\", \\"days\\": 2}"}', (1, 1, 1)),
    ('<tool_call>{"function": {"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}}</tool_call>',
     (1, 1, 1)),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "oslo", "days": 2}}</tool_call>', (1, 1, 0)),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', (1, 1, 0)),
    ('<tool_call>{"name": "set_timer", "arguments": {"city": "Oslo", "days": 2}}</tool_call>', (1, 0, 0)),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'
     '<tool_call>{"name": "set_timer", "arguments": {}}</tool_call>', (1, 0, 0)),  # one call too many
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"</tool_call>', (0, 0, 0)),
    ("It is sunny in Oslo.", (0, 0, 0)),
    ('<tool_call>["get_weather"]</tool_call>', (0, 0, 0)),
], ids=["hermes", "bare json", "string arguments", "openai and parameters", "argument case", "missing argument",
        "wrong function", "extra call", "broken json", "prose", "not an object"])
def test_an_answer_scores_on_parse_name_and_arguments(answer, expected):
    assert tool_calls.score(answer, GOLDEN) == tuple(map(bool, expected))


def test_golden_rows_must_end_with_the_assistants_call():
    tool_calls.check_golden([GOLDEN], "test.jsonl")
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    with pytest.raises(Exception) as e:
        tool_calls.check_golden([GOLDEN, bad], "test.jsonl")
    assert "test.jsonl: row 2" in e.value.message and "tool_calls" in e.value.message and "fix:" in e.value.message


def test_the_template_renders_tools_calls_and_results_and_is_smollm2s_without_tools(small_model_path):
    from localtune import models
    from localtune.train.data import Encoder

    plain = models.load_tokenizer(small_model_path)
    tok = models.load_tokenizer(small_model_path, TEMPLATE.read_text())
    rows = [json.loads(line) for line in (ROOT / "data/tool_calls/train.jsonl").read_text().splitlines()]
    row = next(r for r in rows if len(r["messages"]) == 4)
    text = tok.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
    fn = row["tools"][0]["function"]
    assert f"<tools>\n{json.dumps(fn)}\n" in text
    call = row["messages"][1]["tool_calls"][0]["function"]
    assert (f'<|im_start|>assistant\n<tool_call>\n{{"name": "{call["name"]}", "arguments": {call["arguments"]}}}\n'
            "</tool_call><|im_end|>") in text
    assert f"<|im_start|>user\n<tool_response>\n{row['messages'][2]['content']}\n</tool_response><|im_end|>" in text
    # trained: the call and the final answer; not the tool result
    ex = Encoder(tok).messages(row["messages"], row["tools"])
    trained = tok.decode(ex.tokens[ex.loss_mask].tolist())
    assert call["name"] in trained and row["messages"][3]["content"] in trained and "tool_response" not in trained
    # without tools it is SmolLM2's template: a default system turn, then ChatML
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert plain.chat_template != tok.chat_template


def test_the_builder_is_deterministic_and_its_splits_share_no_call_or_request(tmp_path):
    import shutil

    shutil.copy(ROOT / "data/build_tool_calls.py", tmp_path)
    subprocess.run([sys.executable, str(tmp_path / "build_tool_calls.py")], check=True, capture_output=True)
    splits = {}
    for name in ("train", "valid", "test"):
        text = (tmp_path / "tool_calls" / f"{name}.jsonl").read_text()
        assert text == (ROOT / "data/tool_calls" / f"{name}.jsonl").read_text(), name
        splits[name] = [json.loads(line) for line in text.splitlines()]
    calls = {k: {json.dumps(tool_calls.expected_calls({"messages": r["messages"][:2]}), sort_keys=True)
                 for r in rows} for k, rows in splits.items()}
    asks = {k: {r["messages"][0]["content"].lower() for r in rows} for k, rows in splits.items()}
    for a, b in (("train", "test"), ("valid", "test"), ("train", "valid")):
        assert not calls[a] & calls[b] and not asks[a] & asks[b], (a, b)
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [800, 50, 100]


def test_a_run_scores_tool_calls_before_and_after(tmp_path, small_model_path):
    rows = [json.loads(line) for line in (ROOT / "data/tool_calls/train.jsonl").read_text().splitlines()[:4]]
    recipe = write_recipe(tmp_path, small_model_path, rows=rows, steps=2, batch_size=2, save_every=2,
                          max_seq_len=1024)
    (tmp_path / "tools.jinja").write_text(TEMPLATE.read_text())
    golden = (ROOT / "data/tool_calls/test.jsonl").read_text().splitlines(True)
    (tmp_path / "test.jsonl").write_text("".join(golden[:2]))
    text = recipe.read_text().replace("[model]\n", '[model]\nchat_template = "tools.jinja"\n', 1)
    text = text.replace("general_limit = 16", 'general = "none"')  # the metric is the point here
    recipe.write_text(text.replace("[eval]\n", '[eval]\nmetric = "tool_call"\n'))
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "parses" in result.output and "right function" in result.output
    run = only_run(tmp_path / "runs")
    task = json.loads((run / "manifest.json").read_text())["task"]
    for when in ("before", "after"):
        assert task[when]["metric"] == "tool_call" and task[when]["n"] == 1
        assert set(task[when]["secondary"]) == {"parses", "right function"}
    assert task["before"]["samples"][0]["expected"].startswith(("get_", "convert_", "set_", "search_", "translate_"))
    assert "| parses |" in (run / "report.md").read_text()


def test_a_golden_set_without_tool_calls_is_refused_before_training(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path)
    (tmp_path / "test.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "yo"}]}) + "\n")
    recipe.write_text(recipe.read_text().replace("[eval]\n", '[eval]\nmetric = "tool_call"\n'))
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code != 0 and "row 1" in result.output and "tool_calls" in result.output, result.output
    assert not (tmp_path / "runs").exists()
