"""One Python floor, kept honest: pyproject's requires-python is the oldest Python every module parses
and imports under. There is no older Python here to run the suite on, so the checks are static."""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOOR = (3, 11)
MODULES = sorted((ROOT / "localtune").rglob("*.py"))
# Standard-library names newer than the floor that a module could reach for without noticing.
NEWER = {
    "itertools": {"batched"},  # 3.12
    "typing": {"override", "TypeAliasType", "get_protocol_members", "is_protocol", "ReadOnly", "TypeIs",
               "NoDefault"},  # 3.12, 3.13
    "warnings": {"deprecated"},  # 3.13
    "copy": {"replace"},  # 3.13
    "calendar": {"Month", "Day"},  # 3.12
}
NEWER_MODULES = {"annotationlib", "compression", "string.templatelib"}  # 3.14


def test_requires_python_is_the_floor_tested_here():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert spec == ">=" + ".".join(map(str, FLOOR))


def test_no_dependency_only_for_older_pythons():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    old = [d for d in deps if (m := re.search(r"python_version\s*<\s*'(\d+)\.(\d+)'", d))
           and (int(m[1]), int(m[2])) <= FLOOR]
    assert not old, f"markers for Pythons below the {FLOOR} floor: {old}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_parses_and_imports_at_the_floor(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=FLOOR)
    for node in ast.walk(tree):
        if getattr(node, "type_params", None):  # on 3.12+ interpreters, in case feature_version lets it by
            pytest.fail(f"{path}:{node.lineno}: PEP 695 syntax needs Python 3.12")
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name in NEWER_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            bad = [a.name for a in node.names if a.name in NEWER.get(node.module, ())]
            bad += [node.module] if node.module in NEWER_MODULES else []
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            bad = [node.attr] if node.attr in NEWER.get(node.value.id, ()) else []
        else:
            continue
        assert not bad, f"{path}:{node.lineno}: {bad} is newer than Python {FLOOR}"


def test_the_checks_catch_what_they_are_for():
    with pytest.raises(SyntaxError):  # a 3.12 type statement
        ast.parse("type Pair = tuple[int, int]\n", feature_version=FLOOR)
    assert "batched" in NEWER["itertools"]
