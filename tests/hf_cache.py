"""A Hugging Face dataset laid out in a hub cache folder exactly as huggingface-hub writes one:
blobs named by their hash, a snapshot folder of symlinks to them, and refs/main naming the commit."""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path


def parquet_bytes(rows: list[dict], row_group_size: int | None = None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=row_group_size)
    return buf.getvalue()


def lay_out(cache: Path, repo: str, files: dict[str, bytes | str], commit: str = "a" * 40) -> Path:
    """cache/datasets--owner--name/{blobs,snapshots/COMMIT,refs/main}; returns the snapshot folder."""
    root = cache / f"datasets--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def card(license: str = "apache-2.0", configs: str = "", extra: str = "") -> str:
    return f"---\nlicense: {license}\n{configs}{extra}---\n\n# A dataset\n\nHuman-written rows.\n"


SMOLTALK = "HuggingFaceTB/smoltalk"
SMOLTALK_CONFIGS = "".join(
    f"- config_name: {name}\n  data_files:\n  - split: train\n    path: data/{name}/train-*\n"
    f"  - split: test\n    path: data/{name}/test-*\n" for name in ("all", "everyday-conversations"))


def smoltalk_rows(n: int, seed: int) -> list[dict]:
    """Rows in smoltalk's schema ({"full_topic", "messages"}), two exchanges of everyday talk each:
    made here, from slots, as a stand-in for the real dataset (no network in tests)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    names = ["Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kemal", "Lena",
             "Mira", "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tess"]
    topics = {"coffee": ["a flat white", "an espresso", "a cold brew", "a chai latte", "a cortado"],
              "weekend": ["a hike", "a museum visit", "a picnic", "a bike ride", "a farmers market"],
              "cooking": ["a lentil soup", "a mushroom risotto", "banana bread", "a green curry", "fresh pasta"],
              "books": ["a mystery novel", "a travel memoir", "a poetry collection", "a history of maps",
                        "a cookbook"],
              "weather": ["light rain", "a sunny morning", "strong wind", "a foggy evening", "fresh snow"]}
    places = ["Lisbon", "Oslo", "Kyoto", "Austin", "Nairobi", "Lyon", "Porto", "Quito", "Tallinn", "Perth"]
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    rows = []
    for _ in range(n):
        topic = pick(list(topics))
        name, thing, place, day = pick(names), pick(topics[topic]), pick(places), pick(days)
        other = pick([t for t in topics[topic] if t != thing])
        n1, n2 = int(rng.integers(2, 9)), int(rng.integers(10, 60))
        first = pick([f"Hi {name}! {thing.capitalize()} in {place} sounds lovely. How was it on {day}?",
                      f"Hello {name}, {n1} times already? {thing.capitalize()} must have won you over.",
                      f"Nice to meet you, {name}! What made you pick {thing} on {day}?",
                      f"{thing.capitalize()} in {place}, what a good way to spend a {day}, {name}."])
        second = pick([f"{n2} minutes is worth it, {name}. Enjoy {other}, and tell me how it goes!",
                       f"{other.capitalize()} sounds like a fine next step. Take your time with it.",
                       f"Good plan, {name}. Many people in {place} like {other} too.",
                       f"Then {other} it is! Let me know what you think of it."])
        messages = [
            {"content": f"Hi, I'm {name} from {place}. On {day} I tried {thing}, {n1} times so far.", "role": "user"},
            {"content": first, "role": "assistant"},
            {"content": f"It took about {n2} minutes, and next time I want {other}.", "role": "user"},
            {"content": second, "role": "assistant"}]
        rows.append({"full_topic": f"Everyday talk/{topic.capitalize()}/{thing}", "messages": messages})
    return rows


def smoltalk(cache: Path, train: int = 600, test: int = 64) -> Path:
    """A stand-in for HuggingFaceTB/smoltalk's everyday-conversations config, laid out as the Hub has it."""
    card_text = card("apache-2.0", "configs:\n" + SMOLTALK_CONFIGS, "language:\n- en\ntags:\n- synthetic\n")
    train_rows, test_rows = smoltalk_rows(train, 0), smoltalk_rows(test, 1)
    return lay_out(cache, SMOLTALK, {
        "README.md": card_text,
        "data/everyday-conversations/train-00000-of-00001.parquet": parquet_bytes(train_rows),
        "data/everyday-conversations/test-00000-of-00001.parquet": parquet_bytes(test_rows)})
