"""The firewall between training data and the golden set: exact and near duplicates.

Every row becomes normalised text (NFKC, lower case, punctuation dropped, whitespace collapsed).
Exact duplicates share that text. Near duplicates share word n-grams (13 by default): a golden
row is near-duplicated by a training row when at least `near` of its n-grams occur in that one
training row. A row shorter than n words is compared whole, as one n-gram. Golden n-grams go in
one hash table, so training rows are each read once: O(train + golden) n-grams, not O(train x golden).
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from ..errors import DataError

WORD = re.compile(r"\w+")


class Contaminated(DataError):
    exit_code = 2


def row_text(row: dict) -> str:
    """Everything a row says: prompt and answers, or messages, or text."""
    parts = []
    for key in ("prompt", "completion", "chosen", "rejected", "text", "messages"):
        value = row.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts += [_message_text(m) for m in value if isinstance(m, dict)]
    return " ".join(parts)


def _message_text(m: dict) -> str:
    """A message's content and its tool calls (name and arguments): a golden call is compared too."""
    parts = [str(m.get("content") or "")]
    for call in m.get("tool_calls") or []:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if isinstance(fn, dict):
            args = fn.get("arguments")
            parts += [str(fn.get("name", "")), args if isinstance(args, str) else json.dumps(args)]
    return " ".join(parts)


def words(text: str) -> list[str]:
    return WORD.findall(unicodedata.normalize("NFKC", text).lower())


def ngrams(ws: list[str], n: int) -> set[int]:
    if len(ws) < n:
        return {hash(" ".join(ws))} if ws else set()
    return {hash(" ".join(ws[i:i + n])) for i in range(len(ws) - n + 1)}


def read_rows(ref) -> list[tuple[str, dict]]:
    """(where, canonical row) for every row of a data source: a file or folder in any format
    localtune reads, an hf: dataset, or a datasets.Spec (a stage's columns and row selection)."""
    from .. import datasets

    spec = ref if isinstance(ref, datasets.Spec) else datasets.Spec(str(ref))
    table = datasets.read(spec)
    return list(zip(table.where, table.rows))


@dataclass
class Overlap:
    golden: str  # file:line
    train: str  # file:line
    kind: str  # exact | near
    score: float  # share of the golden row's n-grams found in the training row
    text: str  # the golden row, shortened


@dataclass
class Report:
    train_rows: int
    golden_rows: int
    n: int
    near: float
    overlaps: list = field(default_factory=list)

    @property
    def contaminated(self) -> int:
        """Golden rows with at least one exact or near duplicate in training."""
        return len({o.golden for o in self.overlaps})

    @property
    def share(self) -> float:
        return self.contaminated / max(self.golden_rows, 1)

    def to_dict(self) -> dict:
        kinds = Counter(o.kind for o in self.overlaps)  # exact | near
        return {"train_rows": self.train_rows, "golden_rows": self.golden_rows, "ngram": self.n, "near": self.near,
                "contaminated_golden_rows": self.contaminated, "share": self.share,
                "exact": kinds["exact"], "near_duplicates": kinds["near"],
                "overlaps": [asdict(o) for o in self.overlaps]}

    def lines(self, limit: int = 10) -> list[str]:
        out = [f"{self.contaminated} of {self.golden_rows} golden rows ({self.share:.1%}) overlap "
               f"{self.train_rows} training rows ({self.n}-grams, near >= {self.near:.0%})"]
        for o in self.overlaps[:limit]:
            what = {"exact": "exact duplicate"}.get(o.kind) or f"near duplicate ({o.score:.0%} of its {self.n}-grams)"
            out.append(f"  {o.train} is an {what} of golden {o.golden}: {o.text!r}")
        if len(self.overlaps) > limit:
            out.append(f"  ... and {len(self.overlaps) - limit} more (--json lists them all)")
        return out


def check(train: list[tuple[str, dict]], golden: list[tuple[str, dict]], n: int = 13, near: float = 0.5) -> Report:
    """Every golden row against every training row (see the module docstring)."""
    exact: dict[str, str] = {}
    index: dict[int, list[int]] = defaultdict(list)
    sizes = []
    for g, (_, row) in enumerate(golden):
        ws = words(row_text(row))
        if ws:
            exact.setdefault(" ".join(ws), g)
        grams = ngrams(ws, n)
        sizes.append(len(grams))
        for h in grams:
            index[h].append(g)
    report = Report(len(train), len(golden), n, near)
    for where, row in train:
        ws = words(row_text(row))
        g = exact.get(" ".join(ws))
        if g is not None:
            report.overlaps.append(Overlap(golden[g][0], where, "exact", 1.0, row_text(golden[g][1])[:80]))
            continue
        hits = Counter(g for h in ngrams(ws, n) for g in index.get(h, ()))
        for g, shared in hits.items():
            score = shared / sizes[g]
            if score >= near:
                report.overlaps.append(Overlap(golden[g][0], where, "near", score, row_text(golden[g][1])[:80]))
    return report


def check_files(train_paths, golden_paths, n: int = 13, near: float = 0.5) -> Report:
    """Sources (paths, hf: ids or datasets.Spec) against sources."""
    train = [r for p in train_paths for r in read_rows(p)]
    golden = [r for p in golden_paths for r in read_rows(p)]
    return check(train, golden, n, near)


def clean_split(rows: list[tuple[str, dict]], fraction: float, seed: int, n: int = 13, near: float = 0.5):
    """(train, test) rows with no exact or near duplicate across them: test rows are drawn at random,
    then every training row that duplicates one is moved to the test side with it."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(rows))
    k = max(1, int(round(len(rows) * fraction)))
    test = [rows[i] for i in sorted(order[:k])]
    train = [rows[i] for i in sorted(order[k:])]
    moved = 0
    while overlaps := {o.train for o in check(train, test, n, near).overlaps}:  # until no row links them
        test += [r for r in train if r[0] in overlaps]
        train = [r for r in train if r[0] not in overlaps]
        moved += len(overlaps)
    return train, test, moved
