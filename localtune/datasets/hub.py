"""`hf:owner/name` datasets: the files of one config and split, from the Hugging Face cache.

Only the files the split needs (and the dataset card) are downloaded, once, with huggingface-hub
into the normal cache; huggingface-hub writes each file beside its final name and renames it, so
nothing is cached half-written. Afterwards they are read offline. Which files a split needs comes
from the card's `configs:` (the Hub's own data_files), else from the Hub's naming conventions:
a split's name in the file or folder name (train, validation/valid/dev, test), a config's folder.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
import re
from pathlib import Path, PurePosixPath

from ..errors import DataError
from . import files as data_files

REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SPLIT_NAMES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}


def snapshot(ref: str, split: str | None, config: str | None, revision: str | None, glob: str | None):
    """(snapshot folder, the split's files, the card or None) of an `hf:owner/name` dataset."""
    repo = ref[3:]
    if not REPO.fullmatch(repo):
        raise DataError(f'{ref}: not a Hugging Face dataset id\n  fix: write data = "hf:owner/name", '
                        'e.g. "hf:HuggingFaceH4/ultrafeedback_binarized"')
    folder = _cached(repo, revision)
    if folder is not None:
        present = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
        meta = card_meta(folder / "README.md")
        wanted = select(present, meta, split, config, glob, ref, partial=True)
        if wanted:
            return folder, [folder / p for p in wanted], card_of(folder)
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        what = "the split is not" if folder else "not"
        raise DataError(f"{ref}: {what} in the local Hugging Face cache, and HF_HUB_OFFLINE=1\n"
                        f"  fix: on a machine with network, run `{command(repo, revision, split, config, glob)}`")
    return _download(repo, revision, split, config, glob, ref)


def command(repo: str, revision, split, config, glob) -> str:
    """The download command for exactly what a recipe reads (a superset when conventions decide)."""
    include = glob or (f"*{config}/*{split or 'train'}*" if config else f"*{split or 'train'}*")  # fnmatch: * spans /
    rev = f" --revision {revision}" if revision else ""
    return f'hf download {repo} --repo-type dataset{rev} --include "{include}" --include README.md'


def _cached(repo: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, in any of huggingface-hub's ways of saying so
        return None


def _download(repo, revision, split, config, glob, ref):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    how = f"  fix: check the id and your network, or run `{command(repo, revision, split, config, glob)}`"
    try:
        listing = HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
        meta = {}
        if "README.md" in listing:
            meta = card_meta(Path(hf_hub_download(repo, "README.md", repo_type="dataset", revision=revision)))
        wanted = select(listing, meta, split, config, glob, ref)
        folder = Path(snapshot_download(repo, repo_type="dataset", revision=revision,
                                        allow_patterns=wanted + ["README.md"]))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise DataError(f"{ref}: could not download from the Hugging Face hub ({type(e).__name__}: {first})\n"
                        + how) from None
    return folder, [folder / p for p in wanted], card_of(folder)


def card_of(folder: Path) -> Path | None:
    """The dataset card beside data files (or in a Hub snapshot), if there is one."""
    return folder / "README.md" if (folder / "README.md").is_file() else None


def card_meta(path: Path) -> dict:
    from ..integrity.evidence import read_card

    card = read_card(path) if path.is_file() else None
    return card.meta if card else {}


def select(paths: list[str], meta: dict, split, config, glob, ref: str, partial: bool = False) -> list[str]:
    """The data files of a config's split among `paths` (repo-relative). With `partial` (a cache that
    may hold only some files), finding none is not an error: the caller downloads."""
    data = [p for p in paths if data_files.kind(PurePosixPath(p)) and not p.startswith(".")]
    if glob:
        found = [p for p in data if fnmatch.fnmatch(p, glob)]
        if not found and not partial:
            raise DataError(f"{ref}: no file matches files = {glob!r}; the dataset has {_some(data)}")
        return found
    configs = [c for c in meta.get("configs") or [] if isinstance(c, dict)]
    if configs:
        return _from_configs(data, configs, split, config, ref, partial)
    if config:
        data = [p for p in data if p.startswith(f"{config}/") or f"/{config}/" in p]
        if not data and not partial:
            raise DataError(f"{ref}: no files under a folder named {config!r} (config = {config!r})\n"
                            "  fix: remove config, or name one of the dataset's folders")
    by_split = {}
    for p in data:
        by_split.setdefault(split_of(p), []).append(p)
    want = _split_name(split or "train")
    if want in by_split:
        return by_split[want]
    if not split and set(by_split) == {None}:
        return by_split[None]  # no file names a split: all of them are "train"
    if partial:
        return []
    named = sorted(s for s in by_split if s)
    fix = f"set split = {named[0]!r}" if named else 'choose the files with files = "*.parquet" (a glob)'
    raise DataError(f"{ref}: no {want!r} split; its files name the splits {', '.join(named) or 'none'}\n"
                    f"  fix: {fix}")


def split_of(path: str) -> str | None:
    """The split a file's name or folders name, by the Hub's conventions, or None."""
    parts = re.split(r"[/_.\-]", path.lower())
    for split, names in SPLIT_NAMES.items():
        if any(n in parts for n in names):
            return split
    return None


def _split_name(split: str) -> str:
    return next((s for s, names in SPLIT_NAMES.items() if split in names), split)


def _from_configs(data, configs, split, config, ref, partial) -> list[str]:
    names = [str(c.get("config_name", "default")) for c in configs]
    if config is None:
        chosen = next((c for c in configs if c.get("default")), None) or (configs[0] if len(configs) == 1 else None)
        chosen = chosen or next((c for c in configs if c.get("config_name") == "default"), None)
        if chosen is None:
            raise DataError(f"{ref}: the dataset has {len(names)} configs: {', '.join(names)}\n"
                            f"  fix: choose one with config = {names[0]!r}")
    else:
        chosen = next((c for c in configs if str(c.get("config_name", "default")) == config), None)
        if chosen is None:
            close = difflib.get_close_matches(config, names, n=1)
            raise DataError(f"{ref}: no config {config!r}." + (f' Did you mean "{close[0]}"?' if close else "")
                            + f"\n  fix: use one of {', '.join(names)}")
    splits = _data_files(chosen.get("data_files"))
    if not splits and chosen.get("data_dir"):  # a config by folder: the split conventions inside it
        inside = [p for p in data if p.startswith(str(chosen["data_dir"]).rstrip("/") + "/")]
        return select(inside, {}, split, None, None, ref, partial)
    if not splits:
        raise DataError(f"{ref}: the card's config {chosen.get('config_name', 'default')!r} names no data_files "
                        "and no data_dir\n  fix: choose the files with files = \"data/*.parquet\" (a glob)")
    name = split or "train"
    if name not in splits:
        raise DataError(f"{ref}: config {chosen.get('config_name', 'default')!r} has no split {name!r}; it has "
                        f"{', '.join(splits)}\n  fix: set split = {next(iter(splits))!r}")
    found = [p for p in data if any(fnmatch.fnmatch(p, pat) for pat in splits[name])]
    if not found and not partial:
        raise DataError(f"{ref}: the card's data_files for split {name!r} ({', '.join(splits[name])}) match no file")
    return found


def _data_files(value) -> dict[str, list[str]]:
    """A card's data_files (a pattern, a list of them, or [{split, path}]) as split -> patterns."""
    if isinstance(value, str):
        return {"train": [value]}
    out: dict[str, list[str]] = {}
    if isinstance(value, dict):  # {split: pattern(s)}
        return {str(k): [v] if isinstance(v, str) else list(v or []) for k, v in value.items()}
    for item in value or []:
        if isinstance(item, str):
            out.setdefault("train", []).append(item)
        elif isinstance(item, dict):
            paths = item.get("path")
            paths = [paths] if isinstance(paths, str) else paths or []
            out.setdefault(str(item.get("split", "train")), []).extend(paths)
    return out


def _some(paths: list[str]) -> str:
    if not paths:
        return "no data files"
    return ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
