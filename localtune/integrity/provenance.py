"""License and provenance gate: may these teachers and datasets train this model?

Every source (a distillation teacher, or a stage's data) gets findings; a finding is a verdict
(allow / warn / block), its evidence (file:line or field), the rule and its citation, and any
conditions the user must meet. A source's verdict is its worst finding. Unknown provenance is a
warning, never a silent allow. A `[[provenance.attest]]` entry in the recipe turns one source's
block into an allow, recorded with the user's reason; there is no global switch.

The policy tables (CLOSED_APIS, LICENSES, KNOWN_DATASETS) are in `localtune/policy.py`, each
row with the clause it rests on.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import methods
from ..errors import LocaltuneError
from .policy import CLOSED_APIS, KNOWN_DATASETS, LICENSES, OPEN_FAMILIES, ClosedApi

ORDER = {"allow": 0, "warn": 1, "block": 2}
GENERATOR_KEYS = ("model", "generator", "source", "model_name", "generated_by", "teacher", "annotator",
                  "chosen_model", "rejected_model")
RECORDS_SCANNED = 100_000  # lines of a JSONL file read for generator fields


class Blocked(LocaltuneError):
    exit_code = 3


@dataclass
class Finding:
    verdict: str  # allow | warn | block
    rule: str  # what decided it, e.g. "closed-api:openai" or "license:llama3.1"
    reason: str
    evidence: list = field(default_factory=list)  # "file:line: text" or "field = value"
    citation: str = ""  # the clause (document, section, URL)
    conditions: list = field(default_factory=list)  # what the user must do, e.g. a name prefix


@dataclass
class Source:
    kind: str  # teacher | data
    ref: str  # as written in the recipe or on the command line
    findings: list = field(default_factory=list)
    license: str | None = None
    attested: str | None = None  # the user's reason, when an attestation lifted a block

    @property
    def verdict(self) -> str:
        if not self.findings:
            return "allow"
        worst = max(self.findings, key=lambda f: ORDER[f.verdict]).verdict
        return "allow" if worst == "block" and self.attested else worst

    @property
    def conditions(self) -> list[str]:
        return [c for f in self.findings for c in f.conditions]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "source": self.ref, "verdict": self.verdict, "license": self.license,
                "attested": self.attested, "conditions": self.conditions,
                "findings": [asdict(f) for f in self.findings]}


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
# Names


def closed_api(name: str) -> ClosedApi | None:
    """The closed-API provider whose model this name is: `gpt-4o`, `openai/gpt-4o`,
    `anthropic/claude-3-opus`. A repo id under another owner is an open-weight model (a name such
    as `someone/gpt4-x-alpaca` is not OpenAI's), and so are names like gpt2, gpt-j or gpt-oss."""
    name = name.strip().lower()
    owner, _, model = name.rpartition("/")
    model = re.sub(r"[:@].*$", "", model)  # ollama-style tags, versions
    for api in CLOSED_APIS:
        if owner and owner not in api.owners:
            continue
        if any(re.fullmatch(p, model) for p in api.patterns):
            return api
    return None


def open_family(name: str) -> str | None:
    """The license id an open-weight model family ships under, when the family decides it."""
    model = name.strip().lower().rpartition("/")[2]
    for pattern, license in OPEN_FAMILIES:
        if re.fullmatch(pattern, model):
            return license
    return None


def closed_finding(api: ClosedApi, evidence: list[str], what: str) -> Finding:
    return Finding("block", f"closed-api:{api.key}",
                   f"{what} {api.provider}'s closed API; its terms forbid using outputs to develop competing "
                   "models", evidence, api.citation)


# ---------------------------------------------------------------------------------------------
# Cards: README.md with YAML front matter


@dataclass
class Card:
    path: Path
    meta: dict
    body: str
    body_line: int  # line number of the body's first line
    lines: dict  # top-level key -> line number

    def where(self, key: str) -> str:
        return f"{self.path}:{self.lines.get(key, 1)}"


def read_card(path: Path) -> Card | None:
    """A card's front matter and text; a malformed front matter is an error naming the line."""
    import yaml

    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return Card(path, {}, text, 1, {})
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise LocaltuneError(f"{path}:1: the front matter opened with '---' is never closed\n"
                             "  fix: end the YAML block with a line holding only '---'") from None
    front = "\n".join(lines[1:end])
    try:
        meta = yaml.safe_load(front) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 2 if mark else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LocaltuneError(f"{path}:{line}: malformed YAML front matter: {problem}\n"
                             f"  line {line}: {lines[line - 1] if line <= len(lines) else ''}\n"
                             "  fix: write key: value pairs, lists as [a, b]; quote values holding ':'") from None
    if not isinstance(meta, dict):
        raise LocaltuneError(f"{path}:2: the front matter must be key: value pairs, got {type(meta).__name__}")
    where = {}
    for i in range(1, end):
        m = re.match(r"^([A-Za-z_][\w-]*)\s*:", lines[i])
        if m:
            where.setdefault(m.group(1), i + 1)
    return Card(path, meta, "\n".join(lines[end + 1:]), end + 2, where)


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def license_findings(license_id: str | None, license_name: str | None, evidence: str, role: str) -> list[Finding]:
    """What a license says about training another model on this source's outputs (or on it)."""
    if not license_id and not license_name:
        return [Finding("warn", "license:unknown", f"no license is stated for this {role}", [evidence],
                        conditions=[f"find the {role}'s license and check that it allows training other models"])]
    key = (license_id or "").lower()
    if key in ("other", "unknown", "") and license_name:
        key = license_name.lower()
    rule = LICENSES.get(key)
    if rule is None:
        return [Finding("warn", f"license:{key}", f"license {key!r} is not in localtune's table", [evidence],
                        conditions=[f"read the {key!r} license for what it says about training other models "
                                    "on outputs"])]
    return [Finding(rule.verdict, f"license:{key}", rule.summary, [evidence], rule.citation, list(rule.conditions))]


NEGATION = re.compile(r"\b(not|no|never|without|nor|none|neither|avoid(?:ed|ing)?)\b|n't\b", re.I)
GENERATION = re.compile(r"\b(generat\w*|produc\w*|writ\w*|wrote|creat\w*|synthesi[sz]\w*|distill\w*|"
                        r"outputs?|responses?|completions?|answers?|annotat\w*|label\w*|rat(?:ed|ings?)|"
                        r"collected from|sampled from|from (?:the )?(?:openai|anthropic|google))\b", re.I)


def card_text_findings(card: Card) -> list[Finding]:
    """Sentences of the card's text that say a closed API produced the data. A sentence that
    names a provider only to deny it ("no OpenAI models were used") is not evidence."""
    findings = []
    for offset, line in enumerate(card.body.splitlines()):
        for sentence in re.split(r"(?<=[.!?])\s+", line):
            for api in CLOSED_APIS:
                mention = api.mention.search(sentence)
                if not mention or NEGATION.search(sentence):
                    continue
                if GENERATION.search(sentence):
                    ev = f"{card.path}:{card.body_line + offset}: {sentence.strip()[:160]}"
                    findings.append(closed_finding(api, [ev], "the dataset card says the data came from"))
                break
    return findings


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
    for base in _as_list(meta.get("base_model")):
        api = closed_api(str(base))
        if api:
            source.findings.append(closed_finding(api, [f"{card.where('base_model')}: base_model: {base}"],
                                                  "the card names as its base"))


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
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "README.md")
    except Exception:  # noqa: BLE001 - a cache lookup must never break the gate
        return None
    return Path(found) if isinstance(found, str) else None


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
# Datasets


def check_data(path: str | Path) -> Source:
    """A JSONL file, or a folder of them, with an optional dataset card (README.md) beside it."""
    path = Path(path)
    source = Source("data", str(path))
    if not path.exists():
        raise LocaltuneError(f"{path}: no such file or folder\n  fix: check the data path")
    folder = path if path.is_dir() else path.parent
    files = sorted(folder.glob("*.jsonl")) if path.is_dir() else [path]
    card = read_card(folder / "README.md")
    generated: dict[str, list[str]] = {}
    named: set[str] = set()  # names seen under a key other than `source`
    for f in files:
        _scan_records(f, generated, named)
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
    if card is None:
        if not generated:
            source.findings.append(Finding("warn", "provenance:unknown", "no dataset card (README.md) beside the "
                                           "data and no generator fields in its records", [str(path)],
                                           conditions=["add a README.md card with license and source_datasets, "
                                                       "or check the data's origin yourself"]))
        return source
    meta = card.meta
    source.license = (meta.get("license_name") if str(meta.get("license")).lower() == "other" else meta.get(
        "license")) or source.license
    source.findings += license_findings(meta.get("license"), meta.get("license_name"),
                                        f"{card.where('license')}: license: {meta.get('license')}", "dataset")
    for tag in _as_list(meta.get("tags")):
        api = closed_api(str(tag))
        if api:
            source.findings.append(closed_finding(api, [f"{card.where('tags')}: tags: {tag}"],
                                                  "the card tags the data as from"))
    for upstream in _as_list(meta.get("source_datasets")):
        known = KNOWN_DATASETS.get(str(upstream).lower())
        if known:
            api = next(a for a in CLOSED_APIS if a.key == known[0])
            source.findings.append(closed_finding(api, [f"{card.where('source_datasets')}: source_datasets: "
                                                        f"{upstream} ({known[1]})"], "an upstream dataset came from"))
    source.findings += card_text_findings(card)
    return source


def _scan_records(path: Path, generated: dict, named: set) -> None:
    """Collect generator names from per-record fields, nested ones included (completions[].model)."""
    def walk(value, trail: str, line: int):
        if isinstance(value, dict):
            for k, v in value.items():
                if k in GENERATOR_KEYS and isinstance(v, str) and v.strip():
                    generated.setdefault(v.strip(), []).append(f"{path}:{line}: {trail}{k} = {v.strip()!r}")
                    if k != "source":
                        named.add(v.strip())
                elif isinstance(v, (dict, list)):
                    walk(v, f"{trail}{k}.", line)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{trail[:-1]}[{i}].", line)

    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if line_no > RECORDS_SCANNED:
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the data reader reports malformed rows with their line
            walk(record, "", line_no)


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
        for p in (stage.data, stage.valid):
            if p and ("data", recipe.resolve(p)) not in seen:
                seen.add(("data", recipe.resolve(p)))
                sources.append(check_data(recipe.resolve(p)))
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


def bill_of_materials(report: dict) -> dict:
    """The compact record that travels with adapters and exports: each source, its license,
    verdict, attestation and conditions (the manifest keeps the full evidence)."""
    return {"verdict": report["verdict"],
            "sources": [{k: s[k] for k in ("kind", "source", "license", "verdict", "attested", "conditions")}
                        for s in report["findings"]]}


def report_lines(report: dict) -> list[str]:
    """report.md's provenance section."""
    lines = ["", "## Provenance (license gate)", "", f"Verdict: **{report['verdict']}**.", "",
             "| source | license | verdict | why | conditions |", "|---|---|---|---|---|"]
    cell = lambda t: str(t).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    for s in report["findings"]:
        why = "; ".join(f["reason"] for f in s["findings"]) or "—"
        if s["attested"]:
            why += f"; attested: {s['attested']}"
        lines.append(f"| {s['kind']} `{cell(s['source'])}` | {cell(s['license'] or '—')} | {s['verdict']} | "
                     f"{cell(why)} | {cell('; '.join(s['conditions']) or '—')} |")
    return lines


def name_prefix(bom: dict | None) -> str | None:
    """A name prefix a license requires of models trained on its outputs (e.g. "Llama")."""
    for s in (bom or {}).get("sources", []):
        for c in s.get("conditions", []):
            m = re.match(r'name must begin with "([^"]+)"', c)
            if m:
                return m.group(1)
    return None
