"""Every side-by-side benchmark, one after another, and one table of their ratios in docs/benchmarks.md.

    python tests/benchmarks/run_all.py [--only bench_sft,bench_dpo] [--quick] [--from-results] [--no-readme]

Runs each script in BENCHES as a subprocess (they take 2-30 min each and want the machine to
themselves, so never in parallel). Each writes tests/benchmarks/results/<name>.md: a title,
`- date:`, `- machine:`, `- command:` bullets, then tables. One small extractor per benchmark picks
the key ratios out of that file; a benchmark without one gets first_ratio_table. The rows go into
docs/benchmarks.md between the BEGIN and END marker lines, each with the date and command of the run it
came from. --from-results runs nothing and rebuilds the table from the files on disk.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
README = ROOT / "docs" / "benchmarks.md"  # the page the table goes in (its links are relative to docs/)
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"

# "- date: 2026-11-29 09:08", "- command: `python ...` (28.0 min)"; not "- LoRA rank 8, ..." or "- tok/s: ...".
BULLET = re.compile(r"- (\w[\w ]*): (.*)")
SEPARATOR = re.compile(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
# 12.89x, 0.00522, 96.0%, 1,894, 4.31e-06
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?%?")


# Reading a results file -------------------------------------------------------------------


@dataclass(eq=False)
class Table:
    heading: str  # the last "#" heading above it
    columns: list  # a repeated column name gets its position: "ratio", "ratio 2"
    rows: list  # {column: cell}


@dataclass(eq=False)
class Section:
    """One run's results: from a `- date:` bullet to the next (a file can hold re-runs of some rows)."""
    meta: dict = field(default_factory=dict)  # the bullets above its first table: date, machine, command, ...
    tables: list = field(default_factory=list)
    text: str = ""  # its lines, for results stated in prose


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str], heading: str) -> Table:
    columns, seen = [], Counter()
    for name in _cells(lines[0]):
        seen[name] += 1
        columns.append(name if seen[name] == 1 else f"{name} {seen[name]}")
    return Table(heading, columns, [dict(zip(columns, _cells(line))) for line in lines[2:]])


def parse(text: str) -> list[Section]:
    """The file cut into sections at each `- date:` bullet; the title above the first joins the first."""
    lines, sections, heading, i = text.splitlines(), [Section()], "", 0
    while i < len(lines):
        line, s = lines[i], sections[-1]
        if line.startswith("- date:") and s.meta:
            s = Section()
            sections.append(s)
        end = i + 1
        if line.startswith("|") and end < len(lines) and SEPARATOR.match(lines[end]):
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            s.tables.append(_table(lines[i:end], heading))
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif (m := BULLET.match(line)) and not s.tables:
            s.meta.setdefault(m[1], m[2].strip())
        s.text += "\n".join(lines[i:end]) + "\n"
        i = end
    return sections


def number(cell: str) -> float:
    """The first number in a cell: "12.89x (12.86-12.91)" -> 12.89, "96.0%" -> 0.96, "1,894" -> 1894."""
    m = NUMBER.search(cell)
    if not m:
        raise ValueError(f"no number in {cell!r}")
    text = m[0].replace(",", "")
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


# Extractors: results sections -> rows of the summary ----------------------------------------


@dataclass(frozen=True)
class Row:
    what: str
    vs: str  # what localtune is compared with
    ratio: str  # the cell as the results file prints it
    target: str
    source: Section  # the run it came from: date, machine, command
    value: float = field(init=False)  # the ratio as a number: a cell without one is an error here

    def __post_init__(self):
        object.__setattr__(self, "value", number(self.ratio))


def table_rows(sections: list[Section], column: str) -> list[tuple[Section, dict]]:
    """(section, row) for every row of every table that has `column`."""
    found = [(s, r) for s in sections for t in s.tables if column in t.columns for r in t.rows]
    if not found:
        raise ValueError(f"no table with a {column!r} column")
    return found


def first_ratio_table(sections: list[Section], vs: str = "—", target: str = "—") -> list[Row]:
    """The fallback: the rows of the first table with a column named "ratio". What: the row's first
    cell; vs: its "vs" cell if the table has one, else `vs`. Rows whose ratio has no number are left out."""
    for s in sections:
        for t in s.tables:
            col = next((c for c in t.columns if c.lower() == "ratio"), None)
            if col:
                return [Row(r[t.columns[0]], r.get("vs", vs), r[col], target, s) for r in t.rows
                        if NUMBER.search(r[col])]
    raise ValueError('no table with a column named "ratio"')


def sft(sections: list[Section]) -> list[Row]:
    """Useful tok/s and peak memory ratios, per model, data and localtune mode, against each mlx_lm.lora setup."""
    rows = []
    for s, r in table_rows(sections, "tok/s ratio"):
        if r["localtune"].endswith("model by folder"):  # a check of the pkg: import's side effect, not a comparison
            continue
        mode = r["localtune"].removeprefix("localtune").lstrip(", ")
        what = f"{r['model']}, {r['data']}" + (f" ({mode})" if mode else "")
        equal = r["data"].startswith("equal")  # the targets: speed on variable-length data, memory on equal batches
        rows += [Row(f"{what}: useful tok/s", r["mlx-lm"], r["tok/s ratio"], "—" if equal else "≥ 1.3x", s),
                 Row(f"{what}: peak memory", r["mlx-lm"], r["memory ratio"], "≤ 1x" if equal else "—", s)]
    return rows


def dpo(sections: list[Section]) -> list[Row]:
    """Steady pairs/s and peak memory ratios of localtune's default (reference auto) against each mlx-lm-lora setup."""
    return [row for s, r in table_rows(sections, "steady ratio") if "reference auto" in r["localtune"]
            for row in (Row(f"{r['model']}: steady pairs/s", r["vs"], r["steady ratio"], "≥ 1.3x", s),
                        Row(f"{r['model']}: peak memory", r["vs"], r["memory ratio"], "—", s))]


def orpo(sections: list[Section]) -> list[Row]:
    """Steady pairs/s and peak memory of localtune's ORPO against each mlx-lm-lora ORPO setup (as saved, fp32 copy)."""
    return [row for s, r in table_rows(sections, "steady ratio") if r["localtune"] == "localtune ORPO"
            for row in (Row(f"{r['model']}: ORPO steady pairs/s", r["vs"], r["steady ratio"], "≥ 1.3x", s),
                        Row(f"{r['model']}: ORPO peak memory", r["vs"], r["memory ratio"], "≤ 1x", s))]


def ppo(sections: list[Section]) -> list[Row]:
    """Rollout tok/s against mlx_lm.batch_generate (as saved, fp32 copy); the ppo stage's peak over plain SFT's."""
    rows = []
    for s, r in table_rows(sections, "localtune rollouts tok/s"):
        what = f"{r['model']} ({r['batch x max new tokens']}): rollout tok/s"
        rows += [Row(what, "mlx_lm.batch_generate, as saved", r["ratio"], "≥ 0.8x", s),
                 Row(what, "mlx_lm.batch_generate, fp32 copy", r["ratio 2"], "≥ 0.8x", s)]
    for s, r in table_rows(sections, "PPO / SFT"):
        rows.append(Row(f"{r['model']}: ppo stage peak memory", "plain LoRA SFT, same run", r["PPO / SFT"],
                        "≤ 1.5x", s))
    return rows


def grpo(sections: list[Section]) -> list[Row]:
    """Completions/s over the training steps and peak memory of localtune's grpo at its defaults against each
    mlx-lm-lora setup (the results file also has lower-memory settings); then grpo over ppo, per update."""
    rows = []
    for s, r in table_rows(sections, "stage ratio"):
        if r["localtune"] == "localtune grpo":
            model = r["model"].split(" (")[0]
            rows += [Row(f"{model}: completions/s", r["vs"], r["stage ratio"], "≥ 1.5x", s),
                     Row(f"{model}: peak memory", r["vs"], r["memory ratio"], "≤ 1x", s)]
    for s, r in table_rows(sections, "GRPO / PPO time"):
        n = r["completions per update"].split(" (")[0]
        rows += [Row(f"{r['model']}: s/update ({n} completions)", "localtune ppo", r["GRPO / PPO time"], "—", s),
                 Row(f"{r['model']}: peak memory", "localtune ppo", r["GRPO / PPO memory"], "—", s)]
    return rows


# The export's own gates on top-1 (localtune/export/verify.py TOLERANCE, REFERENCE_SLACK).
TOP1_GATE = {"f16": "≥ 98%", "q4_k_m": "≥ 80%", **dict.fromkeys(("q8_0", "q4_0"), "≥ llama.cpp's own − 4 pts")}


def export(sections: list[Section]) -> list[Row]:
    """Per quant: top-1 agreement with the MLX model (mean KL alongside), and llama.cpp's speed against the original."""
    rows = []
    for s, r in table_rows(sections, "vs original"):
        if not NUMBER.search(r["top-1"]):  # the original file: nothing exported
            continue
        rows += [Row(f"{r['file']} GGUF: top-1 agreement (mean KL {r['mean KL to MLX']})", "the MLX model",
                     r["top-1"], TOP1_GATE.get(r["file"], "—"), s),
                 Row(f"{r['file']} GGUF: llama.cpp decode tok/s", "the original Q4_1 GGUF", r["vs original"], "—", s)]
    return rows


def tui(sections: list[Section]) -> list[Row]:
    """Training throughput with the TUI attached, from the sentence under the table."""
    rows = [Row("training tok/s with the TUI attached", "--no-tui", m[1], "≥ 0.97x", s) for s in sections
            if (m := re.search(r"Throughput with the TUI: \*\*([\d.]+x)\*\*", s.text))]
    if not rows:
        raise ValueError('no "Throughput with the TUI: **...x**" sentence')
    return rows


def plan(sections: list[Section]) -> list[Row]:
    """Per stage: the calibrated estimate of peak memory and of step time over the measured run's."""
    rows = []
    for s, r in table_rows(sections, "peak ratio"):
        what = f"{r['model']} {r['recipe'].strip('`')}, {r['stage']}"
        rows += [Row(f"{what}: estimated peak memory", "measured peak", r["peak ratio"], "0.75-1.25x", s),
                 Row(f"{what}: estimated s/step", "measured s/step", r["time ratio"], "0.70-1.30x", s)]
    return rows


def distributed(sections: list[Section]) -> list[Row]:
    """Tokens/s of 2 local processes over 1 with the same global batch (sharing 2 cores), and all_sum speed."""
    rows = [Row(f"{r['model']}, {r['threads']}: tok/s of {r['vs']}", r["baseline"], r["ratio"], "—", s)
            for s, r in table_rows(sections, "ratio")]
    rows += [Row(f"all_sum bandwidth, {r['size']} over 2 local ranks", "—", r["bandwidth"], "—", s)
             for s, r in table_rows(sections, "bandwidth")]
    return rows


# The registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    name: str  # tests/benchmarks/<name>.py (or <script>.py), which writes tests/benchmarks/results/<name>.md
    args: tuple = ()  # a full run: the flags behind the README's numbers
    quick: tuple = ()  # --quick: the small model, the fewest repeats
    extract: Callable[[list[Section]], list[Row]] | None = None  # None: first_ratio_table with vs and target
    vs: str = "—"  # first_ratio_table only: what localtune is compared with, if its table has no "vs" column
    target: str = "—"  # first_ratio_table only
    script_name: str | None = None  # another benchmark's script, run with flags that write <name>.md

    @property
    def script(self) -> Path:
        return HERE / f"{self.script_name or self.name}.py"

    @property
    def results(self) -> Path:
        return HERE / "results" / f"{self.name}.md"

    def command(self, quick: bool = False) -> list[str]:
        return ["python", str(self.script.relative_to(ROOT)), *(self.quick if quick else self.args)]

    def rows(self) -> list[Row]:
        """This benchmark's summary rows, from its results file; a later run of the same row replaces it in place."""
        where = self.results.relative_to(ROOT)
        if not self.results.exists():
            raise SystemExit(f"{where} is missing: produce it with `{' '.join(self.command())}`")
        sections = parse(self.results.read_text())
        try:
            rows = self.extract(sections) if self.extract else first_ratio_table(sections, self.vs, self.target)
            if not rows:
                raise ValueError("no row with a ratio")
        except (ValueError, KeyError) as e:
            raise SystemExit(f"{where}: {e} (has its layout changed? see {self.name}'s extractor in run_all.py)")
        return list({(r.what, r.vs): r for r in rows}.values())


BENCHES = {b.name: b for b in [
    Bench("bench_sft", ("--models", "small,smollm2", "--repeats", "2", "--blas-check"),
          ("--models", "small", "--repeats", "1"), sft),
    Bench("bench_dpo", ("--models", "small,smollm2", "--repeats", "2", "--skip-orpo"),
          ("--models", "small", "--repeats", "1", "--skip-orpo"), dpo),
    Bench("bench_orpo", ("--models", "small", "--repeats", "2", "--skip-dpo"),
          ("--models", "small", "--repeats", "1", "--skip-dpo"), orpo, script_name="bench_dpo"),
    Bench("bench_ppo", ("--models", "small,smollm2", "--repeats", "5", "--also-4bit-rollouts"),
          ("--models", "small", "--repeats", "1"), ppo),
    Bench("bench_grpo", ("--models", "small,smollm2"), ("--models", "small"), grpo),
    Bench("bench_export", ("--repeats", "2"), ("--repeats", "1"), export),  # SmolLM2 only: it has no small model
    Bench("bench_tui", ("--steps", "200", "--repeats", "2"), ("--repeats", "1"), tui),
    Bench("bench_plan", ("--models", "small,smollm2"), ("--models", "small"), plan),
    Bench("bench_distributed", ("--models", "small,smollm2", "--repeats", "2"), ("--models", "small", "--repeats", "1"),
          distributed),
]}


# The summary --------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def this_machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def machine_of(section: Section) -> str:
    return section.meta.get("machine", "").split(";")[0]


def render(rows: list[tuple[Bench, Row]]) -> str:
    """The Markdown block: the machine and the command, the table, then each run's own command."""
    sources = list({id(r.source): (b, r.source) for b, r in rows}.values())
    machines = Counter(m for _, s in sources if (m := machine_of(s)))
    machine = machines.most_common(1)[0][0] if machines else this_machine()
    lines = [textwrap.fill(f"The side-by-side benchmarks at a glance, on {machine}. "
                           "`python tests/benchmarks/run_all.py` reruns them all; each row's own run and command are "
                           "listed under the table. Ratios are localtune / the other side (top-1: agreement with it): "
                           "speed above 1 and memory below 1 favour localtune.", 100),
             "",
             "| benchmark | what | localtune vs | ratio | target | date |",
             "| --- | --- | --- | ---: | --- | --- |"]
    previous = None
    for b, r in rows:
        name = f"[{b.name}](../{b.results.relative_to(ROOT)})" if b is not previous else ""
        lines.append(f"| {name} | {_cell(r.what)} | {_cell(r.vs)} | {_cell(r.ratio)} | {_cell(r.target)} | "
                     f"{r.source.meta.get('date', '—')} |")
        previous = b
    lines += ["", "Runs behind these rows:", ""]
    for b, s in sources:
        where = f"; on {machine_of(s)}" if machine_of(s) not in ("", machine) else ""
        lines.append(f"- {b.name}, {s.meta.get('date', 'undated')}: {s.meta.get('command', '(no command recorded)')}"
                     f"{where}")
    return "\n".join(lines) + "\n"


def write_readme(readme: Path, block: str) -> None:
    """Replace what is between the marker lines, and nothing else."""
    text = readme.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme} needs the lines {BEGIN} and {END}, in that order, where the table goes")
    readme.write_text(text[:start + len(BEGIN)] + "\n" + block.strip("\n") + "\n" + text[end:])


def run(bench: Bench, quick: bool) -> int:
    """Runs one benchmark script to the end, its output going straight to ours; returns its exit code."""
    cmd = bench.command(quick)
    print(f"\n## {bench.name}: {' '.join(cmd)}", flush=True)
    return subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, check=False).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help=f"comma-separated, from {', '.join(BENCHES)}: run only these "
                        "(the table still covers every results file)")
    parser.add_argument("--quick", action="store_true", help="the small model and the fewest repeats, through "
                        "each script's own flags (its results file is overwritten, as by any run)")
    parser.add_argument("--from-results", action="store_true", help="run nothing: rebuild the table from "
                        "tests/benchmarks/results/")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args()
    only = [n for n in args.only.split(",") if n]
    if unknown := [n for n in only if n not in BENCHES]:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    if args.from_results and (only or args.quick):
        parser.error("--from-results runs nothing, so --only and --quick have nothing to choose")

    present = []
    for b in BENCHES.values():
        if b.script.exists():
            present.append(b)
        else:
            print(f"{b.name}: {b.script.relative_to(ROOT)} does not exist yet; skipped", flush=True)
    to_run = [] if args.from_results else [b for b in present if not only or b.name in only]
    missing = [b for b in present if b not in to_run and not b.results.exists()]
    if missing:  # found now rather than after an hour of running the others
        raise SystemExit("\n".join(f"{b.results.relative_to(ROOT)} is missing: produce it with "
                                   f"`{' '.join(b.command())}`" for b in missing))
    failed = [f"{b.name} (exit {code})" for b in to_run if (code := run(b, args.quick))]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}; docs/benchmarks.md left as it was. The others' results are "
                         "on disk: rebuild the table from them with --from-results")

    block = render([(b, r) for b in present for r in b.rows()])
    print("\n" + block)
    if not args.no_readme:
        write_readme(README, block)
        print(f"written to {README.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
