"""The package's shape, kept: shared code never asks which method a stage is, modules stay small,
and what crosses modules has a public name. The registry is the one list of methods."""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from click.testing import CliRunner

from localtune import methods
from localtune.cli import cli

PACKAGE = Path(__file__).resolve().parents[1] / "localtune"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 450


def test_no_stage_kind_checks_outside_methods():
    found = [f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}" for p in MODULES if "methods" not in p.parts
             for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\.kind *(==|!=|in) ", line)]
    assert not found, "ask the stage's Method instead (methods/base.py):\n" + "\n".join(found)


def test_no_module_is_over_450_lines():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in MODULES}
    assert not {k: v for k, v in sizes.items() if v > MAX_LINES}


def test_no_private_name_crosses_a_module():
    found = []
    for p in MODULES:
        tree = ast.parse(p.read_text())
        ours = set()  # names bound to localtune modules in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("localtune")):
                ours |= {a.asname or a.name for a in node.names}
                found += [f"{p.name}:{node.lineno} imports {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
        found += [f"{p.name}:{node.lineno} uses {node.value.id}.{node.attr}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in ours and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not found, found


def test_every_registered_method_is_its_kind_and_its_keys_are_its_own():
    for kind in methods.kinds():
        method = methods.get(kind)
        assert method.kind == kind
        assert method.options is None or dataclasses.is_dataclass(method.options)
    keys = methods.key_kinds()
    assert set(keys["beta"]) == {"dpo", "grpo", "simpo", "kto"}
    assert set(keys["max_new_tokens"]) == {"distill", "ppo", "grpo"}
    common = {f.name for f in dataclasses.fields(__import__("localtune.recipe").recipe.Stage)}
    assert not common & set(keys), "a method's own key shadows a key every stage has"


TOY = '''"""A toy method, as a new method's file would be: SFT with its loss scaled by a recipe key."""
from dataclasses import dataclass

from ..recipe import option
from ..train.metrics import Metric
from .base import Method
from .sft import loss as sft_loss


@dataclass(frozen=True)
class Options:
    scale: float = option(1.0, min=0.0, doc="toy: the loss is scaled by this")


class Toy(Method):
    kind = "toy"
    options = Options
    metrics = (Metric("sft_loss", "unscaled loss"),)

    def validate(self, stage, before, fail):
        if stage.options.scale == 0:
            raise fail("scale", "scale = 0 trains nothing", "use scale = 0.5")

    def loss(self, stage):
        def scaled(model, batch):
            value, weight, _ = sft_loss(model, batch)
            return stage.options.scale * value, weight, {"sft_loss": value}

        return scaled


METHOD = Toy()
'''


def test_a_new_method_is_one_file_and_one_registry_line(tmp_path, monkeypatch, small_model_path):
    """The toy file above plus its registry line: the recipe, its key checks, the stage loop, the report,
    the TUI's metrics and the planner take it with no other change."""
    import json
    import sys
    import types

    from test_cli import invoke, only_run, write_recipe

    module = types.ModuleType("localtune.methods.toy")
    module.__package__ = "localtune.methods"
    monkeypatch.setitem(sys.modules, "localtune.methods.toy", module)
    exec(compile(TOY, "localtune/methods/toy.py", "exec"), module.__dict__)
    monkeypatch.setitem(methods.REGISTRY, "toy", "toy")  # the one registry line

    recipe = write_recipe(tmp_path, small_model_path, kind="toy", scale=0.5, steps=2)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = only_run(tmp_path / "runs")
    trained = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in trained if r.get("kind") == "train"]
    assert steps and all(abs(r["loss"] - 0.5 * r["sft_loss"]) < 1e-5 for r in steps)
    assert "| toy (toy) |" in (run / "report.md").read_text()
    from localtune.train import metrics

    assert [m.label for m, _ in metrics.method_metrics("toy", steps[-1])] == ["unscaled loss"]  # the TUI's panel
    assert invoke("plan", recipe, "--no-calibrate").exit_code == 0

    wrong = write_recipe(tmp_path, small_model_path, kind="sft", scale=0.5)
    result = CliRunner().invoke(cli, ["run", str(wrong), "--no-tui"])
    assert result.exit_code != 0 and 'scale only applies to kind = "toy" stages' in result.output
    zero = write_recipe(tmp_path, small_model_path, kind="toy", scale=0)
    result = CliRunner().invoke(cli, ["run", str(zero), "--no-tui"])
    assert result.exit_code != 0 and "scale = 0 trains nothing" in result.output
