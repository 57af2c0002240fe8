"""Generate the bundled distillation task: data/months/{train,valid,test}.jsonl.

A written date with the month spelled out -> the month's number ("5 March 2021" -> "3"). The
bundled small model learns it well with full fine-tuning; the smaller one does not know it at
all, so recipes/distill.toml has a gap for distillation to close. Every split holds different
calendar dates (1900-2099). Run `python data/build_months.py`; the output is the same on every run.
"""
import json
import random
from pathlib import Path

from build_dates import distinct_dates  # the same calendar, 1900-2099

OUT = Path(__file__).parent / "months"
SPLITS = {"train": 3000, "valid": 200, "test": 200}
SEED = 20261129

QUESTIONS = ["Which month number is {}?", "{}: month number?", "Give the month of {} as a number."]
FORMATS = [  # every format holds the whole date, so no prompt is in two splits
    lambda d: f"{d:%B} {d.day}, {d.year}",  # March 5, 2021
    lambda d: f"{d.day} {d:%B} {d.year}",  # 5 March 2021
    lambda d: f"the {d.day} of {d:%B}, {d.year}",  # the 5 of March, 2021
    lambda d: f"{d:%A}, {d:%B} {d.day}, {d.year}",  # Friday, March 5, 2021
]


def main() -> None:
    rng = random.Random(SEED)
    OUT.mkdir(exist_ok=True)
    for split, dates in distinct_dates(rng, SPLITS).items():
        rows = [{"prompt": rng.choice(QUESTIONS).format(rng.choice(FORMATS)(d)), "completion": str(d.month)}
                for d in dates]
        with open(OUT / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"{split}: {len(rows)} rows")


if __name__ == "__main__":
    main()
