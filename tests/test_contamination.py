"""The contamination firewall: planted exact and near duplicates are caught; a clean split passes."""
import json

import pytest
from test_cli import invoke, write_recipe

from localtune.integrity import contamination

LONG = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch and counts the "
        "sheep in the far field before the rain comes. Later that evening the children walk down to the river "
        "to look for frogs, and their mother calls them back for supper before the sun sets behind the old "
        "wooden barn")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(prefix, n=20):
    return [{"prompt": f"{prefix} question number {i} about topic {i * 7}", "completion": f"answer {i}"}
            for i in range(n)]


def test_a_planted_exact_duplicate_is_found_with_both_lines(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", _rows("train") + [{"prompt": "Golden  question 3?", "completion": "Yes."}])
    golden = _jsonl(tmp_path / "golden.jsonl", [{"prompt": "a", "completion": "b"},
                                                {"prompt": "golden question 3", "completion": "yes"}])
    report = contamination.check_files([train], [golden])
    assert [(o.train, o.golden, o.kind) for o in report.overlaps] == [(f"{train}:21", f"{golden}:2", "exact")]
    assert report.contaminated == 1 and report.share == 0.5


def test_a_planted_near_duplicate_is_found_and_a_paraphrase_is_not(tmp_path):
    golden = _jsonl(tmp_path / "golden.jsonl", [{"text": LONG}])
    near = LONG.replace("old wooden", "old painted")  # one word changed: most 13-grams survive
    far = " ".join(reversed(LONG.split()))
    train = _jsonl(tmp_path / "train.jsonl", [{"text": "Preface. " + near}, {"text": far}])
    report = contamination.check_files([train], [golden])
    assert [(o.train, o.kind) for o in report.overlaps] == [(f"{train}:1", "near")]
    words = contamination.words(LONG)
    i = words.index("wooden")  # the 13-grams through that word are lost
    lost = min(i, len(words) - 13) - max(0, i - 12) + 1
    assert report.overlaps[0].score == pytest.approx(1 - lost / (len(words) - 12))


def test_the_bundled_splits_are_clean():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "data"
    for task in ("dates", "date_prefs", "months"):
        report = contamination.check_files([root / task / "train.jsonl"], [root / task / "test.jsonl"])
        assert report.overlaps == [] and report.golden_rows == 200, task


def test_a_recipe_whose_training_data_holds_a_golden_row_is_blocked(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path)
    golden = json.loads((tmp_path / "test.jsonl").read_text())
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": golden["prompt"]},
                                         {"role": "assistant", "content": golden["completion"]}]}) + "\n")
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2, result.output
    assert "training data overlaps the golden set" in result.output
    assert f"{tmp_path / 'train.jsonl'}:65 is an exact duplicate of golden {tmp_path / 'test.jsonl'}:1" in result.output
    assert "localtune data split" in result.output and not (tmp_path / "runs").exists()


def test_overlap_within_max_contamination_warns_and_is_recorded(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path, steps=1)
    golden = json.loads((tmp_path / "test.jsonl").read_text())
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write(json.dumps({"prompt": golden["prompt"], "completion": golden["completion"]}) + "\n")
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    _jsonl(tmp_path / "train.jsonl", [r if "messages" not in r else
                                      {"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]}
                                      for r in rows])
    recipe.write_text(recipe.read_text().replace("[eval]\n", "[eval]\nmax_contamination = 1.0\n"))
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "1 of 131 golden rows overlap the training data" in result.output  # the test row + 130 general texts
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "manifest.json").read_text())["contamination"]["exact"] == 1


def test_data_check_cli(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", _rows("train"))
    golden = _jsonl(tmp_path / "golden.jsonl", _rows("golden", 5))
    clean = invoke("data", "check", train, "--against", golden)
    assert clean.exit_code == 0 and clean.output.startswith("0 of 5 golden rows (0.0%) overlap 20 training rows")
    _jsonl(train, _rows("train") + _rows("golden", 2))
    dirty = invoke("data", "check", train, "--against", golden, "--json")
    assert dirty.exit_code == 1
    data = json.loads(dirty.output)
    assert data["contaminated_golden_rows"] == 2 and data["exact"] == 2
    assert [o["train"] for o in data["overlaps"]] == [f"{train}:21", f"{train}:22"]


def test_data_split_leaves_no_overlap_even_for_duplicated_rows(tmp_path):
    rows = _rows("q", 50) + _rows("q", 10)  # the first 10 rows appear twice
    source = _jsonl(tmp_path / "all.jsonl", rows)
    result = invoke("data", "split", source, "--test", "0.2", "--out", tmp_path / "split")
    assert result.exit_code == 0, result.output
    train, test = tmp_path / "split/train.jsonl", tmp_path / "split/test.jsonl"
    assert len(train.read_text().splitlines()) + len(test.read_text().splitlines()) == 60
    assert contamination.check_files([train], [test]).overlaps == []
    again = invoke("data", "split", source, "--out", tmp_path / "split")
    assert again.exit_code == 1 and "already holds train.jsonl" in again.output


def test_training_on_the_general_texts_is_blocked_too(tmp_path, small_model_path):
    from pathlib import Path

    import localtune

    general = Path(localtune.__file__).parent / "resources/general.jsonl"
    first = json.loads(general.read_text().splitlines()[1])["text"]
    recipe = write_recipe(tmp_path, small_model_path, rows=[{"text": first}] * 8)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and f"is an exact duplicate of golden {general}:2" in result.output


def test_tool_calls_are_compared_too():
    call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius", "days": 3}}}]}
    row = {"messages": [{"role": "user", "content": "Weather?"}, call]}
    text = contamination.row_text(row)
    assert "get_weather" in text and '"city": "Lisbon"' in text
    report = contamination.check([("t:1", row)], [("g:1", row)], n=13, near=0.5)
    assert [o.kind for o in report.overlaps] == ["exact"]
