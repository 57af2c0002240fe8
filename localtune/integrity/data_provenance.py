"""The provenance gate for a dataset: its rows' generator fields, its card (license, tags,
`source_datasets`, text), and the table of widely used generated datasets.

`check_dataset` takes what any reader produces (a reference, its files, its card, and rows as
(where, dict) pairs from JSONL, Parquet or anything else); `check_data` resolves a data source
(a path or hf:owner/name) with localtune.datasets and reads its rows. An upstream dataset is
judged by the table, or by its own card when one is on this machine; one that neither can judge
is a warning naming it, never a silent allow.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .evidence import (
    Card,
    Finding,
    Source,
    as_list,
    cached_card,
    card_text_findings,
    closed_api,
    closed_finding,
    license_findings,
    open_family,
    read_card,
    read_other_card,
)
from .known_datasets import KnownDataset, known_dataset
from .policy import CLOSED_APIS

GENERATOR_KEYS = ("model", "generator", "source", "model_name", "generated_by", "teacher", "annotator",
                  "chosen_model", "rejected_model")
RECORDS_SCANNED = 100_000  # rows read for generator fields
UPSTREAM_DEPTH = 4  # datasets built from datasets built from ... (cards on this machine only)


def check_data(ref: str | Path, spec=None) -> Source:
    """A data source as the user names it: a file or folder in any format localtune reads, or
    hf:owner/name (a snapshot in the HF cache). `spec` (a datasets.Spec) carries a stage's split,
    config and file glob; rows are read raw, before any `columns` mapping, for their generator fields."""
    from .. import datasets

    spec = spec or datasets.Spec(str(ref))
    found = datasets.resolve(spec)
    return check_dataset(str(ref), found.files, found.card, datasets.iter_rows(found), spec.config)


def check_dataset(ref: str, files: list[Path], card: Path | None,
                  rows: Iterable[tuple[str, dict]] | None = None, config: str | None = None) -> Source:
    """A dataset from any source: `ref` as the user wrote it (a path, or `hf:owner/name`), its data
    files, its card, its rows as (where, record) pairs (without rows, JSONL files are read), and the
    config a recipe takes of it."""
    source = Source("data", ref)
    generated: dict[str, list[str]] = {}
    named: set[str] = set()  # names seen under a key other than `source`
    scan_rows(_jsonl_rows(files) if rows is None else rows, generated, named)
    _generator_findings(source, generated, named)
    known = known_dataset(ref, config) if ref.startswith("hf:") else None  # a local folder named "alpaca" is the user's
    if known:
        taken = f" (config {config})" if config else ""
        source.findings += known_findings(known, [f"{ref}{taken}: {known.name} in localtune's table ({known.cite})"],
                                          "the dataset")
    parsed = read_card(card) if card else None
    if parsed is None:
        if not generated and not known:
            source.findings.append(Finding("warn", "provenance:unknown", "no dataset card (README.md) beside the "
                                           "data and no generator fields in its records", [ref],
                                           conditions=["add a README.md card with license and source_datasets, "
                                                       "or check the data's origin yourself"]))
        return source
    card_findings(source, parsed, seen={str(parsed.path.resolve())}, depth=0)
    return source


def card_findings(source: Source, card: Card, seen: set, depth: int) -> None:
    """What a dataset card says: its license, tags, upstream datasets, and text."""
    meta = card.meta
    source.license = (meta.get("license_name") if str(meta.get("license")).lower() == "other" else meta.get(
        "license")) or source.license
    source.findings += license_findings(meta.get("license"), meta.get("license_name"),
                                        f"{card.where('license')}: license: {meta.get('license')}", "dataset")
    for tag in as_list(meta.get("tags")):
        api = closed_api(str(tag))
        if api:
            source.findings.append(closed_finding(api, [f"{card.where_item('tags', tag)}: tags: {tag}"],
                                                  "the card tags the data as from"))
    source.findings += upstream_findings(card, seen, depth)
    source.findings += card_text_findings(card)
    machine = [k for k in ("language_creators", "annotations_creators")
               if "machine-generated" in [str(v).lower() for v in as_list(meta.get(k))]]
    if machine and not any(_names_generator(f) for f in source.findings):
        source.findings.append(Finding(
            "warn", "provenance:machine-generated", "the card says the data are machine-generated but names no "
            "model that generated them", [f"{card.where_item(k, 'machine-generated')}: {k}: machine-generated"
                                          for k in machine],
            conditions=["find which model generated the data and check that its terms allow training other models"]))


def _names_generator(f: Finding) -> bool:
    """Whether a finding already says which model (or upstream) produced the data."""
    return (f.rule.startswith("closed-api:") or f.rule.startswith("provenance:unknown-")
            or f.reason.startswith(("records ", "upstream ", "the dataset was written")))


# ---------------------------------------------------------------------------------------------
# Upstream datasets


def upstream_findings(card: Card, seen: set, depth: int) -> list[Finding]:
    """Each `source_datasets` entry judged by the table, or by its own card on this machine."""
    findings, unknown = [], []
    for upstream in as_list(card.meta.get("source_datasets")):
        name = _upstream_name(str(upstream))
        if name is None:
            continue
        where = f"{card.where_item('source_datasets', upstream)}: source_datasets: {upstream}"
        known = known_dataset(name)
        if known:
            findings += known_findings(known, [where, f"{known.name}: {known.cite}"], f"upstream {name}")
            continue
        up_card = _upstream_card(name, card.path.parent)
        if up_card is None:
            unknown.append((name, where))
        elif depth >= UPSTREAM_DEPTH:
            findings.append(Finding("warn", "provenance:upstream-depth", f"upstream {name} is more than "
                                    f"{UPSTREAM_DEPTH} datasets deep; localtune stopped there", [where],
                                    conditions=[f"check how {name} and the datasets it was built from were made"]))
        elif str(up_card.resolve()) not in seen:  # a dataset reached twice, or a cycle
            seen.add(str(up_card.resolve()))
            parsed, unreadable = read_other_card(up_card, name, [where])
            findings += [unreadable] if unreadable else _from_upstream_card(name, where, parsed, seen, depth)
    if unknown:
        names = ", ".join(n for n, _ in unknown)
        findings.append(Finding(
            "warn", "provenance:unknown-upstream", f"the card names upstream datasets localtune cannot judge: "
            f"{names} (not in its table of generated datasets, and no card on this machine)", [w for _, w in unknown],
            conditions=[f"check how {n} was made: if a model wrote it, that model's terms bind this data too "
                        f"(to let localtune read its card: hf download {n} README.md --repo-type dataset)"
                        for n, _ in unknown]))
    return findings


def _upstream_name(value: str) -> str | None:
    """A `source_datasets` value as a dataset id: the Hub's "original" means none, and
    "extended|squad" names squad."""
    value = value.strip()
    if value.lower().startswith("extended|"):
        value = value.split("|", 1)[1].strip()
    if not value or value.lower() in ("original", "extended", "other"):
        return None
    return value


def _upstream_card(name: str, here: Path) -> Path | None:
    local = Path(name) if Path(name).is_absolute() else here / name
    if local.is_dir():
        return local / "README.md" if (local / "README.md").is_file() else None
    return cached_card(name, "dataset")


def _from_upstream_card(name: str, where: str, card: Card, seen: set, depth: int) -> list[Finding]:
    """An upstream's own card, judged as a dataset's, its findings carried with the path to it."""
    upstream = Source("data", name)
    card_findings(upstream, card, seen, depth + 1)
    for f in upstream.findings:
        f.reason = f"upstream {name}: {f.reason}"
        f.evidence = [where] + list(f.evidence)
    return upstream.findings


def known_findings(known: KnownDataset, evidence: list[str], what: str) -> list[Finding]:
    """A table row's findings: a closed API among its generators blocks, an open-weight one brings
    its license's finding, people writing it brings none; then the dataset's own license."""
    findings = []
    for generator in known.generators:
        api = next((a for a in CLOSED_APIS if a.key == generator), None)
        if api:
            findings.append(closed_finding(api, list(evidence), f"{what} was written by {known.who}, from"))
        elif generator != "human":
            for f in license_findings(generator, None, evidence[0], "generator"):
                f.reason = f"{what} was written by {known.who} ({generator}): {f.reason}"
                f.evidence = list(evidence)
                findings.append(f)
    for f in license_findings(known.license, None, evidence[0], "dataset") if known.license else []:
        f.reason = f"{what} is under {known.license}: {f.reason}"
        f.evidence = list(evidence)
        findings.append(f)
    if not findings:  # people wrote it and the table has no license: still say it was judged
        findings.append(Finding("allow", "provenance:known-dataset", f"{what} was written by {known.who}",
                                list(evidence)))
    return findings


# ---------------------------------------------------------------------------------------------
# Rows


def _generator_findings(source: Source, generated: dict, named: set) -> None:
    for name, where in generated.items():
        api = closed_api(name)
        if api:
            source.findings.append(closed_finding(api, where, f"records name {name!r}, a model of"))
        elif (license := open_family(name)) is not None:
            source.license = source.license or license  # the outputs' license, until a card says more
            for finding in license_findings(license, None, where[0], "generator"):
                finding.reason = f"records were generated by {name!r}: {finding.reason}"
                finding.evidence = where
                source.findings.append(finding)
        elif name in named:  # a `source` may name a corpus, not a model: only the other keys warn
            source.findings.append(Finding("warn", "provenance:unknown-generator",
                                           f"records name the generator {name!r}, which localtune cannot place",
                                           where, conditions=[f"check {name}'s terms allow training on its outputs"]))


def scan_rows(rows: Iterable[tuple[str, dict]], generated: dict, named: set) -> None:
    """Collect generator names from per-row fields, nested ones included (completions[].model)."""
    def walk(value, trail: str, where: str):
        if isinstance(value, dict):
            for k, v in value.items():
                if k in GENERATOR_KEYS and isinstance(v, str) and v.strip():
                    generated.setdefault(v.strip(), []).append(f"{where}: {trail}{k} = {v.strip()!r}")
                    if k != "source":
                        named.add(v.strip())
                elif isinstance(v, (dict, list)):
                    walk(v, f"{trail}{k}.", where)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{trail[:-1]}[{i}].", where)

    for n, (where, record) in enumerate(rows):
        if n >= RECORDS_SCANNED:
            break
        walk(record, "", where)


def _jsonl_rows(files: list[Path]) -> Iterable[tuple[str, dict]]:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # the data reader reports malformed rows with their line
                yield f"{path}:{line_no}", record
