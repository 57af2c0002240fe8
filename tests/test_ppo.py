"""The ppo stage: rollouts in the batch iterator, one base for policy / reference / critic / reward,
rule rewards, exact resume, and bad input."""
import dataclasses
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from test_cli import ROOT, invoke, only_run, write_recipe
from test_trainer import run_dir, snapshot

from localtune import models
from localtune.methods import ppo, prompts, rewards
from localtune.recipe import Adapter, Rule, make_stage
from localtune.train import adapters, data, trainer

PPO = make_stage("ppo", name="ppo", batch_size=4, minibatch_size=2, ppo_epochs=2, max_new_tokens=6,
            temperature=1.0, seed=0, rules=[Rule(kind="length", max=12)], adapter=Adapter(rank=4, alpha=8))


@pytest.mark.parametrize("rule, text, expected", [
    (Rule(kind="regex", pattern=r"\d{4}-\d{2}-\d{2}"), " 2021-03-05 ", True),
    (Rule(kind="regex", pattern=r"\d{4}-\d{2}-\d{2}"), "2021-03-05 and more", False),
    (Rule(kind="json", keys=["date"]), '{"date": "2021-03-05"}', True),
    (Rule(kind="json", keys=["date"]), '{"day": 5}', False),
    (Rule(kind="json"), "[1, 2]", True),
    (Rule(kind="json"), "{not json", False),
    (Rule(kind="length", min=2, max=5), "abcde", True),
    (Rule(kind="length", min=2, max=5), "abcdef", False),
    (Rule(kind="contains", text="ISO"), "in iso form", True),
    (Rule(kind="excludes", text="sorry"), "Sorry, I cannot", False),
])
def test_rules_pass_or_fail(rule, text, expected):
    assert rewards.passes(rule, text) is expected


def test_rule_rewards_combine_with_their_weights():
    tok = models.load_tokenizer(ROOT / "models" / "small")
    reward = rewards.Reward(tok, [Rule(kind="contains", text="a", weight=2.0), Rule(kind="length", max=3, weight=-1.0)])
    scores, parts = reward(None, ["p"] * 3, ["abc", "bcdef", "zz"])
    assert scores.tolist() == [2.0 - 1.0, 0.0, -1.0]
    assert parts["rule1"].tolist() == [1, 0, 0] and parts["rule2"].tolist() == [1, 0, 1]


def _prompts(tok, n=8):
    rows = [json.loads(line) for line in (ROOT / "data/date_prefs/train.jsonl").read_text().splitlines()[:n]]
    return prompts.encode_prompts(rows, tok, 64, PPO.options.max_new_tokens, "mem")


def _policy(path, seed=1):
    model, tok, _, _ = models.load(str(path))
    mx.random.seed(seed)
    config = adapters.attach(model, PPO.adapter)
    ppo.attach_value_head(model)
    return model, tok, config


def _train(model, tok, run, steps, stage=PPO, report=lambda r: None, save_every=100):
    rollouts = ppo.Rollouts(model, tok, data.Batches(_prompts(tok), stage.batch_size, 0, collate=prompts.collate),
                            rewards.Reward(tok, stage.options.rules), stage, run.path / "ppo", lambda kind, **kw: None)
    args = trainer.TrainArgs(steps=steps, learning_rate=1e-2, report_every=1, save_every=save_every, eval_every=0)
    return trainer.train(model, ppo.make_loss(stage), rollouts, args, run=run, stage="ppo",
                         stage_dir=run.path / "ppo", adapter_config={}, report=report), rollouts


def test_updates_move_the_policy_adapters_and_value_head_and_never_the_base(small_model_path, tmp_path):
    model, tok, _ = _policy(small_model_path)
    before = snapshot(model)
    trainable = set(adapters.trainable_weights(model))
    records = []
    _train(model, tok, run_dir(tmp_path), 2, report=records.append)
    after = snapshot(model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    # lora_b and the value head move on step 1; lora_a (zero gradient while lora_b = 0) on step 2
    assert changed == trainable and {"value_head.weight", "value_head.bias"} <= changed
    first = next(r for r in records if r["kind"] == "train")
    # step 0: the policy is the reference (lora_b = 0) and the old policy (ratio 1: nothing clipped)
    assert first["kl"] == 0.0 and first["approx_kl"] == pytest.approx(0.0, abs=1e-6) and first["clip_frac"] == 0.0
    for key in ("reward_mean", "reward_std", "entropy", "value_loss", "explained_variance", "response_length",
                "rollout_sec", "scoring_sec", "kl_coef"):
        assert key in first, key


def test_a_crashed_ppo_stage_resumes_mid_rollout_to_the_same_weights(small_model_path, tmp_path):
    straight, tok, _ = _policy(small_model_path)
    _train(straight, tok, run_dir(tmp_path, "straight"), 6)

    def crash_at_5(record):  # the checkpoint at step 3 is mid-way through the 1st rollout's 4 minibatches
        if record["kind"] == "train" and record["step"] == 5:
            raise RuntimeError("simulated crash")

    run = run_dir(tmp_path, "crashed")
    crashed, _, _ = _policy(small_model_path)
    with pytest.raises(RuntimeError):
        _train(crashed, tok, run, 6, report=crash_at_5, save_every=3)
    assert (run.path / "ppo" / "rollout-1.safetensors").exists() and (run.path / "ppo" / "rollout-2.safetensors").exists()
    resumed, _, _ = _policy(small_model_path, seed=99)  # another init: the checkpoint restores it
    summary, rollouts = _train(resumed, tok, run, 6, save_every=3)
    assert summary["step"] == 6 and rollouts.count == 2
    a, b = adapters.trainable_weights(straight), adapters.trainable_weights(resumed)
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-4, atol=1e-6)


def test_the_reference_is_the_policy_with_its_adapters_off(small_model_path):
    model, tok, _ = _policy(small_model_path)
    plain, _, _, _ = models.load(str(small_model_path))
    for layer in adapters.stage_adapters(model):
        layer.lora_b = mx.ones_like(layer.lora_b) * 0.01  # a policy that differs from its reference
    x = mx.array([[1, 20, 30, 40, 50]])
    with adapters.adapters_disabled(model):
        np.testing.assert_allclose(np.array(model(x)), np.array(plain(x)), atol=1e-5)
    assert not np.allclose(np.array(model(x)), np.array(plain(x)), atol=1e-3)


def _pairs_and_prompts(tmp_path):
    rows = [json.loads(line) for line in (ROOT / "data/date_prefs/train.jsonl").read_text().splitlines()]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[64:96]))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[96:104]))


PPO_STAGE = ["[[stages]]", 'kind = "ppo"', 'data = "prompts.jsonl"', 'valid = "held.jsonl"',
             'reward_model = "reward"', "steps = 4", "batch_size = 4", "minibatch_size = 2", "max_new_tokens = 8",
             "learning_rate = 1e-3", "report_every = 2", "heldout_prompts = 4", "save_every = 2",
             "[[stages.rules]]", 'kind = "length"', "max = 12", "weight = 0.5"]


def test_sft_reward_ppo_from_the_cli_shares_one_base(tmp_path, small_model_path):
    from localtune.loading import load_for_inference
    from localtune.methods.reward import rewards as reward_scores
    from localtune.methods.reward import whole

    recipe = write_recipe(tmp_path, small_model_path, steps=2)
    _pairs_and_prompts(tmp_path)
    recipe.write_text(recipe.read_text().replace("[eval]", "\n".join([
        "[[stages]]", 'kind = "reward"', 'data = "pairs.jsonl"', "steps = 4", "batch_size = 8",
        "learning_rate = 1e-3", "[stages.adapter]", "layers = 2",  # fewer layers than the policy's adapters
        *PPO_STAGE, "", "[eval]"])))
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "held-out prompts before" in result.output and "held-out prompts after" in result.output
    run = only_run(tmp_path / "runs")
    r = json.loads((run / "manifest.json").read_text())["stage_results"]["ppo"]
    assert r["heldout_before"]["kl"] == 0.0 and r["heldout_before"]["n"] == 4 and r["step"] == 4
    assert "## PPO (ppo: 4 held-out prompts" in (run / "report.md").read_text()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["when"] for m in metrics if m["kind"] == "sample" and m["stage"] == "ppo"][:2] == ["rollout 1"] * 2
    saved = mx.load(str(run / "ppo" / "adapters.safetensors"))
    assert "value_head.weight" in saved and any(k.endswith("lora_b") for k in saved)

    # the reward adapters, swapped onto the policy's own base, score as the reward model loaded alone
    policy, tok = load_for_inference(str(run), "sft")
    mx.random.seed(1)
    adapters.attach(policy, Adapter(rank=4, alpha=8))
    for layer in adapters.stage_adapters(policy):  # a policy that has moved: its adapters must not score
        layer.lora_b = mx.ones_like(layer.lora_b) * 0.05
    layers, _ = adapters.side_adapters(policy, run / "reward")
    shared = rewards.Reward(tok, (), layers, rewards.load_reward_head(run / "reward", policy.model.norm.weight.shape[0]))
    alone, _ = load_for_inference(str(run), "reward")
    texts = ["2021-03-05", "05/03/2021", "hello"]
    prompts = ["Date: 5 March 2021"] * 3
    ours, _ = shared(policy, prompts, texts)
    from localtune.methods.pairs import response_example as _response

    enc = data.Encoder(tok)
    tokens, real = whole([_response(enc, p, t, "") for p, t in zip(prompts, texts)])
    np.testing.assert_allclose(ours, np.array(reward_scores(alone, mx.array(tokens), mx.array(real))), atol=1e-4)

    # the run's model is sft + ppo (the reward branch left out), and the critic is not part of it
    model, _ = load_for_inference(str(run))
    assert "value_head" not in model


def test_a_reward_model_by_path_must_share_base_and_tokenizer(tmp_path, small_model_path):
    other = tmp_path / "other"
    shutil.copytree(small_model_path, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": len(tok["model"]["vocab"]) + 64, "content": "<|extra|>", "single_word": False,
                                "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (other / "tokenizer.json").write_text(json.dumps(tok))
    for name, folder in (("tok", other), ("base", ROOT / "models" / "smaller")):
        fake = tmp_path / f"fake-{name}"
        (fake / "reward").mkdir(parents=True)
        (fake / "recipe.toml").write_text(f'[model]\npath = "{folder}"\n[[stages]]\nkind = "reward"\n'
                                          'data = "x.jsonl"\nsteps = 1\n')
        (fake / "manifest.json").write_text(json.dumps({"model": {"folder": str(folder)}}))
        (fake / "status.json").write_text("{}")
        (fake / "reward" / "adapter_config.json").write_text(json.dumps({"reward_head": True}))
    _pairs_and_prompts(tmp_path)
    for name, expected in (("tok", "the reward model's tokenizer"), ("base", "trained on a different base")):
        recipe = write_recipe(tmp_path, small_model_path, steps=2)
        stage = [line.replace('"reward"', f'"{tmp_path / f"fake-{name}" / "reward"}"') for line in PPO_STAGE]
        recipe.write_text(recipe.read_text().replace("[eval]", "\n".join([*stage, "", "[eval]"])))
        result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
        assert result.exit_code == 2 and expected in result.output and "reward_model =" in result.output, result.output


def test_a_prompts_file_with_completions_only_names_the_stage_data(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path, steps=2)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"completion": "2021-03-05"}) + "\n")
    (tmp_path / "held.jsonl").write_text(json.dumps({"prompt": "Date: 5 March 2021"}) + "\n")
    stage = [line for line in PPO_STAGE if "reward_model" not in line]
    recipe.write_text(recipe.read_text().replace("[eval]", "\n".join([*stage, "", "[eval]"])))
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2, result.output
    assert "prompts.jsonl:1" in result.output and "[stages.ppo] data" in result.output and '{"prompt"' in result.output


def test_steps_from_epochs_count_every_minibatch_of_every_rollout():
    class Prompts:
        batches_per_epoch = 10

    stage = dataclasses.replace(PPO, steps=0, epochs=1.0)  # 10 rollouts x 2 epochs x 2 minibatches
    assert ppo.METHOD.steps(stage, Prompts()) == 40
