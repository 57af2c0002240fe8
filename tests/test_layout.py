"""The package's shape, kept: shared code never asks which method a stage is, modules stay small,
and what crosses modules has a public name. The registry is the one list of methods."""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from localtune import methods

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
    for kind in methods.KINDS:
        method = methods.get(kind)
        assert method.kind == kind
        assert method.options is None or dataclasses.is_dataclass(method.options)
    keys = methods.key_kinds()
    assert keys["beta"] == ("dpo",) and set(keys["max_new_tokens"]) == {"distill", "ppo"}
    common = {f.name for f in dataclasses.fields(__import__("localtune.recipe").recipe.Stage)}
    assert not common & set(keys), "a method's own key shadows a key every stage has"
