"""Build the bundled KTO data: the date_prefs pairs as unpaired thumbs-up / thumbs-down rows.

Each {"prompt", "chosen", "rejected"} pair of data/date_prefs becomes two labelled rows,
{"prompt", "completion": chosen, "label": true} and {"prompt", "completion": rejected, "label": false}.
train.jsonl comes from date_prefs/train.jsonl and valid.jsonl from date_prefs/valid.jsonl, so the
held-out rows use the same held-out dates as the DPO recipes (run data/build_date_prefs.py first).

Run `python data/build_date_kto.py`; the output is the same on every run.
"""
import json
from pathlib import Path

HERE = Path(__file__).parent
SOURCE, OUT = HERE / "date_prefs", HERE / "date_kto"


def labelled(pair: dict):
    yield {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True}
    yield {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for split in ("train", "valid"):
        pairs = [json.loads(line) for line in (SOURCE / f"{split}.jsonl").read_text().splitlines()]
        (OUT / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for p in pairs for r in labelled(p)))


if __name__ == "__main__":
    main()
