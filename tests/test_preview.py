"""`localtune data preview`: the rows as the model sees them, trained spans marked, and every lint caught."""
import json

import pytest
from chat_templates import BAD, GOOD, ROWS, template, write_recipe
from click.testing import CliRunner

from localtune.cli import cli

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}


def preview(recipe, *args):
    return CliRunner().invoke(cli, ["data", "preview", str(recipe), *map(str, args)])


def test_plain_output_marks_the_trained_tokens(tmp_path):
    result = preview(write_recipe(tmp_path, GOOD, [CHAT] * 3), "-n", 1)
    assert result.exit_code == 0, result.output
    # not a terminal: no colour codes, the trained span between [[ and ]] (the end-of-turn token included)
    assert "\x1b[" not in result.output
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Yo<|im_end|>\n]]" in result.output
    assert "── row 1 · " in result.output and "row 2 ·" not in result.output  # -n 1
    assert "train.jsonl: 3 rows, OpenAI messages" in result.output
    assert "tokens: 42 in 3 rows, 12 trained (28.6%)" in result.output
    assert "lints: 0 errors, 0 warnings over all 3 rows: clean" in result.output


def test_token_counts_and_truncation(tmp_path):
    long = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello " * 30}]}
    result = preview(write_recipe(tmp_path, GOOD, [CHAT, long], max_seq_len=32), "-n", 2)
    assert result.exit_code == 0, result.output
    first, second = result.output.split("── row 1 · ")[1].split("── row 2 · ")
    n_chat = int(first.split(" tokens, ")[0].split(" · ")[-1])
    assert " tokens, 4 trained ──" in first.splitlines()[0]  # Yo<|im_end|>\n: 4 tokens of this tokenizer
    assert "32 tokens, " in second.splitlines()[0] and "cut to 32 of " in second.splitlines()[0]
    assert f"tokens: {n_chat + 32:,} in 2 rows" in result.output and "1 row truncated" in result.output
    assert "warn: [truncated] " in result.output and "train.jsonl:2" in result.output


@pytest.mark.parametrize("lint", sorted(BAD))
def test_each_lint_error_is_caught_and_exits_1(tmp_path, lint):
    result = preview(write_recipe(tmp_path, BAD[lint], ROWS, max_seq_len=1024), "-n", 1)
    assert result.exit_code == 1, result.output
    assert f"error: [{lint}] {tmp_path / 'train.jsonl'}:" in result.output
    assert "\n  fix: " in result.output


def test_no_trainable_row_at_all_is_an_error(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}] * 2
    result = preview(write_recipe(tmp_path, GOOD, rows, max_seq_len=16))
    assert result.exit_code == 1, result.output
    assert "error: [no_trainable_rows] " in result.output and "none of the 2 rows has a token to train" in result.output


def test_row_warnings_exit_0(tmp_path):
    rows = [CHAT, {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}]
    result = preview(write_recipe(tmp_path, GOOD, rows, max_seq_len=24))
    assert result.exit_code == 0, result.output
    assert f"warn: [nothing_to_train] {tmp_path / 'train.jsonl'}:2: 1 of 2 rows have no token to train" in result.output


def test_a_tool_row_previews_with_its_tool_call_trained(tmp_path):
    result = preview(write_recipe(tmp_path, template("qwen25_tools"), ROWS[1:], max_seq_len=1024))
    assert result.exit_code == 0, result.output
    assert '[[<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n]]' in result.output
    assert "<tool_response>\n12:00\n</tool_response>" in result.output  # shown, not trained
    assert "[[Noon.<|im_end|>\n]]" in result.output


def test_thinking_strip_shows_no_reasoning(tmp_path):
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]}
    result = preview(write_recipe(tmp_path, template("qwen3"), [row], thinking="strip"))
    assert result.exit_code == 0, result.output
    assert "assistant\n<think>\n\n</think>\n\n[[4<|im_end|>\n]]" in result.output and "add" not in result.output


def test_preference_rows_show_chosen_and_rejected(tmp_path):
    rows = [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}] * 2
    recipe = write_recipe(tmp_path, GOOD, rows, kind="dpo", beta=0.1)
    result = preview(recipe, "-n", 1)
    assert result.exit_code == 0, result.output
    assert "row 1, chosen" in result.output and "[[Hello<|im_end|>\n]]" in result.output
    assert "row 1, rejected" in result.output and "[[Go away<|im_end|>\n]]" in result.output


def test_an_unknown_stage_names_the_stages(tmp_path):
    result = preview(write_recipe(tmp_path, GOOD, [CHAT]), "--stage", "dpo")
    assert result.exit_code == 2 and "has no stage called 'dpo'; its stages: sft" in result.output


def test_preview_does_not_load_weights(tmp_path, monkeypatch):
    from localtune import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("preview loaded the weights"))
    result = preview(write_recipe(tmp_path, GOOD, [CHAT]))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "train.jsonl").read_text()) == CHAT


def test_a_sampling_stage_shows_only_the_prompts(tmp_path):
    recipe = write_recipe(tmp_path, GOOD, [CHAT] * 2, kind="grpo")
    recipe.write_text(recipe.read_text() + '[[stages.rewards]]\nkind = "contains"\ntext = "Yo"\n')
    result = preview(recipe, "-n", 1)
    assert result.exit_code == 0, result.output
    assert "row 1, prompt" in result.output and "[[" not in result.output
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant" in result.output and "Yo" not in result.output
    assert "nothing is trained on them as written" in result.output
