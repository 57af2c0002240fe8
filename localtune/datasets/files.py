"""Rows out of data files: JSON Lines (plain or gzip), JSON, CSV and Parquet.

Every row comes with where it was read, `file:line` (or `file: row group G, row R` in Parquet),
so an error later on can name it. A file that does not parse stops with that place.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Iterator

from ..errors import DataError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".parquet")


def kind(path: Path) -> str | None:
    """The file's type by its name, or None for a file that holds no rows (README.md, .gitattributes)."""
    name = path.name.lower()
    return next((s.lstrip(".") for s in SUFFIXES if name.endswith(s)), None)


def rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of a data file."""
    k = kind(path)
    if k in ("jsonl", "jsonl.gz"):
        yield from _jsonl(path)
    elif k in ("json", "json.gz"):
        yield from _json(path)
    elif k == "csv":
        yield from _csv(path)
    elif k == "parquet":
        yield from _parquet(path)
    else:
        raise DataError(f"{path}: not a data file localtune reads\n  fix: use {', '.join(SUFFIXES)}")


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_all(path: Path) -> str:
    with _open(path) as f:
        try:
            raw = f.read()
        except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz
            raise DataError(f"{path}: cannot be read ({e})\n  fix: download or compress the file again") from None
    return _text(raw, str(path))


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with _open(path) as f:
        try:
            for n, raw in enumerate(f, 1):
                where = f"{path}:{n}"
                line = _text(raw, where)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})\n"
                                    "  fix: one JSON object per line (JSON Lines)") from None
                yield where, _object(row, where)
        except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz
            raise DataError(f"{path}: cannot be read ({e})\n  fix: download or compress the file again") from None


def _text(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)\n"
                        "  fix: save the file as UTF-8") from None


def _object(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _json(path: Path) -> Iterator[tuple[str, dict]]:
    """A JSON array of objects, or an object holding one (`{"data": [...]}`); the line of each
    object is found by the parser's offsets."""
    text = _read_all(path)
    try:
        doc = json.loads(text)
    except ValueError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json
            yield from _jsonl(path)
            return
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    lines = _object_lines(text, len(doc)) if isinstance(doc, list) else None
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of row objects (or an object holding one list of "
                            f"them); got an object with keys {sorted(doc)[:8]}\n"
                            "  fix: save the rows as a JSON array, or as JSON Lines (.jsonl)")
        doc = doc[lists[0]]
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON array of row objects, got {type(doc).__name__}")
    for i, row in enumerate(doc):
        where = f"{path}:{lines[i]}" if lines else f"{path}: item {i + 1}"
        yield where, _object(row, where)


def _object_lines(text: str, count: int) -> list[int] | None:
    """The line each top-level array item starts on (decoding item by item), or None."""
    decoder, out = json.JSONDecoder(), []
    i = text.find("[") + 1
    try:
        while len(out) < count:
            while text[i] in " \t\r\n,":
                i += 1
            out.append(text.count("\n", 0, i) + 1)
            _, i = decoder.raw_decode(text, i)
    except (ValueError, IndexError):
        return None
    return out


def _csv(path: Path) -> Iterator[tuple[str, dict]]:
    text = _read_all(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or None in row.values():  # more (or fewer) cells than header names
                cells = len(reader.fieldnames) + len(row.get(None, ())) - sum(v is None for v in row.values())
                raise DataError(f"{where}: {cells} cells but the header names {len(reader.fieldnames)} columns\n"
                                "  fix: quote cells that hold commas or line breaks")
            yield where, {k: v for k, v in row.items() if k}
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})\n  fix: download or write the file again") from None
    for g in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(g)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: row group {g} cannot be read ({e})\n"
                            "  fix: download or write the file again") from None
        for r, row in enumerate(table.to_pylist()):
            yield f"{path}: row group {g}, row {r}", row
