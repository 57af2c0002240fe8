"""A model's `base_model` chain. A fine-tune cannot relicense its base: a Llama 3 fine-tune
labelled Apache-2.0 is still bound by the Llama 3 license, so the strictest license along the
chain decides.

The chain is followed through cards on this machine only (a local folder's README.md, or the
Hugging Face cache; never a download). A base whose card is not here is judged by its name when
the family table places it, and the finding says so; a base nobody can place is a warning naming
it, never a silent allow. Cycles are cut and the depth is capped.
"""
from __future__ import annotations

from pathlib import Path

from .evidence import (
    ORDER,
    Card,
    Finding,
    as_list,
    cached_card,
    closed_api,
    closed_finding,
    license_findings,
    open_family,
    read_other_card,
)

MAX_DEPTH = 8  # fine-tunes of fine-tunes rarely go past three or four


def card_bases(card: Card) -> list[tuple[str, str]]:
    """(base, evidence) for each base model a card's front matter names (a string or a list)."""
    return [(str(b).strip(), f"{card.where_item('base_model', b)}: base_model: {b}")
            for b in as_list(card.meta.get("base_model")) if str(b).strip()]


def chain_findings(bases: list[tuple[str, str]], folder: Path, own: str | None, seen: set | None = None
                   ) -> list[Finding]:
    """Findings for every model along the chain from `bases`; `own` is the model's own license."""
    findings: list[Finding] = []
    seen = set() if seen is None else seen
    queue = [(base, [evidence], folder, 1) for base, evidence in bases]
    while queue:
        base, trail, here, depth = queue.pop(0)
        api = closed_api(base)
        if api:
            findings.append(closed_finding(api, trail, "the card names as its base" if depth == 1
                                           else "the base_model chain reaches"))
            continue
        card_path = _base_card(base, here)
        key = str(card_path.resolve()) if card_path else base.lower()
        if key in seen:
            continue  # a cycle, or a base reached twice (merges)
        seen.add(key)
        if depth > MAX_DEPTH:
            findings.append(Finding("warn", "provenance:base-chain-depth", f"the base_model chain is deeper than "
                                    f"{MAX_DEPTH} models; localtune stopped at {base!r}", trail[-3:],
                                    conditions=[f"check the licenses of {base} and the models it derives from"]))
            continue
        card, unreadable = read_other_card(card_path, base, trail) if card_path else (None, None)
        if unreadable:
            findings.append(unreadable)
        elif card is not None:
            findings += _card_license(base, card, trail, own)
            queue += [(b, trail + [e], card.path.parent, depth + 1) for b, e in card_bases(card)]
        else:
            findings += _by_name(base, trail, own)
    return findings


def _base_card(base: str, here: Path) -> Path | None:
    """A base's card on this machine: a local folder (relative to the citing card), or the HF cache."""
    local = Path(base) if Path(base).is_absolute() else here / base
    if "/" in base and local.is_dir():
        return local / "README.md" if (local / "README.md").is_file() else None
    return cached_card(base)


def _card_license(base: str, card: Card, trail: list[str], own: str | None) -> list[Finding]:
    license_id, license_name = card.meta.get("license"), card.meta.get("license_name")
    if not (license_id or license_name):
        return _by_name(base, trail + [f"{card.path}: its card states no license"], own, "whose card states no license")
    shown = license_name if str(license_id).lower() == "other" and license_name else license_id
    evidence = trail + [f"{card.where('license')}: license: {shown}"]
    return _lifted(license_findings(license_id, license_name, evidence[-1], "base model"), base, evidence, own, "")


def _by_name(base: str, trail: list[str], own: str | None, why: str = "with no card on this machine"
             ) -> list[Finding]:
    license = open_family(base)
    if license is None:
        return [Finding("warn", "provenance:unknown-base", f"the base model {base!r}, {why}, has a name localtune "
                        "cannot place; a fine-tune inherits its base's license", list(trail),
                        conditions=[f"check that {base}'s license allows what this model's own license "
                                    f"({own or 'none'}) claims, and training other models on its outputs (or cache "
                                    f"its card: hf download {base} README.md)"])]
    evidence = trail + [f"{base}: the {license} family by its name"]
    return _lifted(license_findings(license, None, evidence[-1], "base model"), base, evidence, own,
                   f"; judged from the base's name, {why}")


def _lifted(found: list[Finding], base: str, evidence: list[str], own: str | None, note: str) -> list[Finding]:
    """A base's license findings, reworded as the chain's and carrying the whole chain as evidence."""
    own_rank = _rank(own)
    for f in found:
        license = f.rule.removeprefix("license:")
        f.reason = f"its base model {base} is under {license}: {f.reason}{note}"
        if own and license != str(own).lower() and ORDER[f.verdict] > own_rank:
            f.reason += f"; the card's own license ({own}) cannot lift its base's terms"
        f.evidence = list(evidence)
    return found


def _rank(license: str | None) -> int:
    if not license:
        return ORDER["warn"]
    return max(ORDER[f.verdict] for f in license_findings(license, None, "", "model"))


def strictest(own: str | None, findings: list[Finding]) -> str | None:
    """The license that decides: the worst license finding along the chain, or the model's own."""
    worst, rank = own, _rank(own) if own else -1
    for f in findings:
        if f.rule.startswith("license:") and ORDER[f.verdict] > rank:
            worst, rank = f.rule.removeprefix("license:"), ORDER[f.verdict]
    return worst
