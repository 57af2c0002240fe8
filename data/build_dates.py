"""Generate the bundled date-normalisation task: data/dates/{train,valid,test}.jsonl.

Every split holds different calendar dates (1900-2099), so test dates are never seen in training.
Run `python data/build_dates.py`; the output is the same on every run.
"""
import datetime as dt
import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "dates"
SPLITS = {"train": 2000, "valid": 200, "test": 200}
SEED = 20240305
FIRST, LAST = dt.date(1900, 1, 1), dt.date(2099, 12, 31)

INSTRUCTIONS = [
    "Convert to ISO 8601: {}",
    "Normalize this date to YYYY-MM-DD: {}",
    "Write {} as an ISO 8601 date.",
]


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


FORMATS = [
    lambda d: f"{d:%B} {d.day}, {d.year}",  # March 5, 2021
    lambda d: f"{d.day} {d:%B} {d.year}",  # 5 March 2021
    lambda d: f"{d:%m/%d/%Y} (US)",  # 03/05/2021 (US)
    lambda d: f"{d:%d/%m/%Y} (EU)",  # 05/03/2021 (EU)
    lambda d: f"{d:%b} {ordinal(d.day)}, {d.year}",  # Mar 5th, 2021
    lambda d: f"{d:%Y.%m.%d}",  # 2021.03.05
    lambda d: f"the {ordinal(d.day)} of {d:%B}, {d.year}",  # the 5th of March, 2021
    lambda d: f"{d:%A}, {d:%B} {d.day}, {d.year}",  # Friday, March 5, 2021
    lambda d: f"{d.day}-{d:%b}-{d.year}",  # 5-Mar-2021
    lambda d: f"{d:%Y/%m/%d}",  # 2021/03/05
    lambda d: f"{d:%B} {ordinal(d.day)} {d.year}",  # March 5th 2021
    lambda d: f"{d:%d.%m.%Y}",  # 05.03.2021
]


def example(date: dt.date, rng: random.Random) -> tuple[str, str]:
    prompt = rng.choice(INSTRUCTIONS).format(rng.choice(FORMATS)(date))
    return prompt, date.isoformat()



def distinct_dates(rng: random.Random, splits: dict) -> dict:
    """{split: dates}: dates drawn without replacement, so no date is in two splits."""
    span = (LAST - FIRST).days + 1
    offsets = iter(rng.sample(range(span), sum(splits.values())))
    return {split: [FIRST + dt.timedelta(days=next(offsets)) for _ in range(size)] for split, size in splits.items()}


def main() -> None:
    rng = random.Random(SEED)
    OUT.mkdir(exist_ok=True)
    for split, dates in distinct_dates(rng, SPLITS).items():
        rows = []
        for date in dates:
            prompt, completion = example(date, rng)
            if split == "test":
                rows.append({"prompt": prompt, "completion": completion})
            else:
                rows.append({"messages": [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": completion}]})
        with open(OUT / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"{split}: {len(rows)} rows")


if __name__ == "__main__":
    main()
