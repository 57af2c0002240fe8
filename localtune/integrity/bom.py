"""The bill of materials: the compact record of a run's sources (license, verdict, attestation,
conditions) that travels with adapters and exports, and report.md's provenance section. These read
the gate's report as saved in manifest.json, so they need none of the gate's machinery.
"""
from __future__ import annotations

import re


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
