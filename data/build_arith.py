"""Generate the bundled GRPO task for SmolLM2: data/arith/{train,valid,test}.jsonl.

Short addition / subtraction word problems with a checkable answer ("Sam has 7 apples and buys 5
more. How many apples does Sam have now?" -> 12). Rows are {"prompt", "answer"}: the prompt is a
plain string, which localtune sends as the user turn of the model's chat template. Three
problems in four take one step, one in four two: SmolLM2-135M-Instruct solves some and not others,
room for GRPO. No problem text appears in two splits. Run `python data/build_arith.py`; the output
is the same on every run.
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "arith"
SPLITS = {"train": 2000, "valid": 200, "test": 200}
SEED = 20261202
INSTRUCTION = "Answer with the number only."
MAX_START = 12  # starting amounts 2..MAX_START; changes 1..MAX_CHANGE
MAX_CHANGE = 6
TWO_STEP_SHARE = 0.25

NAMES = ["Sam", "Ana", "Leo", "Mia", "Tom", "Zoe", "Ben", "Eva", "Max", "Lily", "Omar", "Nina", "Raj", "Kim"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "cards", "shells", "eggs"]
GAIN = ["buys {n} more", "finds {n} more", "gets {n} more from a friend", "is given {n} more"]
LOSS = ["gives {n} away", "loses {n}", "eats {n}", "sells {n}"]
FOOD = {"apples", "cookies", "eggs"}  # only food can be eaten


def change(rng: random.Random, item: str, total: int) -> tuple[str, int]:
    """One step: a phrase and the signed change; a loss never takes more than the total."""
    if total > 1 and rng.random() < 0.5:
        verbs = [v for v in LOSS if item in FOOD or v != "eats {n}"]
        n = rng.randint(1, min(MAX_CHANGE, total - 1))
        return rng.choice(verbs).format(n=n), -n
    n = rng.randint(1, MAX_CHANGE)
    return rng.choice(GAIN).format(n=n), n


def main() -> None:
    rng = random.Random(SEED)
    OUT.mkdir(exist_ok=True)
    seen: set[str] = set()
    for split, n in SPLITS.items():
        rows = []
        while len(rows) < n:
            row = make_row(rng)
            if row["prompt"] not in seen:  # distinct problems: no prompt is in two splits
                seen.add(row["prompt"])
                rows.append(row)
        with open(OUT / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"{split}: {len(rows)} rows")


def make_row(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = total = rng.randint(2, MAX_START)
    phrases = []
    for _ in range(2 if rng.random() < TWO_STEP_SHARE else 1):
        phrase, delta = change(rng, item, total)
        phrases.append(phrase)
        total += delta
    steps = phrases[0] if len(phrases) == 1 else f"{phrases[0]}, then {phrases[1]}"
    prompt = f"{name} has {start} {item} and {steps}. How many {item} does {name} have now? {INSTRUCTION}"
    return {"prompt": prompt, "answer": total}


if __name__ == "__main__":
    main()
