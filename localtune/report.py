"""report.md: what changed, in numbers, written at the end of a run."""
from __future__ import annotations

from . import methods
from .run import atomic_write


def _fmt(x, spec=".3f"):
    return format(x, spec) if isinstance(x, (int, float)) else "—"


def _per_stage(task: dict, recipe) -> list[str]:
    """The task metric before training and after each stage, with a few samples."""
    names = [s.name for s in recipe.stages if s.name in task["stages"]]
    results = [task["before"]] + [task["stages"][n] for n in names]
    head = ["before"] + [f"after {n}" for n in names]
    lines = ["", "## Task metric after each stage", "", "| | " + " | ".join(head) + " |",
             "|---|" + "---|" * len(head),
             f"| {results[0]['metric']} | " + " | ".join(f"{r['value']:.1%}" for r in results) + " |"]
    if "well_formed" in results[0]:
        lines.append(f"| well-formed (`{results[0]['format']}`) | "
                     + " | ".join(f"{r['well_formed']:.1%}" for r in results) + " |")
    for key in results[0].get("secondary", {}):
        lines.append(f"| {key} | " + " | ".join(f"{r.get('secondary', {}).get(key, 0):.1%}" for r in results) + " |")
    cell = lambda t: t.replace("|", "\\|").replace("\n", " ")[:40]  # noqa: E731
    lines += ["", "| prompt | expected | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for i, sample in enumerate(results[0]["samples"]):
        got = [r["samples"][i]["got"] if i < len(r["samples"]) else "" for r in results]
        lines.append(f"| {cell(sample['prompt'])} | {cell(sample['expected'])} | " + " | ".join(map(cell, got)) + " |")
    return lines


def _general(general: dict, task: dict, recipe, manifest: dict) -> list[str]:
    """General ability (mean NLL per token on general text) and the task metric, per stage."""
    base = general["before"]
    names = [s.name for s in recipe.stages if s.name in general.get("stages", {})]
    head, nll, ref = ["base"], [f"{base['nll']:.4f}"], base["nll"]
    for n in names:
        if n == general.get("student_stage"):  # a distill student: its own starting point
            ref = general["student_before"]["nll"]
            head.append("student before")
            nll.append(f"{ref:.4f}")
        x = general["stages"][n]["nll"]
        head.append(f"after {n}")
        nll.append(f"{x:.4f} ({(x - ref) / ref:+.1%})")
    lines = ["", "## General ability (forgetting check)", "",
             f"Mean NLL per token on {base['texts']} general texts ({base['tokens']:,} tokens); lower is better. "
             "Changes are against the base, or against the student before training for a distilled student.", "",
             "| | " + " | ".join(head) + " |", "|---|" + "---|" * len(head),
             "| general NLL | " + " | ".join(nll) + " |"]
    if "before" in task:
        def cell(c, ref):
            if not c:
                return "—"
            if c["metric"] == "loglik":
                return f"{c['value']:.4f}" + (f" ({c['value'] - ref['value']:+.4f})" if ref else "")
            return f"{c['value']:.1%}" + (f" ({(c['value'] - ref['value']) * 100:+.1f} points)" if ref else "")

        ref, cells = task["before"], [cell(task["before"], None)]
        for n in names:
            if n == general.get("student_stage") and task.get("student_before"):
                ref = task["student_before"]
                cells.append(cell(ref, None))
            c = task.get("stages", {}).get(n) or (task.get("after") if n == recipe.stages[-1].name else None)
            cells.append(cell(c, ref))
        lines.append(f"| {task['before']['metric']} | " + " | ".join(cells) + " |")
    for s in recipe.stages:
        f = manifest.get("stage_results", {}).get(s.name, {}).get("forgetting")
        if not f or f["budget"] is None:
            continue
        last, kept = f["last"], f["kept"]
        lines += ["", f"Forgetting guard on {s.name}: budget {f['budget']:.0%} over the base's {f['base_nll']:.4f}, "
                      f"action `{f['action']}`, {len(f['checks'])} checks."]
        if f["over_budget_from_step"] is not None:
            lines.append(f"Over budget from step {f['over_budget_from_step']}.")
        if kept and f["action"] != "warn":
            lines.append(f"Kept the weights of step {kept['step']}: general NLL {kept['general_nll']:.4f} "
                         f"({(kept['general_nll'] - f['base_nll']) / f['base_nll']:+.1%}), against "
                         f"{last['general_nll']:.4f} ({last['general_nll_increase']:+.1%}) at the last check, "
                         f"step {last['step']}.")
    return lines


def _distillation(task: dict, recipe, manifest: dict) -> list[str]:
    """Teacher vs student: the task metric, the share of the gap closed, decoding speed, divergence."""
    teacher, after = task["teacher"], task.get("after", {})
    before = task.get("student_before", task["before"])
    lines = ["", "## Distillation", "",
             f"| | teacher (`{teacher['model']}`) | student before | student after |", "|---|---|---|---|",
             f"| {teacher['metric']} | {teacher['value']:.1%} | {before['value']:.1%} | "
             f"{_fmt(after.get('value'), '.1%')} |"]
    speed = task.get("student_tokens_per_sec")
    if speed:
        lines.append(f"| decoding tokens/s (batch 1) | {teacher['tokens_per_sec']:.0f} | — | {speed:.0f} |")
    gap = teacher["value"] - before["value"]
    if after and gap > 0:
        lines += ["", f"The student closed {(after['value'] - before['value']) / gap:.0%} of its gap to the teacher "
                      f"on {teacher['metric']}" + (f", and decodes {speed / teacher['tokens_per_sec']:.2f}x as fast "
                                                    "as the teacher" if speed else "") + "."]
    return lines


def _data_lints(found: dict) -> list[str]:
    """The data lints' warnings, per stage (their errors stop a run before it starts)."""
    if not found:
        return []
    lines = ["", "## Data lints", "", "What `localtune data preview` warns about in the training rows:", ""]
    for stage, findings in found.items():
        lines += [f"- {stage}: `{f['lint']}` {f['where']}: {f['message']} (fix: {f['fix']})" for f in findings]
    return lines


def _task_row(before: dict, after: dict) -> str:
    """The task metric's row: a share in points, or log-likelihood in nats per answer token."""
    if before["metric"] == "loglik":
        change = f"{after['value'] - before['value']:+.3f}" if after else "—"
        return (f"| log-likelihood (nats per answer token; higher is better) | {before['value']:.3f} | "
                f"{_fmt(after.get('value'), '.3f')} | {change} |")
    change = f"{(after['value'] - before['value']) * 100:+.1f} points" if after else "—"
    return f"| {before['metric']} | {before['value']:.1%} | {_fmt(after.get('value'), '.1%')} | {change} |"


def _prompt_baseline(few_shot: dict | None, after: dict) -> list[str]:
    """Try prompting first: the base model with k training examples in its prompt, against the tune."""
    if not few_shot:
        return []
    if not few_shot.get("k"):
        return ["", f"Prompting baseline: {few_shot.get('note') or 'not measured'}."]
    row = _task_row(few_shot, after).split(" | ", 1)[1]  # the metric's cells, against the tune
    shots = f"{few_shot['k']} example{'s' if few_shot['k'] != 1 else ''}"
    lines = [f"| prompting: the base with {shots} in its prompt (change: the tune against it) | {row}"]
    if "well_formed" in few_shot:
        after_formed = {"value": after["well_formed"]} if "well_formed" in after else {}
        lines.append("| well-formed, prompting | " + _task_row(
            {"metric": "", "value": few_shot["well_formed"]}, after_formed).split(" | ", 1)[1])
    lines += ["", few_shot["against_tune"]["sentence"]] if "against_tune" in few_shot else []
    return lines + (["", f"({few_shot['note']}.)"] if few_shot.get("note") else [])


def write_report(run, recipe, manifest: dict) -> str:
    lines = [f"# {recipe.name}", "",
             f"- model: `{manifest['model']['path']}` ({manifest['model'].get('parameters', 0) / 1e6:.1f}M "
             f"parameters{', quantized' if manifest['model'].get('quantized') else ''})",
             f"- device: {manifest['device']['device']}, BLAS {manifest['device']['blas']}, "
             f"compute dtype {manifest['device']['compute_dtype']}",
             f"- localtune {manifest['localtune']}, mlx {manifest['mlx']}", ""]
    lines += ["## Stages", "",
              "| stage | steps | train loss | eval loss | tokens/s | peak memory | time | trainable |",
              "|---|---|---|---|---|---|---|---|"]
    for s in recipe.stages:
        r = manifest.get("stage_results", {}).get(s.name, {})
        lines.append(f"| {s.name} ({s.kind}) | {r.get('step', '—')} | {_fmt(r.get('loss'))} | "
                     f"{_fmt(r.get('eval_loss'))} | {_fmt(r.get('tokens_per_sec'), ',.0f')} | "
                     f"{_fmt(r.get('peak_memory_gb'), '.2f')} GB | {_fmt(r.get('train_time_sec'), '.0f')} s | "
                     f"{r.get('trainable', 0):,} |")
        if r.get("truncated"):
            lines.append(f"\n{r['truncated']} of {r['examples']} training rows were truncated to max_seq_len.\n")
    if data := {name: d for name, d in manifest.get("data", {}).items() if d.get("format")}:
        lines += ["", "## Data", ""] + [f"- {name}: `{d['path']}`: {d['format']}" for name, d in data.items()]
    lines += _data_lints(manifest.get("data_lints", {}))
    task = manifest.get("task", {})
    if "before" in task:
        before, after = task["before"], task.get("after", {})
        lines += ["", "## Task metric (held-out)", "",
                  f"{before['metric']} on {before['n']} held-out rows of `{recipe.eval.data}`:", "",
                  "| | before | after | change |", "|---|---|---|---|", _task_row(before, after)]
        if "well_formed" in before:
            lines.append(f"| well-formed (`{before['format']}`) | {before['well_formed']:.1%} | "
                         f"{_fmt(after.get('well_formed'), '.1%')} | " + (
                             f"{(after['well_formed'] - before['well_formed']) * 100:+.1f} points |"
                             if after else "— |"))
        for key, value in before.get("secondary", {}).items():  # e.g. tool_call: parses, right function
            new = after.get("secondary", {}).get(key)
            lines.append(f"| {key} | {value:.1%} | {_fmt(new, '.1%')} | " +
                         (f"{(new - value) * 100:+.1f} points |" if new is not None else "— |"))
        lines += _prompt_baseline(task.get("few_shot"), after)
        if after and before.get("samples"):
            shots = task.get("few_shot", {}).get("samples") or []  # the base with k examples in its prompt
            shot = f"{task['few_shot']['k']}-shot | " if shots else ""
            lines += ["", "Samples (greedy):", "", f"| prompt | expected | before | {shot}after |",
                      "|---|---|---|" + "---|" * (2 if shots else 1)]
            for i, (b, a) in enumerate(zip(before["samples"], after["samples"])):
                cell = lambda t: t.replace("|", "\\|").replace("\n", " ")[:60]  # noqa: E731
                middle = f"{cell(shots[i]['got'] if i < len(shots) else '')} | " if shots else ""
                lines.append(f"| {cell(b['prompt'])} | {cell(b['expected'])} | {cell(b['got'])} | {middle}"
                             f"{cell(a['got'])} |")
    if len(task.get("stages", {})) > 1:
        lines += _per_stage(task, recipe)
    if manifest.get("general", {}).get("before"):
        lines += _general(manifest["general"], task, recipe, manifest)
    if "teacher" in task:
        lines += _distillation(task, recipe, manifest)
    if "provenance" in manifest:
        from .integrity.bom import report_lines

        lines += report_lines(manifest["provenance"])
    for s in recipe.stages:  # each method's own section
        lines += methods.of(s).report(s, manifest.get("stage_results", {}).get(s.name, {}), run.path)
    if manifest.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w['stage']}, step {w['step']}: {w['message']}"
                                            for w in manifest["warnings"]]
    lines += ["", "## Outputs", ""]
    base = manifest['model'].get('folder', manifest['model']['path'])
    for s in recipe.stages:
        if start := methods.of(s).starts_from(s):  # the chain starts again from this model
            base = recipe.resolve(start)
        lines.append(f"- `{s.name}/`: adapters (mlx-lm format: "
                     f"`mlx_lm.generate --model {base} --adapter-path {run.path / s.name}`)")
    text = "\n".join(lines) + "\n"
    atomic_write(run.path / "report.md", text)
    return text
