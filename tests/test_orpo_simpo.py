"""ORPO and SimPO, the reference-free pair methods: their losses and gradients by hand, the same
numbers through the model, what they log and report, and pair data they refuse before loading."""
import json
import math

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_tiny_model
from test_dpo import pairs, unshared, write_sft_dpo
from test_trainer import fit, snapshot

from localtune.cli import cli
from localtune.methods import orpo, simpo
from localtune.methods.logprobs import sequence_logps
from localtune.recipe import Adapter, make_stage
from localtune.train import adapters, data, metrics, trainer

# Two pairs worked by hand. Pair 1: chosen has 2 tokens of log-prob log 0.5 each (summed 2 log 0.5,
# mean log 0.5, P_w = 0.5); rejected has 3 tokens of log 0.2 (summed 3 log 0.2, P_l = 0.2).
# Pair 2: the same answers swapped, so its rewards are pair 1's mirrored.
CHOSEN = mx.array([2 * math.log(0.5), 3 * math.log(0.2)])
REJECTED = mx.array([3 * math.log(0.2), 2 * math.log(0.5)])
N_CHOSEN, N_REJECTED = mx.array([2.0, 3.0]), mx.array([3.0, 2.0])


def test_orpo_loss_by_hand():
    # odds(0.5) = 0.5 / 0.5 = 1 and odds(0.2) = 0.2 / 0.8 = 1/4: pair 1's log odds ratio is log 4 and
    # L_OR = -log sigmoid(log 4) = -log(4 / 5) = 0.223144; pair 2's is -log 4, L_OR = -log(1 / 5) = 1.609438.
    # NLL per chosen token over the batch: -(2 log 0.5 + 3 log 0.2) / 5 = (2 * 0.693147 + 3 * 1.609438) / 5 = 1.242922.
    # L = 1.242922 + 0.1 * (0.223144 + 1.609438) / 2 = 1.242922 + 0.091629 = 1.334551.
    loss, m = orpo.odds_ratio_loss(CHOSEN, REJECTED, N_CHOSEN, N_REJECTED, 0.1)
    nll = (2 * math.log(2) + 3 * math.log(5)) / 5
    assert loss.item() == pytest.approx(nll + 0.1 * (-math.log(0.8) - math.log(0.2)) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(1.334551, abs=1e-6)
    assert m["nll"].item() == pytest.approx(nll, rel=1e-6)
    assert m["log_odds"].item() == pytest.approx(0.0, abs=1e-6)  # log 4 and -log 4
    assert m["odds_ratio_loss"].item() == pytest.approx((-math.log(0.8) - math.log(0.2)) / 2, rel=1e-6)
    # rewards lambda * mean log-prob: 0.1 log 0.5 = -0.069315 and 0.1 log 0.2 = -0.160944; chosen wins pair 1 only
    assert m["rewards_chosen"].item() == pytest.approx(0.1 * (math.log(0.5) + math.log(0.2)) / 2, rel=1e-6)
    assert m["reward_margin"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["preference_accuracy"].item() == 0.5 and m["policy_prefers_chosen"].item() == 0.5
    # pair 1 alone pins the direction (the mirrored pair 2 averages every sign away): chosen wins
    _, one = orpo.odds_ratio_loss(CHOSEN[:1], REJECTED[:1], N_CHOSEN[:1], N_REJECTED[:1], 0.1)
    assert one["log_odds"].item() == pytest.approx(math.log(4), rel=1e-6)
    assert one["reward_margin"].item() == pytest.approx(0.1 * math.log(2.5), rel=1e-6)  # 0.1 (log 0.5 - log 0.2)
    assert one["preference_accuracy"].item() == 1.0 and one["policy_prefers_chosen"].item() == 1.0


def test_orpo_gradients_by_hand():
    # Pair 1 alone, lambda 0.1. d log odds / d mean log P_w = 1 + P_w / (1 - P_w) = 1 / (1 - P_w) = 2,
    # and / d mean log P_l = -1 / (1 - P_l) = -1.25; d L_OR / d log odds = -(1 - sigmoid(log 4)) = -0.2.
    # Per summed log-prob (mean = sum / n): chosen -0.2 * 2 / 2 = -0.2, rejected -0.2 * -1.25 / 3 = 1/12.
    # The NLL adds -1/2 to chosen: d L / d chosen = -0.5 + 0.1 * -0.2 = -0.52, d L / d rejected = 0.1 / 12.
    def f(c, r):
        return orpo.odds_ratio_loss(c, r, N_CHOSEN[:1], N_REJECTED[:1], 0.1)[0]

    gc, gr = mx.grad(f, argnums=(0, 1))(CHOSEN[:1], REJECTED[:1])
    assert gc.item() == pytest.approx(-0.52, rel=1e-5) and gr.item() == pytest.approx(0.1 / 12, rel=1e-5)


def test_orpo_log_odds_stay_finite_near_certainty():
    # P -> 1: log(1 - P) -> -inf; a mean log-prob of -1e-9 is capped at -1e-7, log(1 - e^-1e-7) = log(1e-7)
    loss, m = orpo.odds_ratio_loss(mx.array([-2e-9]), mx.array([-30.0]), mx.array([2.0]), mx.array([3.0]), 0.1)
    assert math.isfinite(loss.item())
    assert m["log_odds"].item() == pytest.approx(-1e-7 + 10 - math.log(1e-7) + math.log(-math.expm1(-10)), rel=1e-4)


def test_simpo_loss_by_hand():
    # beta 2, gamma 1. Pair 1: r_w = 2 log 0.5, r_l = 2 log 0.2, r_w - r_l = 2 log 2.5 = log 6.25;
    # L = -log sigmoid(log 6.25 - 1) = log(1 + e / 6.25) = 0.361113.
    # Pair 2 mirrored: log(1 + 6.25 e) = log 17.989261 = 2.889775.
    loss, m = simpo.simpo_loss(CHOSEN, REJECTED, N_CHOSEN, N_REJECTED, beta=2.0, gamma=1.0)
    one, two = math.log(1 + math.e / 6.25), math.log(1 + 6.25 * math.e)
    assert loss.item() == pytest.approx((one + two) / 2, rel=1e-6)
    assert loss.item() == pytest.approx((0.361113 + 2.889775) / 2, abs=1e-6)
    assert m["rewards_chosen"].item() == pytest.approx((2 * math.log(0.5) + 2 * math.log(0.2)) / 2, rel=1e-6)
    assert m["preference_accuracy"].item() == 0.5
    _, one = simpo.simpo_loss(CHOSEN[:1], REJECTED[:1], N_CHOSEN[:1], N_REJECTED[:1], beta=2.0, gamma=1.0)
    assert one["reward_margin"].item() == pytest.approx(math.log(6.25), rel=1e-6)  # pair 1 alone: chosen wins
    assert one["rewards_chosen"].item() == pytest.approx(2 * math.log(0.5), rel=1e-6)
    assert one["preference_accuracy"].item() == 1.0
    # gamma 0 on pair 1: log(1 + 1 / 6.25) = log 1.16; sft_weight 1 adds chosen's NLL per token, log 2
    alone, _ = simpo.simpo_loss(CHOSEN[:1], REJECTED[:1], N_CHOSEN[:1], N_REJECTED[:1], 2.0, 0.0, sft_weight=1.0)
    assert alone.item() == pytest.approx(math.log(1.16) + math.log(2), rel=1e-6)
    # equal rewards: L = log(1 + e^gamma), whatever the lengths
    even, _ = simpo.simpo_loss(mx.array([-2.0]), mx.array([-3.0]), mx.array([2.0]), mx.array([3.0]), 2.5, 0.5)
    assert even.item() == pytest.approx(math.log(1 + math.exp(0.5)), rel=1e-6)


def test_simpo_gradients_by_hand():
    # Pair 1, beta 2, gamma 1: d L / d (r_w - r_l) = -(1 - sigmoid(log(6.25 / e))) = -e / (6.25 + e) = -0.303103;
    # d r_w / d chosen = beta / 2 = 1, d r_l / d rejected = beta / 3: gradients -0.303103 and +0.202069.
    def f(c, r):
        return simpo.simpo_loss(c, r, N_CHOSEN[:1], N_REJECTED[:1], 2.0, 1.0)[0]

    gc, gr = mx.grad(f, argnums=(0, 1))(CHOSEN[:1], REJECTED[:1])
    s = math.e / (6.25 + math.e)
    assert gc.item() == pytest.approx(-s, rel=1e-5) and gr.item() == pytest.approx(s * 2 / 3, rel=1e-5)


def stage(kind, **kw):
    return make_stage(kind, data="x", adapter=Adapter(rank=4, alpha=8), **kw)


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_the_loss_through_the_model_is_the_loss_of_its_sequence_logps(kind):
    model = make_tiny_model()
    b = trainer.to_mx(orpo.METHOD.collate(pairs().examples[:4]))
    assert "prompt" in b  # the shared-prompt layout, and the per-response one, give the same numbers
    method = {"orpo": orpo, "simpo": simpo}[kind]
    loss, n, m = method.make_loss(stage(kind))(model, b)
    plain, _, _ = method.make_loss(stage(kind))(model, unshared(b))
    logps, ntoks = sequence_logps(model, unshared(b))
    if kind == "orpo":
        expected, _ = orpo.odds_ratio_loss(logps[:4], logps[4:], ntoks[:4], ntoks[4:], 0.1)
    else:
        expected, _ = simpo.simpo_loss(logps[:4], logps[4:], ntoks[:4], ntoks[4:], 2.0, 0.6)
    assert n.item() == 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert plain.item() == pytest.approx(loss.item(), rel=1e-4)
    assert {"reward_margin", "preference_accuracy", "policy_prefers_chosen"} <= set(m)


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_gradients_reach_every_adapter_parameter_in_the_compiled_step(tmp_path, kind):
    model = make_tiny_model()
    adapters.attach(model, Adapter(rank=4, alpha=8))
    trainable = set(adapters.trainable_weights(model))
    before = snapshot(model)
    losses = []
    fit(model, data.Batches(pairs(), 4, 0, collate=orpo.METHOD.collate), tmp_path, 2, attached=True,
        loss={"orpo": orpo, "simpo": simpo}[kind].make_loss(stage(kind)),
        report=lambda r: losses.append(r["loss"]) if r["kind"] == "train" else None)
    after = snapshot(model)
    assert {k for k in before if not np.array_equal(before[k], after[k])} == trainable  # B after step 1, A after 2
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def run(tmp_path, recipe):
    return CliRunner().invoke(cli, ["run", str(recipe), "--no-tui", "--runs-dir", str(tmp_path / "runs")])


@pytest.mark.parametrize("kind,keys,rows", [
    ("orpo", {"odds_ratio_weight": 0.2}, ["nll", "log_odds", "odds_ratio_loss"]),
    ("simpo", {"beta": 2.0, "gamma": 0.6}, []),
])
def test_a_stage_logs_its_metrics_and_reports_held_out_preferences_before_and_after(tmp_path, small_model_path,
                                                                                      kind, keys, rows):
    recipe = write_sft_dpo(tmp_path, small_model_path, **{"kind": kind, "beta": None, "reference": None, **keys})
    result = run(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    assert f"held-out pairs before the stage: {kind} preference accuracy" in result.output
    folder = next((tmp_path / "runs").iterdir())
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train" and r["stage"] == kind]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    shown = [m.key for m, _ in metrics.method_metrics(kind, train[-1])]  # the TUI's method panel
    assert shown == [m.key for m in {"orpo": orpo, "simpo": simpo}[kind].METHOD.metrics]
    assert {"pairs_per_sec", "reward_margin", "preference_accuracy", *rows} <= set(shown)
    manifest = json.loads((folder / "manifest.json").read_text())
    result_ = manifest["stage_results"][kind]
    before, after = result_["heldout_before"], result_["heldout_after"]
    assert after["preference_accuracy"] == result_["eval_preference_accuracy"]  # the last eval is the "after"
    report = (folder / "report.md").read_text()
    section = report.split(f"## Preferences ({kind}, held-out pairs of `valid.jsonl`)")[1]
    assert (f"| the model gives the chosen answer the higher likelihood | {before['policy_prefers_chosen']:.1%} | "
            f"{after['policy_prefers_chosen']:.1%} |") in section
    assert f"| {kind.upper() if kind == 'orpo' else 'SimPO'} preference accuracy" in section


UNPAIRED = [{"prompt": "Date: 5 March 2021", "completion": "2021-03-05", "label": True},
            {"prompt": "Date: 6 March 2021", "completion": "06/03/2021", "label": False}]


@pytest.mark.parametrize("kind,rows,name,what", [
    ("orpo", UNPAIRED, "labelled.jsonl", '{"prompt", "completion", "label"}'),
    ("simpo", UNPAIRED, "labelled.jsonl", '{"prompt", "completion", "label"}'),
    ("orpo", None, "sft.jsonl", '{"prompt", "completion"}'),
    ("simpo", None, "sft.jsonl", '{"prompt", "completion"}'),
])
def test_rows_that_are_not_pairs_stop_before_any_weights_load_and_name_the_file_and_line(
        tmp_path, small_model_path, kind, rows, name, what):
    recipe = write_sft_dpo(tmp_path, small_model_path, kind=kind, beta=None, reference=None, data=name)
    if rows:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(tmp_path, recipe)
    assert result.exit_code == 2, result.output
    article = "an" if kind == "orpo" else "a"
    assert f"{name}:1: {article} {kind} stage needs" in result.output
    assert f"but this data has {what} rows" in result.output and "fix:" in result.output
    assert ('set kind = "kto" for rows with a true/false "label"' in result.output) == (rows is not None)
    assert not (tmp_path / "runs").exists()  # nothing written, no weights loaded


@pytest.mark.parametrize("kind,keys,message", [
    ("simpo", {"beta": 0.0}, "beta = 0.0 must be greater than 0"),
    ("orpo", {"packing": True}, "packing is not available for orpo stages"),
    ("orpo", {"odds_ratio_weight": -1.0}, "odds_ratio_weight"),
    ("orpo", {"odds_ratio_weight": 0.0}, "odds_ratio_weight = 0.0 must be greater than 0 (with 0 an orpo stage is SFT"),
])
def test_bad_keys_are_refused_with_the_key(tmp_path, small_model_path, kind, keys, message):
    recipe = write_sft_dpo(tmp_path, small_model_path, **{"kind": kind, "beta": None, "reference": None, **keys})
    result = run(tmp_path, recipe)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "runs").exists()
