"""Data as users have it: local files and folders in the common formats, and Hugging Face datasets,
read into the canonical rows localtune's methods encode (see formats.py).

    table = read(Spec("hf:HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", limit=2000),
                 accept=("preference",))
    table.rows, table.fmt, table.where[i], table.detected
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import files as data_files
from . import formats, hub


@dataclass(frozen=True)
class Spec:
    """Where a stage's rows come from and which of them it takes (the recipe's data keys)."""

    ref: str  # a file or folder (relative to base_dir), or hf:owner/name
    split: str | None = None
    config: str | None = None
    revision: str | None = None
    files: str | None = None  # a glob over the dataset's files
    limit: int = 0  # 0: every row
    shuffle_seed: int | None = None  # shuffle before `limit`
    columns: dict | None = None  # canonical column -> the source's column
    base_dir: str = "."

    @property
    def is_hub(self) -> bool:
        return self.ref.startswith("hf:")

    def path(self) -> Path:
        """As Recipe.resolve: relative to the recipe's folder, unless it exists from the current one."""
        p = Path(self.ref).expanduser()
        return p if p.is_absolute() or p.exists() else Path(self.base_dir) / p


def spec_of(recipe, stage, valid: bool = False) -> Spec:
    """A stage's training data (or its `valid` data, which takes `valid_split` and no row selection)."""
    if valid:
        hub_ = stage.valid.startswith("hf:")
        if hub_ and not stage.valid_split:
            raise DataError(f"{recipe.source}: [stages.{stage.name}] valid = {stage.valid!r} names no split, so "
                            "it would read the training split\n  fix: add valid_split = \"validation\" (or "
                            "\"test\", as the dataset names it)")
        return Spec(stage.valid, stage.valid_split, stage.config if hub_ else None, stage.revision if hub_ else None,
                    None, 0, None, stage.columns, recipe.base_dir)
    return Spec(stage.data, stage.split, stage.config, stage.revision, stage.files, stage.limit, stage.shuffle_seed,
                stage.columns, recipe.base_dir)


def eval_spec(recipe) -> Spec | None:
    """The recipe's golden set ([eval] data); an hf: golden set reads its test split unless told."""
    e = recipe.eval
    if not e.data:
        return None
    spec = Spec(e.data, e.split, e.config, base_dir=recipe.base_dir)
    if not e.split and (spec.is_hub or _names_splits(spec.path())):
        spec = Spec(e.data, "test", e.config, base_dir=recipe.base_dir)  # never a golden set's train split
    return spec


def _names_splits(path: Path) -> bool:
    return path.is_dir() and any(hub.split_of(p.relative_to(path).as_posix()) for p in path.rglob("*")
                                 if p.is_file() and data_files.kind(p))


@dataclass
class Source:
    ref: str
    files: list[Path]
    card: Path | None  # the dataset card (README.md) beside the data, or the Hub snapshot's


@dataclass
class Table:
    rows: list[dict]
    fmt: str  # the canonical format
    where: list[str]  # each row's file:line (or Parquet row group and row)
    detected: str  # what was found, in words: "ShareGPT conversations (conversations: from/value), 2 files"
    source: Source


def resolve(spec: Spec) -> Source:
    """The data files a spec names."""
    if spec.is_hub:
        _, found, card = hub.snapshot(spec.ref, spec.split, spec.config, spec.revision, spec.files)
        return Source(spec.ref, found, card)
    path = spec.path()
    if not path.exists():
        raise DataError(f"{path}: no such data file or folder\n  fix: check the stage's data = ... path "
                        "(relative paths are resolved from the recipe's folder), or use hf:owner/name for a "
                        "Hugging Face dataset")
    if path.is_file():
        if keys := [k for k in ("split", "config", "revision", "files") if getattr(spec, k)]:
            raise DataError(f"{path}: {', '.join(keys)} choose among a dataset's files, and this is one file\n"
                            f"  fix: remove {', '.join(keys)}, or point data at the folder or hf: dataset")
        if data_files.kind(path) is None:
            raise DataError(f"{path}: localtune reads {', '.join(data_files.SUFFIXES)} files, not "
                            f"{path.suffix or 'files without a suffix'}\n  fix: convert the file, or rename it")
        return Source(str(path), [path], hub.card_of(path.parent))
    found = [p for p in sorted(path.rglob("*")) if p.is_file() and data_files.kind(p)
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    rel = [p.relative_to(path).as_posix() for p in found]
    if spec.files or spec.split or any(hub.split_of(r) for r in rel) or spec.config:
        rel = hub.select(rel, _meta(path), spec.split, spec.config, spec.files, str(path))
        found = [path / r for r in rel]
    if not found:
        raise DataError(f"{path}: the folder holds no data files ({', '.join(data_files.SUFFIXES)})\n"
                        "  fix: point data at a file, or put the data files in this folder")
    return Source(str(path), found, hub.card_of(path))


def _meta(folder: Path) -> dict:
    return hub.card_meta(folder / "README.md")


def iter_rows(source: Source):
    """(where, raw row) over every file of a source, in order."""
    for f in source.files:
        yield from data_files.rows(f)


def read(spec: Spec, accept: tuple | None = None) -> Table:
    """Every row of a spec in its canonical format; the format is detected, or mapped by `columns`.
    `accept`: the canonical formats the reader can use (a stage's method), which settles rows that fit
    several; None takes the most specific."""
    source = resolve(spec)
    raw, where = _select(source, spec)
    if not raw:
        raise DataError(f"{source.ref}: the dataset is empty\n  fix: add at least one row")
    if spec.columns:
        raw = [formats.map_columns(r, spec.columns, w) for r, w in zip(raw, where)]
    shape, found = _detect(raw, where, accept)
    fmt = formats.CANONICAL[shape]
    from ..train.data import check_row

    rows = []
    for r, w in zip(raw, where):
        row = formats.canonical(r, shape, w)
        check_row(row, w, fmt)
        rows.append(row)
    n_files = len(source.files)
    detected = (f"{formats.DESCRIBE[shape]}" + (" via columns" if spec.columns else "")
                + f", {len(rows)} row{'s' * (len(rows) != 1)} from {n_files} file{'s' * (n_files != 1)}")
    if len(found) > 1:
        detected += f" (also fits: {', '.join(formats.DESCRIBE[s] for s in found if s != shape)})"
    return Table(rows, fmt, where, detected, source)


def _select(source: Source, spec: Spec) -> tuple[list[dict], list[str]]:
    """The rows `limit` and `shuffle_seed` choose: the first `limit`, or `limit` of a seeded shuffle."""
    raw, where = [], []
    for w, row in iter_rows(source):
        raw.append(row)
        where.append(w)
        if spec.limit and spec.shuffle_seed is None and len(raw) >= spec.limit:
            break
    if spec.shuffle_seed is not None:
        order = np.random.default_rng(spec.shuffle_seed).permutation(len(raw))[: spec.limit or None]
        raw, where = [raw[i] for i in order], [where[i] for i in order]
    return raw, where


def _detect(raw: list[dict], where: list[str], accept) -> tuple[str, list[str]]:
    """The one shape every row fits; the first row that fits none of the earlier ones stops it."""
    common = None
    for r, w in zip(raw, where):
        found = formats.shapes(r)
        if not found:
            raise DataError(f"{w}: no known format in columns {sorted(r)[:12]}; expected messages, "
                            "conversations (ShareGPT), instruction/output (Alpaca), prompt/completion, text, "
                            "prompt/chosen/rejected or prompt/completion/label\n"
                            '  fix: map the columns, e.g. columns = { prompt = "question", completion = "answer" }')
        now = [s for s in (common or found) if s in found]
        if not now:
            raise DataError(f"{w}: this row is {formats.DESCRIBE[found[0]]}, but the rows before it are "
                            f"{formats.DESCRIBE[common[0]]}; one dataset holds one format\n"
                            "  fix: split the data into one file per format")
        common = now
    return formats.choose(common, accept, where[0]), common


def fingerprint(spec: Spec) -> str:
    """The content of a spec's files and the selection: what a resumed run must see again."""
    source = resolve(spec)
    if len(source.files) == 1 and not (spec.limit or spec.columns or spec.shuffle_seed is not None):
        return sha256(source.files[0])  # one plain file: its hash, as manifests have always recorded
    h = hashlib.sha256(repr((spec.split, spec.config, spec.revision, spec.files, spec.limit, spec.shuffle_seed,
                             sorted((spec.columns or {}).items()))).encode())
    for f in source.files:
        h.update(f.name.encode() + sha256(f).encode())
    return h.hexdigest()


def sha256(path: str | Path) -> str:
    """A file's SHA-256, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_stage(recipe, stage, valid: bool = False) -> Table:
    """A stage's training (or `valid`) rows, in a format its method reads when the rows allow one."""
    from .. import methods

    return read(spec_of(recipe, stage, valid), methods.of(stage).data_formats(stage))
