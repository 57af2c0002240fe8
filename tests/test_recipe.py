"""Recipe validation: every broken recipe in tests/bad_recipes/ fails with a precise message."""
from pathlib import Path

import pytest

from localtune import recipe
from localtune.errors import RecipeError

BAD = sorted((Path(__file__).parent / "bad_recipes").glob("*.toml"))
RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))


def expectations(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect:"), f"{path} needs a '# expect:' header"
    return [part.strip() for part in first[len("# expect:"):].split("|")]


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_recipe_is_rejected_with_where_what_and_fix(path):
    with pytest.raises(RecipeError) as err:
        recipe.load(path)
    message = err.value.message
    assert message.startswith(str(path)), message
    for expected in expectations(path):
        assert expected in message, f"{expected!r} not in:\n{message}"
    assert err.value.exit_code == 2


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    r = recipe.load(path)
    assert r.stages and r.model.path
    for stage in r.stages:  # local data exists; an hf: dataset is an owner/name id (tested in test_datasets.py)
        from localtune.datasets.hub import REPO

        assert (REPO.fullmatch(stage.data[3:]) if stage.data.startswith("hf:")
                else Path(r.resolve(stage.data)).exists()), f"{path}: {stage.data} missing"


def test_defaults_and_derived_fields():
    r = recipe.parse('seed = 7\n[model]\npath = "m"\n[[stages]]\nkind = "sft"\ndata = "d.jsonl"\nsteps = 3\n'
                     '[[stages]]\nkind = "sft"\ndata = "d.jsonl"\nepochs = 1\nseed = 1\n', "r.toml")
    assert [s.name for s in r.stages] == ["sft", "sft2"]
    assert [s.seed for s in r.stages] == [7, 1]
    assert r.stages[0].adapter == recipe.Adapter()
    assert r.name == "r" and r.eval.metric == "exact_match"
    assert isinstance(r.stages[0].learning_rate, float)


def test_int_is_accepted_where_a_float_is_expected():
    r = recipe.parse('[model]\npath = "m"\n[[stages]]\nkind = "sft"\ndata = "d"\nsteps = 1\nlearning_rate = 1\n')
    assert r.stages[0].learning_rate == 1.0


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        recipe.load(tmp_path / "nope.toml")
