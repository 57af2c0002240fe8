"""The grpo recipes' python rewards (recipes/rewards.py) on hand-written completions, and the shape
of the bundled grpo data: {"prompt", "answer"} rows whose answers the rewards accept."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("recipe_rewards", ROOT / "recipes" / "rewards.py")
rewards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rewards)


@pytest.mark.parametrize("completion, answer, expected", [
    ("5", 5, 1.0),
    (" 5\n", "5", 1.0),
    ("05", 5, 0.0),
    ("5.", 5, 0.0),
    ("The answer is 5", 5, 0.0),
    ("", 5, 0.0),
    ("12", 1, 0.0),
])
def test_exact_answer(completion, answer, expected):
    assert rewards.exact_answer("p", completion, {"answer": answer}) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("12", 12, 1.0),
    ("The answer is 12.", 12, 1.0),
    ("Sam has 7 + 5 = 12 apples.", 12, 1.0),
    ("1,200", 1200, 1.0),
    ("It costs 1,200.50 in total", "1200.5", 1.0),
    ("12.0", 12, 1.0),
    ("-3", -3, 1.0),
    ("7 - 10 = -3", -3, 1.0),
    ("12 apples, then 13", 12, 0.0),  # the last number counts
    ("twelve", 12, 0.0),
    ("", 12, 0.0),
    ("12", "twelve", 0.0),  # a non-numeric answer never matches
])
def test_exact_number(completion, answer, expected):
    assert rewards.exact_number("p", completion, {"answer": answer}) == expected


@pytest.mark.parametrize("folder", ["arith", "grpo_months"])
def test_bundled_grpo_rows_are_prompt_answer_and_solvable(folder):
    for split in ("train", "valid", "test"):
        rows = [json.loads(line) for line in (ROOT / "data" / folder / f"{split}.jsonl").open()]
        assert rows and all(set(r) == {"prompt", "answer"} for r in rows)
        assert all(rewards.exact_number(r["prompt"], str(r["answer"]), r) == 1.0 for r in rows)
