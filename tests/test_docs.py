"""The docs cannot go stale quietly: the recipe key and command references are the code's, every recipe the
docs name parses, every `localtune ...` line in a code block parses with click, every relative link resolves.
A renamed key or command fails these checks (shown below with deliberately renamed ones)."""
from __future__ import annotations

import dataclasses
import re
from typing import get_type_hints

import click
import docs_reference as ref
import pytest

from localtune import methods, recipe
from localtune.cli import cli


def renamed(cls, old: str, new: str):
    """A copy of a recipe dataclass with one key renamed (fresh fields: the real class is left alone)."""
    hints = get_type_hints(cls)

    def copy(f):
        kw = {"default": f.default} if f.default is not dataclasses.MISSING else {"default_factory": f.default_factory}
        return dataclasses.field(metadata=f.metadata, **kw)
    return dataclasses.make_dataclass(cls.__name__, [(new if f.name == old else f.name, hints[f.name], copy(f))
                                                     for f in dataclasses.fields(cls)], frozen=True)


@pytest.mark.parametrize("name", sorted(ref.GENERATED))
def test_the_generated_reference_is_the_codes(name):
    page, make = ref.GENERATED[name]
    block = ref.generated_block((ref.ROOT / page).read_text(), name)
    assert block is not None, f"{page} lost its {ref.BEGIN.format(name)} / {ref.END.format(name)} lines"
    assert block == make(), f"{page} is stale: run `{ref.REGENERATE}` and commit the result"


def test_every_recipe_key_has_a_meaning_and_no_meaning_is_for_a_key_that_is_gone():
    missing = ref.missing_meanings()
    assert not missing, f"give these keys doc=... in their option(), or a line in docs_reference.MEANINGS: {missing}"
    keys = {f"{prefix}.{row[0]}" for _, prefix, cls in ref.recipe_tables() for row in ref.key_rows(prefix, cls)}
    assert not set(ref.MEANINGS) - keys, f"MEANINGS names keys the parser no longer has: {set(ref.MEANINGS) - keys}"


def test_the_reference_lists_exactly_the_keys_the_parser_accepts():
    """Every key in the reference's stage tables parses in a recipe, and one the reference lacks does not."""
    text = (ref.ROOT / "docs/recipes.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)` \|", ref.generated_block(text, "recipe-keys"), re.M))
    stage_keys = {f.name for f in dataclasses.fields(recipe.Stage)} - {"options"}
    for _, prefix, cls in ref.recipe_tables():
        assert {r[0] for r in ref.key_rows(prefix, cls)} <= listed
    assert stage_keys - {"adapter"} <= listed
    assert '| `learning_rate` | number | `0.0001` | 0.0 to 1.0 | peak learning rate |' in text
    assert "| `beta` | number, optional | unset |  | DPO: strength of the pull towards the reference (required) |" \
        in text
    kinds = " \\| ".join(f'`"{k}"`' for k in methods.kinds())  # the registry's kinds: the parser's choices
    assert f'| `kind` | string | `"sft"` | {kinds} |' in text and '`"ppo"` \\| `"grpo"`' in kinds


def test_a_renamed_recipe_key_makes_the_reference_stale(monkeypatch):
    """The parser's Stage with learning_rate renamed: the reference no longer matches, and the recipe that uses
    the old name no longer parses."""
    block = ref.generated_block((ref.ROOT / "docs/recipes.md").read_text(), "recipe-keys")
    assert block == ref.recipe_reference()
    monkeypatch.setattr(recipe, "Stage", renamed(recipe.Stage, "learning_rate", "lr"))
    assert block != ref.recipe_reference() and "| `lr` | number | `0.0001`" in ref.recipe_reference()
    with pytest.raises(recipe.RecipeError, match='unknown key "learning_rate"'):
        recipe.load(ref.ROOT / "recipes/quickstart.toml")


def test_a_renamed_method_key_and_a_changed_default_make_the_reference_stale(monkeypatch):
    from localtune.methods import dpo

    block = ref.generated_block((ref.ROOT / "docs/recipes.md").read_text(), "recipe-keys")
    monkeypatch.setattr(dpo.METHOD, "options", renamed(dpo.Options, "beta", "dpo_beta"), raising=False)
    assert "`dpo_beta`" in ref.recipe_reference() and block != ref.recipe_reference()
    monkeypatch.undo()
    changed = dataclasses.make_dataclass("Quantize", [("bits", int, recipe.option(8, choices=(4, 8))),
                                                      ("group_size", int, recipe.option(64))], frozen=True)
    monkeypatch.setattr(recipe, "Quantize", changed)
    assert block != ref.recipe_reference()


def test_the_command_list_is_the_clis():
    words = {" ".join(w) for w, _ in ref.commands()}
    assert {"localtune run", "localtune data preview", "localtune models check", "localtune doctor"} <= words
    assert "localtune _train" not in words  # hidden
    readme = (ref.ROOT / "README.md").read_text()
    section = readme[readme.index("## Commands"):readme.index("## Documentation")]
    listed = set()
    for cell in re.findall(r"^\| `(localtune [^`]*)` \|", section, re.M):
        names = [w for w in cell.split()[1:] if re.fullmatch(r"[a-z]+", w)]
        listed.add(" ".join(["localtune", *names[:2 if names and names[0] in cli.commands
                                               and isinstance(cli.commands[names[0]], click.Group) else 1]]))
    assert listed == words, f"the README's command table and the CLI differ: {listed ^ words}"


def test_a_renamed_command_or_option_makes_the_command_reference_stale_and_its_lines_fail(monkeypatch):
    block = ref.generated_block((ref.ROOT / "docs/commands.md").read_text(), "commands")
    assert block == ref.command_reference()
    assert ref.check_command(["localtune", "export", "runs/x", "--gguf", "--quant", "q8_0", "--out", "a.gguf"]) is None
    monkeypatch.setitem(cli.commands, "convert", cli.commands["export"])
    monkeypatch.delitem(cli.commands, "export")
    assert block != ref.command_reference()
    assert ref.check_command(["localtune", "export", "runs/x", "--gguf"]) == "no command 'localtune export'"
    monkeypatch.undo()
    verify = next(p for p in cli.commands["export"].params if p.name == "verify")
    monkeypatch.setattr(verify, "opts", ["--check"])
    assert block != ref.command_reference()
    assert "No such option '--verify'" in ref.check_command(["localtune", "export", "r", "--gguf", "--verify"])


def test_every_localtune_line_in_a_code_block_parses():
    found, bad = 0, []
    for page in ref.pages():
        for n, words in ref.command_lines(page.read_text()):
            found += 1
            if problem := ref.check_command(words):
                bad.append(f"{page.relative_to(ref.ROOT)}:{n}: {problem}")
    assert found > 30 and not bad, "\n".join(bad)


def test_the_command_line_check_finds_a_wrong_option_and_an_extra_argument():
    lines = dict(ref.command_lines("```bash\n$ localtune run recipes/quickstart.toml --no-tiu   # typo\n"
                               "$ mlx.launch --hostfile h.json -- ~/lt/bin/localtune runs a b\n"
                                   "localtune output, not a command\n```\n"))
    assert lines == {2: ["localtune", "run", "recipes/quickstart.toml", "--no-tiu"], 3: ["localtune", "runs", "a", "b"]}
    assert "No such option '--no-tiu'" in ref.check_command(lines[2])
    assert "unexpected arguments ['a', 'b']" in ref.check_command(lines[3])


def test_every_recipe_the_docs_name_exists_and_parses():
    named = ref.named_recipes()
    assert "recipes/quickstart.toml" in named and len(named) >= 10
    for name, where in sorted(named.items()):
        assert (ref.ROOT / name).is_file(), f"{name}, named in {where}, does not exist"
        recipe.load(ref.ROOT / name)


def test_every_relative_link_resolves():
    bad = [b for page in ref.pages() for b in ref.broken_links(page)]
    assert not bad, "\n".join(bad)


def test_a_broken_link_and_a_missing_anchor_are_found(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Every key\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#every-key) [gone](docs/b.md) [no heading](docs/a.md#nothing)\n"
                    "```\n[in code](nowhere.md)\n```\n")
    monkeypatch.setattr(ref, "ROOT", tmp_path)
    assert ref.broken_links(page) == ["README.md: docs/b.md (no such file)", "README.md: docs/a.md#nothing (no heading "
                                                                         "#nothing)"]


def test_regenerating_writes_only_between_the_markers(tmp_path):
    (tmp_path / "docs").mkdir()
    for name, (page, _) in ref.GENERATED.items():
        (tmp_path / page).write_text(f"# Top\n\n{ref.BEGIN.format(name)}\nold\n{ref.END.format(name)}\n\nBelow.\n")
    assert sorted(ref.write_generated(tmp_path)) == sorted(page for page, _ in ref.GENERATED.values())
    text = (tmp_path / "docs/recipes.md").read_text()
    assert text.startswith("# Top\n\n") and text.endswith(f"{ref.END.format('recipe-keys')}\n\nBelow.\n")
    assert ref.generated_block(text, "recipe-keys") == ref.recipe_reference()
    assert ref.write_generated(tmp_path) == []


METHOD_PAGE = ["What it does", "Data", "Keys", "Metrics", "Recipes and measured numbers"]


def test_every_method_has_a_page_with_the_same_sections_in_order():
    for kind in methods.REGISTRY:
        lines = (ref.ROOT / "docs/methods" / f"{kind}.md").read_text().splitlines()
        headings = [line[3:] for line in lines if line.startswith("## ")]
        assert [h for h in headings if h in METHOD_PAGE] == METHOD_PAGE, (kind, headings)


def test_the_readme_is_a_front_page():
    lines = (ref.ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 175
    assert lines[3:5] == [  # .ci/run and the tests run these two
        'pip install -e . && localtune run recipes/quickstart.toml      # install, then fine-tune the bundled model '
        '(~1.5 min on 2 CPU cores)',
        'pip install -e ".[dev]" && pytest                              # install with test extras, then run the '
        'tests (what .ci/run runs)']


def test_the_readmes_glance_at_the_matrix_names_the_families_that_do_everything():
    from localtune.models import families

    readme = (ref.ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.endswith("verified GGUF and GGUF LoRA export |"))
    for family in families.FAMILIES:
        everything = all(v is True for v in family.support().values())
        assert (family.name in row) == everything, f"{family.name}: the README's glance at the matrix is stale"
