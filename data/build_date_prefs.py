"""Generate the bundled preference task: one consistent date format.

A user who asks for dates wants one format, ISO 8601 (YYYY-MM-DD), not a mix. The SFT data
(data/date_prefs/sft.jsonl) answers a quarter of the prompts in ISO and the rest as DD/MM/YYYY,
the habit of the data at hand; the preference pairs prefer ISO (chosen) over DD/MM/YYYY
(rejected) for the same date. Prompts and dates come from data/dates (run data/build_dates.py first), so
the held-out pairs use dates never seen in training.

Run `python data/build_date_prefs.py`; the output is the same on every run.
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "date_prefs"
SEED = 20241129
ISO_SHARE = 0.25  # of the SFT answers


# data/dates asks for ISO by name; here the prompt is neutral, so the format is the model's habit.
INSTRUCTIONS = ["Convert to ISO 8601: {}", "Normalize this date to YYYY-MM-DD: {}", "Write {} as an ISO 8601 date."]
NEUTRAL = ["Write this date in digits: {}", "Date: {}", "Give {} as a numeric date."]


def rows(split: str):
    for n, line in enumerate((HERE / "dates" / f"{split}.jsonl").read_text().splitlines()):
        row = json.loads(line)
        prompt, answer = ((row["messages"][0]["content"], row["messages"][1]["content"]) if "messages" in row
                          else (row["prompt"], row["completion"]))
        for i, template in enumerate(INSTRUCTIONS):
            head, tail = template.split("{}")
            if prompt.startswith(head) and prompt.endswith(tail):
                date = prompt[len(head): len(prompt) - len(tail)]
                yield NEUTRAL[(i + n) % len(NEUTRAL)].format(date), answer
                break
        else:
            raise ValueError(f"data/dates/{split}.jsonl:{n + 1}: unknown instruction in {prompt!r}")


def dmy(iso: str) -> str:
    y, m, d = iso.split("-")
    return f"{d}/{m}/{y}"


def write(name: str, items) -> None:
    (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in items))


def main() -> None:
    rng = random.Random(SEED)
    OUT.mkdir(exist_ok=True)
    train = list(rows("train"))
    write("sft.jsonl", ({"prompt": p, "completion": a if rng.random() < ISO_SHARE else dmy(a)} for p, a in train))
    write("train.jsonl", ({"prompt": p, "chosen": a, "rejected": dmy(a)} for p, a in train))
    write("valid.jsonl", ({"prompt": p, "chosen": a, "rejected": dmy(a)} for p, a in rows("valid")))
    write("test.jsonl", ({"prompt": p, "completion": a} for p, a in rows("test")))


if __name__ == "__main__":
    main()
