"""DPO: the losses' maths, the reference as "adapters off", gradients that flow, and its data."""
import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_tiny_model
from test_trainer import fit, snapshot

from localtune import adapters, data, trainer
from localtune.cli import cli
from localtune.methods import dpo
from localtune.recipe import Adapter, Stage

# --- the losses, by hand and by numpy -----------------------------------------------------------


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("h,beta,eps,expected", [
    (0.0, 0.1, 0.0, math.log(2)),  # policy = reference
    (1.0, 0.5, 0.0, math.log(1 + math.exp(-0.5))),  # -log sigmoid(0.5) = 0.474077
    (2.0, 1.0, 0.1, 0.9 * math.log(1 + math.exp(-2)) + 0.1 * math.log(1 + math.exp(2))),  # 0.326928
])
def test_sigmoid_loss_by_hand(h, beta, eps, expected):
    assert math.isclose(dpo.sigmoid_loss(mx.array(h), beta, eps).item(), expected, rel_tol=1e-6)


def test_ipo_and_hinge_by_hand():
    assert math.isclose(dpo.ipo_loss(mx.array(0.2), 0.5).item(), (0.2 - 1.0) ** 2, rel_tol=1e-6)  # 0.64
    assert dpo.hinge_loss(mx.array(1.0), 0.5).item() == 0.5
    assert dpo.hinge_loss(mx.array(3.0), 0.5).item() == 0.0


def test_losses_match_numpy_on_fixed_values():
    h = np.random.default_rng(0).normal(scale=3, size=64).astype(np.float32)
    beta, eps = 0.3, 0.2
    np.testing.assert_allclose(np.array(dpo.sigmoid_loss(mx.array(h), beta, eps)),
                               -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h), rtol=1e-5)
    np.testing.assert_allclose(np.array(dpo.ipo_loss(mx.array(h), beta)), (h - 1 / (2 * beta)) ** 2, rtol=1e-5)
    np.testing.assert_allclose(np.array(dpo.hinge_loss(mx.array(h), beta)), np.maximum(0, 1 - beta * h), rtol=1e-6)


# --- pairs and batches ----------------------------------------------------------------------------

def pairs(n=8, vocab=100, seed=0) -> dpo.PairSet:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(3, vocab, int(rng.integers(4, 10))).astype(np.int32)
        made = []
        for _ in range(2):
            response = rng.integers(3, vocab, int(rng.integers(2, 8))).astype(np.int32)
            tokens = np.concatenate([prompt, response])
            made.append(data.Example(tokens, np.arange(len(tokens)) >= len(prompt)))
        out.append(dpo.Pair(i, *made))
    return dpo.PairSet(out, source="mem")


def stage(**kw):
    return Stage(kind="dpo", data="x", beta=kw.pop("beta", 0.1), adapter=Adapter(rank=4, alpha=8), **kw)


def batch_with_reference(model, pair_set, cache=None):
    b = next(data.Batches(pair_set, 4, 0, collate=dpo.collate_pairs))
    return trainer._to_mx(dpo.WithReference(None, model, cache).attach(b))


def test_sequence_logps_sum_the_response_tokens_of_each_row():
    model = make_tiny_model()
    ps = pairs()
    b = trainer._to_mx(dpo.collate_pairs(ps.examples[:3]))
    logps, ntoks = dpo.sequence_logps(model, b)
    logits = model(b["inputs"]).astype(mx.float32)
    token = mx.take_along_axis(logits, b["targets"][..., None], axis=-1)[..., 0] - mx.logsumexp(logits, axis=-1)
    np.testing.assert_allclose(np.array(logps), np.array((token * b["loss_mask"]).sum(-1)), rtol=1e-5)
    assert ntoks.tolist() == b["loss_mask"].sum(-1).tolist()


def test_at_step_zero_the_loss_is_log_2_and_rewards_are_zero():
    model = make_tiny_model()
    adapters.attach(model, Adapter(rank=4, alpha=8))
    b = batch_with_reference(model, pairs())
    loss, n, metrics = dpo.make_loss(stage())(model, b)
    assert n.item() == 4
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert metrics["reward_margin"].item() == 0.0 and metrics["rewards_chosen"].item() == 0.0


def test_adapters_off_is_exactly_the_base_model_even_after_training(tmp_path):
    base = make_tiny_model(seed=3)
    x = mx.array(np.random.default_rng(0).integers(0, 100, (2, 9)))
    expected = np.array(base(x))
    fit(base, data.Batches(pairs(), 4, 0, collate=dpo.collate_pairs), tmp_path, 2,
        loss=lambda m, b: (m(b["inputs"]).mean(), mx.array(1.0), {}))  # anything that moves the adapters
    assert not np.allclose(np.array(base(x)), expected)
    with adapters.adapters_disabled(base):
        np.testing.assert_array_equal(np.array(base(x)), expected)
    assert not np.allclose(np.array(base(x)), expected)  # and switched back on


def test_dpo_gradients_reach_every_lora_parameter(tmp_path):
    model = make_tiny_model()
    adapters.attach(model, Adapter(rank=4, alpha=8))
    trainable = set(adapters.trainable_weights(model))
    before = snapshot(model)
    batches = dpo.WithReference(data.Batches(pairs(), 4, 0, collate=dpo.collate_pairs), model, None)
    losses = []
    fit(model, batches, tmp_path, 2, loss=dpo.make_loss(stage()), attached=True,
        report=lambda r: losses.append(r["loss"]) if r["kind"] == "train" else None)
    after = snapshot(model)
    assert {k for k in before if not np.array_equal(before[k], after[k])} == trainable  # B after step 1, A after 2
    assert math.isclose(losses[0], math.log(2), rel_tol=1e-5)  # step 1 starts at policy = reference


def test_cached_and_live_reference_give_the_same_loss(tmp_path):
    model = make_tiny_model()
    adapters.attach(model, Adapter(rank=4, alpha=8))
    ps = pairs(12)
    cache = dpo.ReferenceCache.build(model, ps, tmp_path / "ref.safetensors", 5)
    again = dpo.ReferenceCache.build(model, ps, tmp_path / "ref.safetensors", 5)  # read back, not recomputed
    np.testing.assert_array_equal(cache.chosen, again.chosen)
    fn = dpo.make_loss(stage(sft_weight=0.5, loss_type="sigmoid", label_smoothing=0.1))
    live, cached = batch_with_reference(model, ps), batch_with_reference(model, ps, cache)
    np.testing.assert_allclose(np.array(live["reference_chosen"]), np.array(cached["reference_chosen"]), rtol=1e-5)
    assert math.isclose(fn(model, live)[0].item(), fn(model, cached)[0].item(), rel_tol=1e-5)


def test_changed_pairs_rebuild_the_cache(tmp_path):
    model = make_tiny_model()
    first = dpo.ReferenceCache.build(model, pairs(6, seed=1), tmp_path / "ref.safetensors", 4)
    second = dpo.ReferenceCache.build(model, pairs(6, seed=2), tmp_path / "ref.safetensors", 4)
    assert not np.allclose(first.chosen, second.chosen)


@pytest.mark.parametrize("steps,batch,reference,cached", [
    (10, 4, "auto", True),  # 40 pair visits over 8 pairs: cache once
    (1, 4, "auto", False),  # half an epoch: a cache would cost more than it saves
    (1, 4, "precomputed", True),
    (100, 4, "live", False),
])
def test_when_the_reference_is_cached(steps, batch, reference, cached):
    assert dpo.use_cache(stage(batch_size=batch, reference=reference), 8, steps) is cached


def test_identical_pairs_are_counted_and_skipped(tmp_path):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(__import__("conftest").ROOT / "models" / "small")
    rows = [{"prompt": "Date: 1 May 2001", "chosen": "2001-05-01", "rejected": "01/05/2001"},
            {"prompt": "Date: 2 May 2001", "chosen": "2001-05-02", "rejected": "2001-05-02"}]
    ps = dpo.encode_pairs(rows, tok, 128, "prefs.jsonl")
    assert len(ps) == 1 and ps.identical == 1
    pair = ps.examples[0]
    prompt_len = len(data.Encoder(tok).prompt_tokens("Date: 1 May 2001"))
    assert not pair.chosen.loss_mask[:prompt_len].any() and pair.chosen.loss_mask[prompt_len:].all()


# --- end to end, from the CLI ---------------------------------------------------------------------

def write_sft_dpo(tmp_path, small_model_path, dpo_rows=None, **dpo_stage):
    from conftest import ROOT

    prefs = ROOT / "data" / "date_prefs"
    (tmp_path / "sft.jsonl").write_text("".join((prefs / "sft.jsonl").read_text().splitlines(True)[:64]))
    rows = dpo_rows or [json.loads(x) for x in (prefs / "train.jsonl").read_text().splitlines()[:32]]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "valid.jsonl").write_text("".join((prefs / "valid.jsonl").read_text().splitlines(True)[:8]))
    settings = {"kind": "dpo", "data": "prefs.jsonl", "valid": "valid.jsonl", "beta": 0.1, "steps": 4,
                "batch_size": 4, "max_seq_len": 64, "eval_every": 4, "save_every": 2, "report_every": 1,
                "reference": "precomputed", **dpo_stage}
    lines = [f'[model]\npath = "{small_model_path}"\n',
             '[[stages]]\nkind = "sft"\ndata = "sft.jsonl"\nsteps = 4\nbatch_size = 4\nlearning_rate = 1e-3\n'
             "max_seq_len = 64\neval_every = 0\nreport_every = 2\n[stages.adapter]\nrank = 4\nalpha = 8\n",
             "[[stages]]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items() if v is not None]
    lines += ["[stages.adapter]\nrank = 4\nalpha = 8\n"]
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("\n".join(lines) + "\n")
    return recipe


def test_sft_then_dpo_uses_the_sft_model_as_reference(tmp_path, small_model_path):
    from localtune.pipeline import load_for_inference

    recipe = write_sft_dpo(tmp_path, small_model_path)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--no-tui", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").iterdir())
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train" and r["stage"] == "dpo"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert math.isclose(train[0]["loss"], math.log(2), rel_tol=1e-4)
    assert {"reward_margin", "preference_accuracy", "logps_chosen"} <= set(train[0])
    evals = [r for r in records if r["kind"] == "eval" and r["stage"] == "dpo"]
    assert evals and "preference_accuracy" in evals[-1]

    # the cached reference log-probs are the SFT model's (no DPO adapters), pair by pair
    cached = mx.load(str(run / "dpo" / "reference_logps.safetensors"))
    model, tokenizer = load_for_inference(str(run), "sft")
    rows = [json.loads(x) for x in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    ps = dpo.encode_pairs(rows, tokenizer, 64, "prefs.jsonl")
    b = trainer._to_mx(dpo.collate_pairs(ps.examples[:4]))
    logps, _ = dpo.sequence_logps(model, b)
    np.testing.assert_allclose(np.array(logps[:4]), np.array(cached["chosen"][:4]), rtol=1e-4)
    np.testing.assert_allclose(np.array(logps[4:]), np.array(cached["rejected"][:4]), rtol=1e-4)


def test_identical_pairs_warn_in_the_run(tmp_path, small_model_path):
    rows = [{"prompt": f"Date: {d} May 2001", "chosen": f"2001-05-{d:02d}", "rejected": f"{d:02d}/05/2001"}
            for d in range(1, 9)]
    rows[3]["rejected"] = rows[3]["chosen"]
    recipe = write_sft_dpo(tmp_path, small_model_path, dpo_rows=rows, steps=1, eval_every=0, valid=None)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--no-tui", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "1 pairs have chosen identical to rejected; skipped" in result.output


def test_sft_data_in_a_dpo_stage_names_the_file(tmp_path, small_model_path):
    recipe = write_sft_dpo(tmp_path, small_model_path, data="sft.jsonl")
    result = CliRunner().invoke(cli, ["run", str(recipe), "--no-tui", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert "sft.jsonl: a dpo stage needs" in result.output and "prompt" in result.output
    assert not (tmp_path / "runs").exists()  # nothing written


def test_chained_stages_on_a_quantized_base_are_refused_before_training(tmp_path, small_model_path):
    recipe = write_sft_dpo(tmp_path, small_model_path)
    recipe.write_text(recipe.read_text().replace("[model]\n", "[model]\nquantize = { bits = 4, group_size = 32 }\n", 1))
    result = CliRunner().invoke(cli, ["run", str(recipe), "--no-tui", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert "2 stages on a quantized base" in result.output and "fix: chain stages on a float base" in result.output
    assert not (tmp_path / "runs").exists()
