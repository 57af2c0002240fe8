"""KTO: the loss by hand, the KL reference point from mismatched rows, the reference as "adapters off",
the held-out preference accuracy, its metrics in the run, and bad data stopped before any weights load."""
import json
import math

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ROOT, make_tiny_model
from mlx.utils import tree_unflatten
from test_dpo import write_sft_dpo
from test_trainer import fit, snapshot

from localtune import datasets
from localtune.cli import cli
from localtune.errors import DataError
from localtune.methods import dpo, kto
from localtune.recipe import Adapter, make_stage
from localtune.train import adapters, data, metrics, trainer


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# --- the loss, by hand ------------------------------------------------------------------------------

def test_kto_losses_by_hand():
    # beta = 0.5, lambda_D = 1, lambda_U = 1.5; log-ratios r = [1, -2, 0.5], row 0 desirable, rows 1-2 not.
    # Mismatched log-ratios [0.4, 0.2, -0.3]: z_ref = max(0, 0.3 / 3) = 0.1.
    # row 0: 1.0 * (1 - sigmoid(0.5 * (1 - 0.1)))    = 1 - sigmoid(0.45)          = 1 - 0.610639 = 0.389361
    # row 1: 1.5 * (1 - sigmoid(0.5 * (0.1 - -2)))   = 1.5 * (1 - sigmoid(1.05))  = 1.5 * 0.259225 = 0.388838
    # row 2: 1.5 * (1 - sigmoid(0.5 * (0.1 - 0.5)))  = 1.5 * (1 - sigmoid(-0.2)) = 1.5 * 0.549834 = 0.824751
    # mean = 0.534316
    z = kto.kl_reference_point(mx.array([0.4, 0.2, -0.3]), mx.zeros(3))
    assert math.isclose(z.item(), 0.1, rel_tol=1e-6)
    losses = kto.kto_losses(mx.array([1.0, -2.0, 0.5]), mx.array([1.0, 0.0, 0.0]), z, 0.5, 1.0, 1.5)
    np.testing.assert_allclose(np.array(losses), [0.389361, 0.388838, 0.824751], rtol=1e-5)
    np.testing.assert_allclose(np.array(losses), [1 - sigmoid(0.45), 1.5 * (1 - sigmoid(1.05)),
                                                  1.5 * (1 - sigmoid(-0.2))], rtol=1e-6)
    assert math.isclose(losses.mean().item(), 0.534316, rel_tol=1e-5)


def test_the_kl_reference_point_is_clamped_at_zero_and_carries_no_gradient():
    # mean of (log pi - log ref) over the mismatched rows: (-1 - 0.5 + 0.3) / 3 = -0.4 -> 0
    assert kto.kl_reference_point(mx.array([-1.0, 0.0, 0.5]), mx.array([0.0, 0.5, 0.2])).item() == 0.0
    grad = mx.grad(lambda x: kto.kl_reference_point(x, mx.zeros(2)))(mx.array([1.0, 3.0]))
    assert np.array(grad).tolist() == [0.0, 0.0]


def test_kto_losses_at_the_reference_are_half_the_weights():
    # r = z_ref = 0: 1 - sigmoid(0) = 1/2, times lambda_D (2.0) or lambda_U (0.5)
    losses = kto.kto_losses(mx.zeros(3), mx.array([1.0, 0.0, 1.0]), mx.array(0.0), 0.1, 2.0, 0.5)
    assert np.array(losses).tolist() == [1.0, 0.25, 1.0]


# --- rows and batches -------------------------------------------------------------------------------

def labelled(n=8, vocab=100, seed=0, max_len=64) -> kto.LabelledSet:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(3, vocab, int(rng.integers(4, 10))).astype(np.int32)
        completion = rng.integers(3, vocab, int(rng.integers(2, 8))).astype(np.int32)
        out.append(kto.Labelled(i, prompt, completion, np.ones(len(completion), bool), i % 3 != 2, max_len))
    return kto.LabelledSet(out, source="mem", desirable=sum(e.desirable for e in out))


def test_a_completion_is_never_scored_after_its_own_prompt_in_the_kl_rows():
    """A prompt's two rows sit side by side in length-sorted batches (date_kto's valid set: 200 of 400
    "mismatched" rows were each completion after its own prompt); the partner is the next other prompt."""
    rows = labelled(3).examples
    twins = [rows[0], kto.Labelled(9, rows[0].prompt, rows[1].completion, rows[1].loss_mask, False, 64), rows[2]]
    assert kto.partners(twins) == [2, 2, 0]  # row 0's next row shares its prompt: row 2's prompt instead
    assert kto.partners(rows) == [1, 2, 0]
    assert kto.partners(twins[:2]) == [0, 1]  # one prompt only: no other to take


def stage(**kw):
    return make_stage("kto", data="x", adapter=Adapter(rank=4, alpha=8), batch_size=4, **kw)


def test_a_batch_holds_each_row_then_each_completion_after_the_next_prompt():
    rows = labelled(3).examples
    b = kto.collate_labelled(rows)
    assert b.inputs.shape[0] == 6 and b.units == 3 and b.weight == 3
    assert b.extras["desirable"].tolist() == [1.0, 1.0, 0.0]
    for r, (prompt, completion) in enumerate([(0, 0), (1, 1), (2, 2), (1, 0), (2, 1), (0, 2)]):
        tokens = np.concatenate([rows[prompt].prompt, rows[completion].completion])
        n = len(tokens) - 1
        assert b.inputs[r, :n].tolist() == tokens[:-1].tolist() and b.targets[r, :n].tolist() == tokens[1:].tolist()
        assert b.loss_mask[r].sum() == len(rows[completion].completion)  # the completion only
        assert b.loss_mask[r, len(rows[prompt].prompt) - 2] == 0 and b.loss_mask[r, len(rows[prompt].prompt) - 1] == 1


def batch_with_reference(model, rows, n=4):
    return trainer.to_mx(dpo.WithReference(None, model, None).attach(kto.collate_labelled(rows.examples[:n])))


def test_at_step_zero_the_loss_is_half_the_mean_weight_and_rewards_are_zero():
    model = make_tiny_model()
    adapters.attach(model, Adapter(rank=4, alpha=8))
    b = batch_with_reference(model, labelled())  # rows 0, 1, 3 desirable, row 2 not
    loss, n, m = kto.make_loss(stage(desirable_weight=1.0, undesirable_weight=2.0))(model, b)
    assert n.item() == 4
    assert math.isclose(loss.item(), (3 * 0.5 + 1 * 1.0) / 4, rel_tol=1e-6)  # lambda_y / 2 per row
    assert m["kl"].item() == 0.0 and m["reward_margin"].item() == 0.0 and m["desirable_share"].item() == 0.75


def test_the_loss_is_the_paper_s_formula_on_the_model_s_own_log_probs():
    """With the adapters moved, every term is checked against numpy from separately computed log-probs."""
    model = make_tiny_model(seed=2)
    adapters.attach(model, Adapter(rank=4, alpha=8))
    rng = np.random.default_rng(6)  # adapters whose mismatched rows' mean log-ratio is positive: z_ref > 0
    model.update(tree_unflatten([(k, mx.array(rng.normal(scale=0.3, size=v.shape).astype(np.float32)))
                                 for k, v in adapters.trainable_weights(model).items()]))
    rows = labelled(seed=1)
    b = batch_with_reference(model, rows)
    logps = np.array(dpo.sequence_logps(model, b)[0])
    with adapters.adapters_disabled(model):
        ref = np.array(dpo.sequence_logps(model, b)[0])
    r, kl_rows = logps[:4] - ref[:4], logps[4:] - ref[4:]
    assert np.abs(r).min() > 0  # the adapters changed the model
    z = max(0.0, kl_rows.mean())
    assert z > 0.5  # the reference point is in play (with z = 0 a loss that ignored it would pass)
    desirable = np.array([e.desirable for e in rows.examples[:4]])
    beta, wd, wu = 0.3, 1.2, 0.8
    expected = np.where(desirable, wd * (1 - 1 / (1 + np.exp(-beta * (r - z)))),
                        wu * (1 - 1 / (1 + np.exp(-beta * (z - r))))).mean()
    loss, _, m = kto.make_loss(stage(beta=beta, desirable_weight=wd, undesirable_weight=wu))(model, b)
    assert math.isclose(loss.item(), expected, rel_tol=1e-4)
    assert math.isclose(m["kl"].item(), z, rel_tol=1e-4)
    assert math.isclose(m["rewards_desirable"].item(), beta * r[desirable].mean(), rel_tol=1e-4)
    assert math.isclose(m["rewards_undesirable"].item(), beta * r[~desirable].mean(), rel_tol=1e-4)
    side = np.where(desirable, r > z, r < z).mean()
    assert math.isclose(m["label_accuracy"].item(), side, rel_tol=1e-6)
    # without the attached reference the loss runs the reference pass itself: the same number
    plain = {k: v for k, v in b.items() if not k.startswith("reference_")}
    assert math.isclose(kto.make_loss(stage(beta=beta, desirable_weight=wd, undesirable_weight=wu))(model, plain)[0]
                        .item(), loss.item(), rel_tol=1e-5)


def test_kto_gradients_reach_every_adapter_parameter(tmp_path):
    model = make_tiny_model()
    adapters.attach(model, Adapter(rank=4, alpha=8))
    trainable = set(adapters.trainable_weights(model))
    before = snapshot(model)
    batches = dpo.WithReference(data.Batches(labelled(), 4, 0, collate=kto.collate_labelled), model, None)
    losses = []
    fit(model, batches, tmp_path, 2, loss=kto.make_loss(stage()), attached=True,
        report=lambda r: losses.append(r) if r["kind"] == "train" else None)
    after = snapshot(model)
    assert {k for k in before if not np.array_equal(before[k], after[k])} == trainable
    assert math.isclose(losses[0]["loss"], 0.5, rel_tol=1e-5)  # step 1 starts at policy = reference
    shown = {m.key for m, _ in metrics.method_metrics("kto", losses[-1])}  # the TUI's method panel
    assert shown == {m.key for m in kto.METHOD.metrics}


# --- held-out preference accuracy ---------------------------------------------------------------------

def test_heldout_pairs_are_same_prompt_rows_of_opposite_labels():
    rows = labelled(4).examples  # labels: T, T, F, T; rows 0-2 share a prompt, row 3 has its own
    for e in rows[1:3]:
        e.prompt = rows[0].prompt
    assert kto.heldout_pairs(rows) == [(0, 2), (1, 2)]
    policy, reference = np.array([-1.0, -5.0, -3.0, -2.0]), np.array([-2.0, -4.0, -3.5, -2.0])
    # rewards beta * (policy - reference) = 0.5 * [1, -1, 0.5, 0] = [0.5, -0.5, 0.25, 0]
    # pairs (0, 2): 0.5 > 0.25 yes, -1 > -3 likelihood yes; (1, 2): -0.5 > 0.25 no, -5 > -3 no
    h = kto.heldout_scores(policy, reference, rows, beta=0.5)
    assert h == {"rows": 4, "pairs": 2, "rewards_desirable": 0.0, "rewards_undesirable": 0.25,
                 "preference_accuracy": 0.5, "prefers_desirable": 0.5, "reward_margin": -0.25}


# --- from the CLI ---------------------------------------------------------------------------------------

def write_sft_kto(tmp_path, model_path, rows=None, **settings):
    """test_dpo's SFT-then-DPO recipe with a kto stage on labelled rows (prefs.jsonl) and 8 held-out rows."""
    kto_dir = ROOT / "data" / "date_kto"
    (tmp_path / "kvalid.jsonl").write_text("".join((kto_dir / "valid.jsonl").read_text().splitlines(True)[:8]))
    if rows is None:
        rows = [json.loads(x) for x in (kto_dir / "train.jsonl").read_text().splitlines()[:32]]
    stage = {"kind": "kto", "valid": "kvalid.jsonl", "reference": None, "steps": 3, "learning_rate": 1e-3,
             "eval_every": 3, "save_every": 3, **settings}
    return write_sft_dpo(tmp_path, model_path, dpo_rows=rows, **stage)


def run(recipe, tmp_path):
    return CliRunner().invoke(cli, ["run", str(recipe), "--no-tui", "--runs-dir", str(tmp_path / "runs")])


def test_sft_then_kto_logs_its_metrics_and_reports_the_heldout_preference_accuracy(tmp_path, small_model_path):
    result = run(write_sft_kto(tmp_path, small_model_path), tmp_path)
    assert result.exit_code == 0, result.output
    assert "16 desirable and 16 undesirable rows; weighted ratio 1.00" in result.output
    assert "held-out before: 4 same-prompt pairs: preference accuracy (reward desirable > undesirable) 0.0%" \
        in result.output
    folder = next((tmp_path / "runs").iterdir())
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train" and r["stage"] == "kto"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert math.isclose(train[0]["loss"], 0.5, rel_tol=1e-4) and train[0]["kl"] == 0.0
    assert {m.key for m in kto.METHOD.metrics} <= set(train[-1])
    assert [r for r in records if r["kind"] == "eval" and r["stage"] == "kto"][-1]["kl"] >= 0
    manifest = json.loads((folder / "manifest.json").read_text())
    after = manifest["stage_results"]["kto"]["heldout_after"]
    assert after["pairs"] == 4 and after["rows"] == 8
    report = (folder / "report.md").read_text()
    assert "## Preferences (kto, KTO, 8 held-out rows of `kvalid.jsonl`)" in report
    assert f"| KTO preference accuracy (reward desirable > reward undesirable) | — | " \
           f"{after['preference_accuracy']:.1%} |" in report
    assert "Last training window: KL estimate z_ref" in report


def test_preference_pairs_in_a_kto_stage_are_refused_with_the_split_to_make(tmp_path, small_model_path):
    pairs = [json.loads(x) for x in (ROOT / "data/date_prefs/train.jsonl").read_text().splitlines()[:8]]
    result = run(write_sft_kto(tmp_path, small_model_path, rows=pairs), tmp_path)
    assert result.exit_code == 2, result.output
    assert "prefs.jsonl:1: a kto stage needs {\"prompt\", \"completion\", \"label\"} rows, but this data has " \
           "{\"prompt\", \"chosen\", \"rejected\"} rows" in result.output  # the file and its first such row
    assert '{"prompt", "completion": chosen, "label": true}' in result.output and 'kind = "dpo"' in result.output
    assert not (tmp_path / "runs").exists()  # stopped before any weights load: nothing written


@pytest.mark.parametrize("label", ["yes", 1, "true", None])
def test_a_label_that_is_not_a_boolean_names_its_line(tmp_path, small_model_path, label):
    rows = [{"prompt": f"Date: {d} May 2001", "completion": f"2001-05-{d:02d}", "label": True} for d in range(1, 9)]
    rows[5]["label"] = label
    result = run(write_sft_kto(tmp_path, small_model_path, rows=rows), tmp_path)
    assert result.exit_code == 2, result.output
    assert f'prefs.jsonl:6: "label" must be true or false (thumbs up or down), got {json.dumps(label)}' \
        in result.output
    assert "a JSON boolean without quotes" in result.output
    assert not (tmp_path / "runs").exists()


def test_csv_cells_may_write_labels_as_text(tmp_path):
    (tmp_path / "rows.csv").write_text("prompt,completion,label\np,c,true\nq,d,False\n")
    assert [r["label"] for r in datasets.read(datasets.Spec(str(tmp_path / "rows.csv"))).rows] == [True, False]
    (tmp_path / "rows.jsonl").write_text('{"prompt": "p", "completion": "c", "label": "false"}\n')
    with pytest.raises(DataError, match=r'rows.jsonl:1: "label" must be true or false'):
        datasets.read(datasets.Spec(str(tmp_path / "rows.jsonl")))


@pytest.mark.parametrize("settings,words", [
    ({"batch_size": 1}, ["batch_size = 1", "needs 2 rows or more", "batch_size = 8"]),
    ({"beta": 0.0}, ["beta = 0.0 must be greater than 0", "beta = 0.1"]),
    ({"desirable_weight": 0.0, "undesirable_weight": 0.0}, ["both 0"]),
    ({"packing": True}, ["packing is not available for kto stages"]),
])
def test_bad_kto_settings_are_refused_before_training(tmp_path, small_model_path, settings, words):
    result = run(write_sft_kto(tmp_path, small_model_path, **settings), tmp_path)
    assert result.exit_code == 2, result.output
    assert all(w in result.output for w in words), result.output
    assert "recipe.toml" in result.output and not (tmp_path / "runs").exists()
