"""Generate the bundled small model's GRPO task: data/grpo_months/{train,valid,test}.jsonl.

The months task (data/months, built by build_months.py) as {"prompt", "answer"} rows: a grpo stage
samples its own answers to the prompts and a python reward checks them against "answer"
(recipes/rewards.py). A {"prompt", "completion"} row would be read as an SFT example, hence this
copy. The splits keep the months splits, so no prompt is in two of them. Run
`python data/build_grpo_months.py` after build_months.py; the output is the same on every run.
"""
import json
from pathlib import Path

DATA = Path(__file__).parent
SOURCE, OUT = DATA / "months", DATA / "grpo_months"
SPLITS = ("train", "valid", "test")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for split in SPLITS:
        with open(SOURCE / f"{split}.jsonl") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        out = [{"prompt": r["prompt"], "answer": int(r["completion"])} for r in rows]
        with open(OUT / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in out)
        print(f"{split}: {len(out)} rows")


if __name__ == "__main__":
    main()
