"""The generated parts of docs/: the recipe key reference (docs/recipes.md) and the command reference
(docs/commands.md), built from the schema itself, and the checks tests/test_docs.py runs on every page.

    python tests/docs_reference.py          # rewrite the generated blocks in docs/ (run from the repo root)

The recipe keys come from localtune/recipe.py's dataclasses and each method's `options` dataclass
(methods.all_methods()), with the defaults, bounds and choices the parser checks; the commands from the
click group in localtune/cli. A key whose `option(..., doc=...)` is empty takes its meaning from MEANINGS
below; a key with neither fails the test, so a new key comes with its line of documentation.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import click

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "python tests/docs_reference.py"
BEGIN, END = "<!-- generated: {} (" + REGENERATE + ") -->", "<!-- end generated: {} -->"

# Meanings of the keys whose option() has no doc, by "table.key" (table as in the reference's headings).
MEANINGS = {
    "recipe.name": "the run's name (`runs/NAME-STAMP/`); default: the recipe file's name",
    "recipe.seed": "the seed of every stage that sets none (data order, LoRA init, sampling)",
    "recipe.runs_dir": "where runs are written, relative to the working directory",
    "model.revision": "a Hugging Face repo id's branch, tag or commit",
    "model.quantize.bits": "bits per weight of the quantized frozen base",
    "model.quantize.group_size": "weights per quantization group (one scale and bias each)",
    "stages.name": "the stage's name in the run directory (`runs/NAME-STAMP/STAGE/`); default: its kind",
    "stages.valid": "a validation file (the eval loss during training)",
    "stages.valid_fraction": "or: this share of the training rows held out as the validation set",
    "stages.optimizer": "the optimizer",
    "stages.learning_rate": "peak learning rate",
    "stages.weight_decay": "decoupled weight decay (adamw)",
    "stages.lr_schedule": "decay after warm-up",
    "stages.warmup_steps": "linear warm-up steps from 0",
    "stages.min_lr_ratio": "the schedule's last learning rate, as a share of the peak",
    "stages.batch_size": "rows per batch (per process under mlx.launch)",
    "stages.grad_accum": "batches whose gradients are summed per optimizer step",
    "stages.grad_checkpoint": "recompute activations in the backward pass (less memory, slower)",
    "stages.max_seq_len": "tokens per row; longer rows are truncated",
    "stages.epochs": "passes over the training rows, when steps = 0",
    "stages.group_by_length": "batch rows of similar length together (less padding)",
    "stages.packing": "pack several rows into one sequence (no padding; attention kept per row)",
    "stages.eval_every": "steps between validation losses; 0 = never",
    "stages.eval_batches": "validation batches per evaluation",
    "stages.save_every": "steps between checkpoints",
    "stages.report_every": "steps between progress lines and metrics records",
    "stages.seed": "this stage's seed; default: the recipe's",
    "stages.adapter.type": "LoRA, DoRA, or full fine-tuning (every weight)",
    "stages.adapter.rank": "LoRA / DoRA rank",
    "stages.adapter.alpha": "LoRA scale numerator: scale = alpha / rank",
    "stages.adapter.dropout": "dropout on the adapter's input",
    "rules.kind": "what the rule checks",
    "rules.weight": "the reward a passing response gets (a python rule's value is multiplied by it)",
    "eval.on_forgetting": "past the forgetting budget: warn, stop the stage (keep the last checkpoint within "
                          "budget), or keep the within-budget checkpoint with the best task metric",
    "eval.max_tokens": "tokens generated per golden prompt",
    "eval.limit": "golden rows scored (the first N)",
    "provenance.attest": "[[provenance.attest]] tables: a source the gate blocks that you may use anyway",
    "dpo.loss_type": "DPO: the sigmoid loss (Rafailov et al.), IPO's squared loss, or the hinge loss",
    "distill.mode": "distill: match the teacher's logits, or train on the teacher's sampled answers",
    "distill.loss": "distill, logits mode: the divergence to the teacher",
    "distill.temperature": "distill: softmax temperature of teacher and student",
    "distill.jsd_beta": "distill: the mixture weight of the generalised JSD",
    "ppo.temperature": "ppo: sampling temperature of rollouts",
    "ppo.kl_estimator": "ppo: the per-token KL estimate (k1: log-ratio; k3: Schulman's unbiased, positive one)",
    "ppo.gamma": "ppo: discount factor",
    "ppo.lam": "ppo: GAE's lambda",
    "ppo.clip_range": "ppo: the policy ratio's clip range",
    "ppo.value_clip": "ppo: the value prediction's clip range",
    "ppo.whiten_advantages": "ppo: normalise advantages to mean 0, std 1 per batch",
    "grpo.max_new_tokens": "grpo: the longest sampled completion",
    "grpo.temperature": "grpo: sampling temperature",
    "grpo.top_p": "grpo: nucleus sampling",
    "grpo.loss_type": "grpo: the loss's normalisation: GRPO, Dr. GRPO, BNPO or DAPO",
    "grpo.heldout_prompts": "grpo: held-out prompts scored before and after the stage",
    "grpo.dequantize_rollouts": "grpo, QLoRA on CPU: sample from an fp32 copy of the base",
}


def recipe_tables():
    """[(heading, table key prefix, dataclass, extra choices)] in the order the reference shows them."""
    from localtune import methods, recipe

    out = [("Top level", "recipe", recipe.Recipe), ("`[model]`", "model", recipe.ModelSpec),
           ("`[model] quantize = { ... }`", "model.quantize", recipe.Quantize),
           ("`[[stages]]`: every stage", "stages", recipe.Stage),
           ("`[stages.adapter]`", "stages.adapter", recipe.Adapter)]
    out += [(f'`[[stages]]` with `kind = "{m.kind}"`', m.kind, m.options) for m in methods.all_methods() if m.options]
    out += [("`[[stages.rules]]` (ppo) and `[[stages.rewards]]` (grpo)", "rules", recipe.Rule),
            ("`[eval]`", "eval", recipe.EvalSpec), ("`[[provenance.attest]]`", "provenance.attest", recipe.Attest),
            ("`[provenance]`", "provenance", recipe.Provenance)]
    return out


TABLES = {"model", "stages", "eval", "provenance", "adapter", "quantize", "options", "source", "base_dir"}
TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "table"}


def type_name(hint) -> str:
    types = [t for t in get_args(hint) if t is not type(None)] if get_origin(hint) is Union else [hint]
    name = " or ".join(TYPE_NAMES.get(t, "table") for t in types)
    return name + (", optional" if get_origin(hint) is Union and type(None) in get_args(hint) else "")


def default_text(f) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def allowed_text(name: str, meta) -> str:
    from localtune import methods

    if name == "kind" and meta.get("choices") is None:  # the stage kinds: the methods' registry
        return " \\| ".join(f'`"{k}"`' for k in methods.kinds())
    if meta.get("choices"):
        return " \\| ".join(f'`"{c}"`' if isinstance(c, str) else f"`{c}`" for c in meta["choices"])
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"{lo} to {hi}"
    return f"≥ {lo}" if lo is not None else (f"≤ {hi}" if hi is not None else "")


def key_rows(prefix: str, cls) -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, allowed, meaning) for each key of one table, in the dataclass's order."""
    hints = get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in TABLES and prefix in ("recipe", "stages"):
            continue  # a table of its own, or internal
        meaning = f.metadata.get("doc") or MEANINGS.get(f"{prefix}.{f.name}", "")
        rows.append((f.name, type_name(hints[f.name]), default_text(f), allowed_text(f.name, f.metadata), meaning))
    return rows


def recipe_reference() -> str:
    lines = []
    for heading, prefix, cls in recipe_tables():
        lines += [f"### {heading}", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        lines += [f"| `{k}` | {t} | {d} | {a} | {m.replace('|', chr(92) + '|')} |" for k, t, d, a, m in
                  key_rows(prefix, cls)]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def missing_meanings() -> list[str]:
    return [f"{prefix}.{row[0]}" for _, prefix, cls in recipe_tables() for row in key_rows(prefix, cls) if not row[4]]


def commands(group=None, prefix=("localtune",)):
    """(words, click command) for every visible leaf command, sorted by name."""
    from localtune.cli import cli

    group = group or cli
    for name, cmd in sorted(group.commands.items()):
        if cmd.hidden:
            continue
        if isinstance(cmd, click.Group):
            yield from commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def command_reference() -> str:
    lines = []
    for words, cmd in commands():
        ctx = click.Context(cmd, info_name=" ".join(words))
        lines += [f"### `{' '.join(words)}`", "", (cmd.help or "").split("\n\n")[0].replace("\n", " ").strip(), "",
                  f"`{' '.join([*words, *cmd.collect_usage_pieces(ctx)])}`", ""]
        options = [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]
        if options:
            lines += ["| option | meaning |", "|---|---|"]
            for p in options:
                names, text = p.get_help_record(ctx)
                lines.append(f"| `{names}` | {text.replace('|', chr(92) + '|')} |")
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


GENERATED = {"recipe-keys": ("docs/recipes.md", recipe_reference),
             "commands": ("docs/commands.md", command_reference)}


def generated_block(text: str, name: str) -> str | None:
    begin, end = BEGIN.format(name), END.format(name)
    start, stop = text.find(begin), text.find(end)
    return None if start < 0 or stop < start else text[start + len(begin):stop].strip("\n") + "\n"


def write_generated(root: Path = ROOT) -> list[str]:
    changed = []
    for name, (page, make) in GENERATED.items():
        path = root / page
        text = path.read_text()
        begin, end = BEGIN.format(name), END.format(name)
        if generated_block(text, name) is None:
            raise SystemExit(f"{page} needs the lines {begin} and {end}, in that order")
        new = text[:text.find(begin) + len(begin)] + "\n" + make() + text[text.find(end):]
        if new != text:
            path.write_text(new)
            changed.append(page)
    return changed


# Checks on every page ---------------------------------------------------------------------------------

def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", root / "CHANGELOG.md", *sorted((root / "docs").rglob("*.md"))]


FENCE = re.compile(r"^```(\w*)\s*$")


def code_blocks(text: str) -> list[list[tuple[int, str]]]:
    """The fenced code blocks of a page, each as its (line number, line) pairs."""
    blocks, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        if m := FENCE.match(line.strip()):
            fence = None if fence is not None else m.group(1)
            if fence is not None:
                blocks.append([])
            continue
        if fence is not None:
            blocks[-1].append((n, line))
    return blocks


def code_lines(text: str):
    """(line number, line) of each line inside a fenced code block."""
    return [pair for block in code_blocks(text) for pair in block]


def command_lines(text: str):
    """(line number, words) of each `localtune ...` command shown in a code block (after `$ `, `mlx.launch ... --`
    or at the start of the line), up to a `#` comment, a pipe or a redirection. In a block that shows `$ ` prompts,
    only the prompted lines are commands (the rest is output)."""
    for block in code_blocks(text):
        prompted = any(re.match(r"\s*\$\s", line) for _, line in block)
        yield from block_commands([(n, line) for n, line in block if not prompted or re.match(r"\s*\$\s", line)])


def block_commands(lines):
    for n, line in lines:
        line = re.sub(r"^\s*\$\s+", "", line)
        line = re.sub(r"^mlx\.launch .*? -- (\S*/)?(?=localtune )", "", line)
        if not re.match(r"(pip install .*&& )?localtune ", line):
            continue
        line = re.sub(r"^pip install .*?&& ", "", line)
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            words = line.split()
        for i, w in enumerate(words):
            if w in ("|", "&&", ">", "<", ";") or w.startswith(">"):
                words = words[:i]
                break
        # usage notation (`[--out FILE]`, `q8_0|q4_0`, `[--teacher REF]...`): optional parts kept, first choice
        words = [w.strip("[]").removesuffix("...").strip("[]").split("|")[0] for w in words]
        yield n, [w for w in words if w]


def check_command(words: list[str], group=None) -> str | None:
    """None when `localtune ...` names a command and options that exist; else what is wrong. Parses the
    arguments with click's own parser (no type conversion, nothing invoked)."""
    from localtune.cli import cli

    cmd, rest, used = group or cli, list(words[1:]), [words[0]]
    while isinstance(cmd, click.Group):
        if not rest or rest[0] in ("--help", "--version"):
            return None
        sub = cmd.commands.get(rest[0])
        if sub is None:
            return f"no command {' '.join(used + rest[:1])!r}"
        cmd, used, rest = sub, used + rest[:1], rest[1:]
    ctx = click.Context(cmd, info_name=" ".join(used))
    try:
        _, args, _ = cmd.make_parser(ctx).parse_args(args=rest)
    except click.UsageError as e:
        return f"{' '.join(used)}: {e.format_message()}"
    positional = [p for p in cmd.params if isinstance(p, click.Argument)]
    if not any(p.nargs == -1 for p in positional) and len(args) > len(positional):
        return f"{' '.join(used)}: unexpected arguments {args[len(positional):]}"
    return None


LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors of a Markdown page."""
    out = set()
    fence = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fence = not fence
        elif not fence and (m := re.match(r"^#{1,6} (.*)", line)):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def broken_links(page: Path) -> list[str]:
    text = page.read_text()
    prose = "\n".join(line for n, line in enumerate(text.splitlines(), 1)
                      if n not in {k for k, _ in code_lines(text)})
    found = []
    for m in LINK.finditer(prose):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            found.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            found.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor})")
    return found


RECIPE_NAME = re.compile(r"(?<![\w/.-])(recipes/[\w.-]+\.toml)(?!:\d)")  # not an error message's file:line


def named_recipes(root: Path = ROOT) -> dict[str, list[str]]:
    """recipes/NAME.toml -> the pages that name it."""
    out: dict[str, list[str]] = {}
    for page in pages(root):
        for name in RECIPE_NAME.findall(page.read_text()):
            out.setdefault(name, []).append(str(page.relative_to(root)))
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    done = write_generated()
    print("rewrote " + ", ".join(done) if done else "the generated blocks were up to date")
