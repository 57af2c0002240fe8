"""License and provenance gate: may these teachers and datasets train this model?

Every source (a distillation teacher, or a stage's data) gets findings (`evidence.py`); a source's
verdict is its worst finding. Unknown provenance is a warning, never a silent allow. A
`[[provenance.attest]]` entry in the recipe turns one source's block into an allow, recorded with
the user's reason; there is no global switch.

The policy tables (CLOSED_APIS, LICENSES) are in `policy.py`, each row with the clause it rests on;
the generated datasets in `known_datasets.py`. Datasets are judged in `data_provenance.py`, a
model's `base_model` chain in `lineage.py`. What travels with adapters and exports is in `bom.py`.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .. import datasets, methods
from ..errors import LocaltuneError
from .data_provenance import GENERATOR_KEYS, RECORDS_SCANNED, check_data, check_dataset  # noqa: F401
from .evidence import (
    ORDER,
    Finding,
    Source,
    cached_card,
    closed_api,
    closed_finding,
    license_findings,
    open_family,
    read_card,
)
from .lineage import card_bases, chain_findings, strictest


class Blocked(LocaltuneError):
    exit_code = 3


@dataclass
class Report:
    sources: list

    @property
    def verdict(self) -> str:
        return max((s.verdict for s in self.sources), key=ORDER.get, default="allow")

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "findings": [s.to_dict() for s in self.sources]}

    def lines(self, quiet_allow: bool = False) -> list[str]:
        out = []
        for s in self.sources:
            if quiet_allow and s.verdict == "allow" and not s.attested:
                continue
            license = f" (license: {s.license})" if s.license else ""
            out.append(f"{s.verdict.upper():5}  {s.kind} {s.ref}{license}")
            if s.attested:
                out.append(f"       attested: {s.attested}")
            for f in s.findings:
                out.append(f"       {f.verdict}: {f.reason} [{f.rule}]")
                out += [f"         evidence: {e}" for e in f.evidence[:3]]
                if len(f.evidence) > 3:
                    out.append(f"         ... and {len(f.evidence) - 3} more")
                if f.citation:
                    out.append(f"         clause: {f.citation}")
                out += [f"         condition: {c}" for c in f.conditions]
        return out


# ---------------------------------------------------------------------------------------------
# Teachers


def check_teacher(ref: str, base_dir: str | Path = ".") -> Source:
    """A teacher: a local folder (card, config.json), a .gguf file, or a bare name / repo id."""
    from ..run import is_run_dir

    source = Source("teacher", ref)
    path = Path(ref) if Path(ref).is_absolute() else Path(base_dir) / ref
    if not path.exists() and Path(ref).exists():
        path = Path(ref)
    if is_run_dir(path):
        _run_teacher(source, path)
    elif path.is_file() and path.suffix == ".gguf":
        _gguf_teacher(source, path)
    elif path.is_dir():
        _folder_teacher(source, path)
    elif ref.startswith("pkg:"):
        from .. import models

        resolved = models.resolve(ref)
        _gguf_teacher(source, resolved) if resolved.suffix == ".gguf" else _folder_teacher(source, resolved)
    else:
        _named_teacher(source, ref)
    return source


def _run_teacher(source: Source, run: Path) -> None:
    """A localtune run as the teacher: its base model, and what its own gate found."""
    from ..run import Run

    manifest = Run.open(run).manifest()
    base = check_teacher(manifest.get("model", {}).get("path", ""), manifest.get("base_dir", "."))
    source.license, source.findings = base.license, list(base.findings)
    for upstream in manifest.get("provenance", {}).get("findings", []):
        if upstream["verdict"] != "allow" or upstream["attested"]:
            verdict = "block" if upstream["verdict"] == "block" else "warn"
            note = f" (attested there: {upstream['attested']})" if upstream["attested"] else ""
            source.findings.append(Finding(verdict, "provenance:teacher-run",
                                           f"the teacher run used {upstream['kind']} {upstream['source']}, "
                                           f"verdict {upstream['verdict']}{note}", [f"{run}/manifest.json"],
                                           conditions=list(upstream["conditions"])))


def _gguf_teacher(source: Source, path: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    meta = {}
    for key in ("general.license", "general.name", "general.license.name"):
        f = reader.fields.get(key)
        if f is not None:
            meta[key] = f.contents()
    source.license = meta.get("general.license")
    source.findings += license_findings(source.license, meta.get("general.license.name"),
                                        f"{path} general.license = {source.license!r}", "teacher")
    if not source.license and meta.get("general.name"):
        _family(source, meta["general.name"], f"{path} general.name = {meta['general.name']!r}")
    chain = chain_findings(_gguf_bases(reader, path), path.parent, source.license)
    source.findings += chain
    source.license = strictest(source.license, chain)


def _gguf_bases(reader, path: Path) -> list[tuple[str, str]]:
    """The base models a GGUF names (general.base_model.N.*), as repo ids where a repo URL says."""
    def field(key):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    bases = []
    for i in range(int(field("general.base_model.count") or 0)):
        url, name = field(f"general.base_model.{i}.repo_url"), field(f"general.base_model.{i}.name")
        if url:
            ref = re.sub(r"^https?://(www\.)?huggingface\.co/", "", str(url)).strip("/")
            bases.append((ref, f"{path} general.base_model.{i}.repo_url = {url!r}"))
        elif name:
            bases.append((str(name), f"{path} general.base_model.{i}.name = {name!r}"))
    return bases


def _folder_teacher(source: Source, folder: Path) -> None:
    card = read_card(folder / "README.md")
    meta = card.meta if card else {}
    license_id, license_name = meta.get("license"), meta.get("license_name")
    if not license_id and (folder / "localtune-import.json").exists():  # an imported GGUF
        license_id = json.loads((folder / "localtune-import.json").read_text()).get("license")
    source.license = license_name if str(license_id).lower() == "other" and license_name else license_id
    where = card.where("license") if card and "license" in card.lines else f"{folder} (no license in a card)"
    if license_id or license_name:
        source.findings += license_findings(license_id, license_name, f"{where}: license: {source.license}", "teacher")
    else:
        config = folder / "config.json"
        name = json.loads(config.read_text()).get("_name_or_path", "") if config.exists() else ""
        if not _family(source, name or folder.name, f"{config}: _name_or_path = {name!r}" if name else str(folder)):
            source.findings += license_findings(None, None, where, "teacher")
    if card:  # the strictest license along the base_model chain decides
        chain = chain_findings(card_bases(card), folder, source.license, {str(card.path.resolve())})
        source.findings += chain
        source.license = strictest(source.license, chain)


def _named_teacher(source: Source, ref: str) -> None:
    api = closed_api(ref)
    if api:
        source.findings.append(closed_finding(api, [f"teacher = {ref!r}"], "the teacher is"))
        return
    card = _cached_card(ref)
    if card is not None:
        _folder_teacher(source, card.parent)
        return
    if not _family(source, ref, f"teacher = {ref!r}"):
        source.findings.append(Finding("warn", "provenance:unknown", f"no card or license found for {ref!r} "
                                       "on this machine", [f"teacher = {ref!r}"],
                                       conditions=[f"check {ref}'s license allows training other models on its "
                                                   "outputs"]))


def _cached_card(repo_id: str) -> Path | None:
    """The model card of a repo id in the Hugging Face cache (never downloads)."""
    return cached_card(repo_id)


def _family(source: Source, name: str, evidence: str) -> bool:
    license = open_family(name)
    if license is None:
        return False
    source.license = source.license or license
    found = license_findings(license, None, evidence + f" (the {license} family's license)", "teacher")
    for f in found:
        f.reason += "; judged from the model's name, as no card says otherwise"
        if f.verdict == "allow":
            f.verdict = "warn"  # a name is weaker evidence than a card
    source.findings += found
    return True


# ---------------------------------------------------------------------------------------------
# The gate


def attest(report: Report, attestations: list, resolve=lambda p: p) -> None:
    """Lift a block on each source a recipe attests, by its exact reference; record the reason."""
    for a in attestations:
        for s in report.sources:
            if s.ref in (a["source"], resolve(a["source"])) or str(Path(s.ref).resolve()) == str(
                    Path(resolve(a["source"])).resolve()):
                s.attested = a["reason"]


def check_recipe(recipe) -> Report:
    """Every distill teacher and every stage's data (and eval data), before any model loads."""
    sources, seen = [], set()
    for stage in recipe.stages:
        teacher = methods.of(stage).references(stage).get("teacher")
        if teacher and teacher not in {s.name for s in recipe.stages}:
            if ("teacher", teacher) not in seen:
                seen.add(("teacher", teacher))
                sources.append(check_teacher(teacher, recipe.base_dir))
        elif teacher:  # an earlier stage: the recipe's own base, tuned
            if ("teacher", recipe.model.path) not in seen:
                seen.add(("teacher", recipe.model.path))
                sources.append(check_teacher(recipe.model.path, recipe.base_dir))
        for p, valid in ((stage.data, False), (stage.valid, True)):
            if not p:
                continue
            spec = datasets.spec_of(recipe, stage, valid)
            ref = p if spec.is_hub else recipe.resolve(p)
            key = ("data", ref, spec.split, spec.config, spec.files)
            if key not in seen:
                seen.add(key)
                local = dataclasses.replace(spec, ref=str(Path(ref).resolve()))  # as resolve() found it
                sources.append(check_data(ref, spec if spec.is_hub else local))
    report = Report(sources)
    attest(report, [{"source": a.source, "reason": a.reason} for a in recipe.provenance.attest], recipe.resolve)
    return report


def blocked_message(report: Report, where: str) -> str:
    blocks = [s for s in report.sources if s.verdict == "block"]
    lines = [f"{where}: blocked by the license and provenance gate; nothing was trained"]
    for s in blocks:
        for f in (f for f in s.findings if f.verdict == "block"):
            lines.append(f"  {s.kind} {s.ref}: {f.reason}")
            lines += [f"    evidence: {e}" for e in f.evidence[:3]]
            lines.append(f"    clause: {f.citation}")
    lines.append("  fix: use another teacher or dataset; or, if you hold the right to use it (say, a written "
                 "agreement with the provider), add to the recipe:\n"
                 f"    [[provenance.attest]]\n    source = \"{blocks[0].ref}\"\n    reason = \"...\"")
    return "\n".join(lines)
