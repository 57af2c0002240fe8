"""What is wrong with a damaged file, in words a user can act on.

A run directory is copied between Macs, synced and backed up; any of its files can arrive
truncated, empty, overwritten or missing. Every reader goes through these checks, so a damaged
file gives a `DamagedFile` naming the file, the damage ("truncated: 5,000 of 2,720,010 bytes")
and the fix, never a traceback or a silently wrong model.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LocaltuneError

_MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB


class DamagedFile(LocaltuneError):
    exit_code = 1

    def __init__(self, path, problem: str, fix: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}\n  fix: {fix}")


def safetensors_problem(path: str | Path) -> str | None:
    """None for a complete safetensors file, else what is wrong with it (from its header alone)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                return "empty (0 bytes)"
            if len(head) < 8:
                return f"truncated: {size:,} bytes, shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER:
                return f"not a safetensors file ({size:,} bytes of something else, or random bytes)"
            if 8 + n > size:
                return f"truncated: {size:,} bytes, but its header alone is {8 + n:,}"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    except ValueError:  # not UTF-8 or not JSON
        return f"not a safetensors file ({size:,} bytes whose header is not JSON)"
    try:
        end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
    except (AttributeError, TypeError, KeyError, IndexError):
        return "not a safetensors file (its header does not describe tensors)"
    expected = 8 + n + end
    if size < expected:
        return f"truncated: {size:,} of {expected:,} bytes"
    if size > expected:
        return f"{size - expected:,} bytes longer than its header says ({expected:,}): damaged"
    return None


def load_safetensors(path: str | Path, fix: str, metadata: bool = False):
    """mx.load, after the header check; anything MLX still refuses is a DamagedFile too."""
    import mlx.core as mx

    if problem := safetensors_problem(path):
        raise DamagedFile(path, problem, fix)
    try:
        return mx.load(str(path), return_metadata=metadata)
    except (RuntimeError, ValueError, OSError) as e:
        raise DamagedFile(path, f"cannot be read ({e})", fix) from None


def json_problem(path: str | Path) -> tuple[str | None, dict | None]:
    """(what is wrong, None) or (None, the JSON object)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return "missing", None
    except OSError as e:
        return f"cannot be read: {e.strerror or e}", None
    if not raw.strip():
        return f"empty ({len(raw):,} bytes)", None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"not text ({len(raw):,} bytes that are not UTF-8: overwritten, or random bytes)", None
    try:
        value = json.loads(text)
    except ValueError as e:
        if getattr(e, "pos", 0) >= len(text.rstrip()):
            return f"truncated: its JSON stops after {len(raw):,} bytes", None
        return f"not valid JSON: {getattr(e, 'msg', e)} at line {e.lineno}, column {e.colno}", None
    if not isinstance(value, dict):
        return f"not a JSON object (a {type(value).__name__})", None
    return None, value


def read_json(path: str | Path, fix: str) -> dict:
    problem, value = json_problem(path)
    if problem:
        raise DamagedFile(path, problem, fix)
    return value


def read_text(path: str | Path, fix: str) -> str:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DamagedFile(path, "missing", fix) from None
    except OSError as e:
        raise DamagedFile(path, f"cannot be read: {e.strerror or e}", fix) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedFile(path, f"not text ({len(raw):,} bytes that are not UTF-8: overwritten, or random "
                                "bytes)", fix) from None
