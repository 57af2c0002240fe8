"""Python rewards for the grpo recipes: (prompt, completion, row) -> float, 1.0 when the answer checks.

A grpo stage names one as `function = "rewards.py:exact_number"` in [[stages.rewards]]. `row` is the
data row the prompt came from; its "answer" column holds the expected answer.
"""
import re

# An optional sign, digits with optional thousands commas, an optional decimal part.
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def exact_answer(prompt, completion: str, row: dict) -> float:
    """1.0 when the completion, whitespace-stripped, is exactly the answer ("5" for 5)."""
    return float(completion.strip() == str(row["answer"]).strip())


def exact_number(prompt, completion: str, row: dict) -> float:
    """1.0 when the last number in the completion equals the answer numerically.

    "The answer is 1,200." and "1200.0" both match 1200; a completion with no number scores 0.
    """
    numbers = NUMBER.findall(completion)
    if not numbers:
        return 0.0
    got, want = _value(numbers[-1]), _value(str(row["answer"]))
    return float(got is not None and got == want)


def _value(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None  # an answer that is not a number never matches
