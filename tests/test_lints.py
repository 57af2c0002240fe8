"""Data lints: each caught on a crafted bad template or row, and `run` stopping or reporting before weights load."""
import json

import pytest
from chat_templates import BAD, GOOD, ROWS, load, template, write_recipe
from click.testing import CliRunner

from localtune.cli import cli
from localtune.train import data, lints


def run_lints(tokenizer, rows, max_seq_len=1024, fmt="messages"):
    ds = data.encode(rows, fmt, tokenizer, max_seq_len, source="train.jsonl")
    return {f.lint: f for f in lints.lint(ds, tokenizer, rows, fmt, max_seq_len)}


@pytest.mark.parametrize("lint", sorted(BAD))
def test_each_template_lint_fires_as_an_error(tmp_path, lint):
    found = run_lints(load(tmp_path / "m", BAD[lint]), ROWS)
    assert found[lint].level == "error", found
    assert found[lint].fix and "train.jsonl: row" in found[lint].where


def test_a_good_template_has_no_findings(tmp_path):
    assert run_lints(load(tmp_path / "m", template("qwen25_tools")), ROWS) == {}


def test_row_lints_warn_and_name_the_rows(tmp_path):
    tok = load(tmp_path / "m", template("qwen25_tools"))
    rows = [ROWS[0], {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello " * 40}]}]
    found = run_lints(tok, rows, max_seq_len=48)
    assert found["truncated"].level == "warn" and found["truncated"].where == "train.jsonl: row 2, train.jsonl: row 3"
    assert found["nothing_to_train"].level == "warn" and found["nothing_to_train"].where == "train.jsonl: row 2"
    assert "1 of 3 rows have no token to train" in found["nothing_to_train"].message


def test_a_text_row_that_starts_with_bos_warns(tmp_path):
    tok = load(tmp_path / "m", GOOD)
    found = run_lints(tok, [{"text": "plain text"}, {"text": "<s>text with its own BOS"}], fmt="text")
    assert found["double_bos"].level == "warn" and found["double_bos"].where == "train.jsonl: row 2"


def test_qwen3_multi_turn_rows_warn_that_earlier_turns_are_not_trained(tmp_path):
    tok = load(tmp_path / "m", template("qwen3"))
    chat = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    found = run_lints(tok, [{"messages": chat}])
    assert list(found) == ["skipped_turns"] and found["skipped_turns"].level == "warn"


def test_run_stops_on_a_lint_error_before_weights_load(tmp_path):
    recipe = write_recipe(tmp_path, BAD["header_in_loss"], ROWS[:1] * 4)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--no-tui", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert "[stages.sft] data lint error: [header_in_loss] " in result.output
    assert "fix: use a chat template that writes the assistant header" in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_run_writes_lint_warnings_in_the_report_and_manifest(tmp_path):
    rows = ROWS[:1] * 4 + [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant",
                                                                           "content": "Hello " * 40}]}]
    recipe = write_recipe(tmp_path, GOOD, rows)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--no-tui", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert [f["lint"] for f in manifest["data_lints"]["sft"]] == ["truncated"]
    report = (run / "report.md").read_text()
    assert "## Data lints" in report and "`truncated` " in report
    assert "train.jsonl:5" in report  # the row is named by its line
