"""The reward stage: Bradley-Terry on a scalar head, a branch off the chain, and `localtune score`."""
import json
import random

import mlx.core as mx
import numpy as np
import pytest
from test_cli import invoke, only_run, write_recipe

from localtune.methods import reward
from localtune.train import data


def _pairs(path, n, seed):
    rng = random.Random(seed)
    words = ["river", "stone", "king", "bread", "light", "house", "field", "song", "road", "tree"]
    rows = []
    for _ in range(n):
        topic = rng.sample(words, 2)
        rows.append({"prompt": f"Say something about the {topic[0]} and the {topic[1]}.",
                     "chosen": f"The {topic[0]} is good and kind.", "rejected": f"The {topic[0]} is bad and cruel."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bradley_terry_loss_by_hand(monkeypatch):
    r = mx.array([2.0, 0.5, 1.0, 1.0])  # chosen 2.0, 0.5; rejected 1.0, 1.0
    monkeypatch.setattr(reward, "rewards", lambda model, tokens, real: r)
    loss = reward.make_loss(centering=0.1)
    value, pairs, metrics = loss(None, {"tokens": None, "real": None, "margin": mx.array([0.0, 0.5])})
    d, m = np.array([1.0, -0.5]), np.array([0.0, 0.5])
    expected = np.mean(np.log1p(np.exp(-(d - m)))) + 0.1 * np.mean(np.array([3.0, 1.5]) ** 2)
    assert value.item() == pytest.approx(expected, rel=1e-6) and pairs.item() == 2
    assert metrics["accuracy"].item() == 0.5 and metrics["margin"].item() == pytest.approx(0.25)


def test_a_separable_toy_set_reaches_full_accuracy_and_the_branch_comes_off(tmp_path, small_model_path):
    from localtune.loading import load_for_inference

    recipe = write_recipe(tmp_path, small_model_path, steps=2)
    _pairs(tmp_path / "pairs.jsonl", 120, 0)
    _pairs(tmp_path / "held.jsonl", 32, 1)
    recipe.write_text(recipe.read_text().replace("[eval]", "\n".join([
        "[[stages]]", 'kind = "reward"', 'data = "pairs.jsonl"', 'valid = "held.jsonl"', "steps = 30",
        "batch_size = 8", "learning_rate = 1e-3", "reward_centering = 0.01", "eval_every = 0",
        "[stages.adapter]", "rank = 4", "alpha = 8", "", "[eval]"])))
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = only_run(tmp_path / "runs")
    heldout = json.loads((run / "manifest.json").read_text())["stage_results"]["reward"]["heldout"]
    assert heldout["pair_accuracy"] == 1.0 and heldout["margin_p10"] > 0
    assert "## Reward model (reward, 32 held-out pairs" in (run / "report.md").read_text()
    # the policy chain leaves the reward stage out: the run's model is base + sft
    policy, tok = load_for_inference(str(run))
    sft_only, _ = load_for_inference(str(run), "sft")
    x = mx.array([[1, 200, 300, 400]])
    assert "reward_head" not in policy and np.allclose(policy(x), sft_only(x), atol=1e-5)
    # score: a number per row; preference rows give both
    scored = invoke("score", "--reward", run / "reward", "--data", tmp_path / "held.jsonl")
    assert scored.exit_code == 0, scored.output
    lines = [list(map(float, line.split("\t"))) for line in scored.output.strip().splitlines()]
    assert len(lines) == 32 and all(c > r for c, r in lines)
    rows = [json.loads(line) for line in (tmp_path / "held.jsonl").read_text().splitlines()][:2]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                                              for r in rows))
    as_json = invoke("score", "--reward", run / "reward", "--data", tmp_path / "c.jsonl", "--json")
    assert [json.loads(line)["score"] for line in as_json.output.splitlines()] == pytest.approx(
        [c for c, _ in lines[:2]], abs=1e-4)
    wrong = invoke("score", "--reward", run / "sft", "--data", tmp_path / "c.jsonl")
    assert wrong.exit_code == 2 and "stage 'sft' is not a reward stage" in wrong.output


def test_the_reward_head_reads_the_last_real_token(small_model_path):
    from localtune import models

    model, _, _, _ = models.load(str(small_model_path))
    reward.attach_head(model)
    model.reward_head.weight = mx.ones_like(model.reward_head.weight)
    a = data.Example(np.array([1, 50, 60, 70], np.int32), np.ones(4, bool))
    b = data.Example(np.array([1, 50, 60, 70, 80, 90], np.int32), np.ones(6, bool))
    together = reward.score(model, [a, b])  # a is padded to b's width
    alone = reward.score(model, [a])
    assert together[0] == pytest.approx(alone[0], rel=1e-4) and together[0] != pytest.approx(together[1])


@pytest.mark.parametrize("stage, message", [
    ('kind = "reward"\ndata = "train.jsonl"\nsteps = 1\n', "a reward stage needs"),
    ('kind = "reward"\ndata = "pairs.jsonl"\nsteps = 1\n[stages.adapter]\ntype = "full"\n', "a reward stage is a branch"),
    ('kind = "sft"\ndata = "train.jsonl"\nsteps = 1\nreward_centering = 0.1\n', 'reward_centering only applies to kind = "reward"'),
])
def test_reward_stage_mistakes(tmp_path, small_model_path, stage, message):
    recipe = write_recipe(tmp_path, small_model_path, steps=1)
    _pairs(tmp_path / "pairs.jsonl", 8, 0)
    recipe.write_text(recipe.read_text().replace("[eval]", "[[stages]]\n" + stage + "\n[eval]"))
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and message in result.output, result.output
