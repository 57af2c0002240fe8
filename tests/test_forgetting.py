"""Evaluation metrics, general NLL, and the forgetting guard."""
import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_cli import invoke, only_run, write_recipe

from localtune import loading, models
from localtune import recipe as recipe_module
from localtune.integrity import evaluate
from localtune.integrity.forgetting import Guard
from localtune.train.prepare import GENERAL


@pytest.mark.parametrize("metric, answer, reference, hit", [
    ("exact_match", " 2021-03-05\n", "2021-03-05", True),
    ("exact_match", "2021-03-05.", "2021-03-05", False),
    ("contains", "The answer is PARIS, of course.", "Paris", True),
    ("contains", "Lyon", "Paris", False),
    ("regex", "2021-03-05", r"\d{4}-\d{2}-\d{2}", True),
    ("regex", "5 March 2021", r"\d{4}-\d{2}-\d{2}", False),
    ("json", '{"name": "Ada", "year": 1815}', ("name", "year"), True),
    ("json", '{"name": "Ada"}', ("name", "year"), False),
    ("json", "name: Ada", ("name",), False),
])
def test_scores_by_hand(metric, answer, reference, hit):
    if metric == "regex":
        assert evaluate.score(metric, answer, "", reference) is hit
    elif metric == "json":
        assert evaluate.score(metric, answer, "", None, reference) is hit
    else:
        assert evaluate.score(metric, answer, reference) is hit


def test_task_metrics_on_fixed_generations(monkeypatch):
    from localtune.recipe import EvalSpec

    rows = [{"prompt": "a", "completion": "Paris"}, {"prompt": "b", "completion": "Rome"},
            {"prompt": "c", "completion": "Oslo"}, {"prompt": "d", "completion": "Bern"}]
    answers = ["Paris", "It is Rome.", "oslo", "Berlin"]
    monkeypatch.setattr(evaluate, "generate", lambda model, tok, prompts, max_tokens: answers[: len(prompts)])
    assert evaluate.task(None, None, rows, EvalSpec(metric="exact_match"))["value"] == 0.25
    assert evaluate.task(None, None, rows, EvalSpec(metric="contains"))["value"] == 0.75
    assert evaluate.task(None, None, rows, EvalSpec(metric="regex", format=r"[A-Z]\w+"))["value"] == 0.5
    assert evaluate.task(None, None, rows, EvalSpec(metric="exact_match", limit=2))["n"] == 2


@pytest.fixture(scope="module")
def small(small_model_path):
    model, tokenizer, _, _ = models.load(str(small_model_path))
    return model, tokenizer


def _direct_nll(model, tokenizer, texts):
    total, count = 0.0, 0
    for t in texts:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(t, add_special_tokens=False)
        logits = model(mx.array(ids)[None])[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        total -= sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
        count += len(ids) - 1
    return total / count, count


def test_general_nll_equals_a_direct_mlx_computation(small):
    model, tokenizer = small
    texts = ["In the beginning God created the heavens and the earth.", "ABASEMENT, n. A decent attitude.",
             "The king said to his servants, go."]
    result = evaluate.general_nll(model, tokenizer, texts, batch_size=2)
    nll, count = _direct_nll(model, tokenizer, texts)
    assert result["tokens"] == count and result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_loglik_metric_equals_a_direct_computation(small):
    model, tokenizer = small
    rows = [{"prompt": "What is 2 plus 2?", "completion": "4"}]
    result = evaluate.loglik(model, tokenizer, rows)
    from localtune.train import data

    ex = data.encode(rows, "completion", tokenizer, 512).examples[0]
    logits = model(mx.array(ex.tokens[:-1])[None])[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = [logp[i, int(ex.tokens[i + 1])].item() for i in range(len(ex.tokens) - 1) if ex.loss_mask[i + 1]]
    assert result["tokens"] == len(picked) and result["value"] == pytest.approx(np.mean(picked), rel=1e-5)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = mx.zeros((2,))


def _guard(action, nlls, tasks=None):
    it, tk = iter(nlls), iter(tasks or [])
    return Guard(lambda m: next(it), 10.0, 0.1, 5, action, (lambda m: {"value": next(tk)}) if tasks else None)


def test_stop_keeps_the_last_checkpoint_within_budget():
    model, guard = _Tiny(), _guard("stop", [10.5, 10.9, 11.5])
    guard.start(model, 0)
    for step, w in ((5, 1.0), (10, 2.0), (15, 3.0)):
        model.w = mx.full((2,), w)
        guard.check(model, step)
    assert guard.stop and guard.over_since == 15
    kept = guard.restore(model)
    assert kept["step"] == 10 and np.array(model.w).tolist() == [2.0, 2.0]
    assert guard.final_nll() == 10.9  # what the check at step 10 measured: the pipeline need not measure again
    assert guard.final_task() is None  # stop measures no task metric


def test_best_keeps_the_best_task_metric_within_budget_and_warn_keeps_nothing():
    model, guard = _Tiny(), _guard("best", [10.2, 10.5, 12.0], tasks=[0.0, 0.6, 0.4, 0.9])
    guard.start(model, 0)
    for step, w in ((5, 1.0), (10, 2.0), (15, 3.0)):
        model.w = mx.full((2,), w)
        guard.check(model, step)
    assert not guard.stop  # best finishes the stage
    assert guard.restore(model)["step"] == 5 and np.array(model.w).tolist() == [1.0, 1.0]
    assert guard.final_nll() == 10.2
    assert guard.final_task() == {"value": 0.6}  # step 5's whole result: the pipeline need not measure it again
    assert "task_result" not in guard.summary()["kept"]
    warn = _guard("warn", [20.0])
    warn.start(model, 0)
    assert warn.check(model, 5)["within_budget"] is False and warn.restore(model) is None and not warn.stop
    assert warn.final_nll() == 20.0  # nothing restored: the last check's weights
    assert warn.final_task() is None


def test_best_takes_a_known_starting_score_and_keeps_the_start_when_nothing_beats_it():
    model, guard = _Tiny(), _guard("best", [10.4, 10.6], tasks=[0.3, 0.1])  # no task call at the start
    guard.start_task = {"value": 0.5}
    guard.start(model, 0)
    for step, w in ((5, 1.0), (10, 2.0)):
        model.w = mx.full((2,), w)
        guard.check(model, step)
    assert guard.restore(model)["step"] == 0 and np.array(model.w).tolist() == [0.0, 0.0]
    assert guard.final_nll() is None  # no check measured the starting weights here: the pipeline measures them
    assert guard.final_task() == {"value": 0.5}  # the measurement before training, as it was handed in


def test_the_guard_stops_a_run_forced_to_forget(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path, steps=40, learning_rate=3e-3, save_every=10, report_every=5)
    text = recipe.read_text().replace("rank = 4\nalpha = 8", "rank = 32\nalpha = 128")
    text = text.replace("[eval]\n", "[eval]\nmax_general_nll_increase = 0.05\nguard_every = 5\n"
                                    'on_forgetting = "stop"\n')
    recipe.write_text(text)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "general NLL" in result.output and "vs base (budget +5%)" in result.output
    assert "forgetting guard: general NLL" in result.output and "stopping the stage" in result.output
    run = only_run(tmp_path / "runs")
    manifest = json.loads((run / "manifest.json").read_text())
    sft = manifest["stage_results"]["sft"]
    assert sft["stopped_at"] < 40
    f = sft["forgetting"]
    assert f["last"]["within_budget"] is False and f["kept"]["step"] < sft["stopped_at"]
    base, after = manifest["general"]["before"]["nll"], manifest["general"]["stages"]["sft"]["nll"]
    assert after <= base * 1.05 + 1e-6
    assert f["final_nll"] in (None, after)  # the guard's measurement of the kept weights, when a check made one
    model, tokenizer = loading.load_for_inference(str(run))  # the saved adapters are the kept ones
    texts = [json.loads(line)["text"] for line in GENERAL.read_text().splitlines()][:16]
    assert evaluate.general_nll(model, tokenizer, texts)["nll"] == pytest.approx(after, rel=1e-5)
    report = (run / "report.md").read_text()
    assert "## General ability (forgetting check)" in report and "Kept the weights of step" in report
    assert any(r.get("kind") == "guard" for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()))


def test_the_measurements_after_a_stage_are_the_guards_measurements_of_the_kept_weights(tmp_path, small_model_path,
                                                                                       monkeypatch):
    nll_calls, measure = [], evaluate.general_nll
    monkeypatch.setattr(evaluate, "general_nll", lambda *a, **k: nll_calls.append(1) or measure(*a, **k))
    task_calls, task = [], evaluate.task
    monkeypatch.setattr(evaluate, "task", lambda *a, **k: task_calls.append(1) or task(*a, **k))
    recipe = write_recipe(tmp_path, small_model_path, steps=4, save_every=4, report_every=2)
    recipe.write_text(recipe.read_text().replace(
        "[eval]\n", '[eval]\nmax_general_nll_increase = 10.0\nguard_every = 2\non_forgetting = "best"\n'))
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = only_run(tmp_path / "runs")
    manifest = json.loads((run / "manifest.json").read_text())
    f = manifest["stage_results"]["sft"]["forgetting"]
    assert f["kept"]["step"] > 0 and manifest["general"]["stages"]["sft"]["nll"] == f["final_nll"]
    assert len(nll_calls) == 3  # before training, then the checks at steps 2 and 4; none after the stage
    assert len(task_calls) == 4  # before, prompted with examples, the checks at 2 and 4 (the guard starts from
    # the "before" result); none after the stage
    after = manifest["task"]["after"]
    assert after["value"] == f["kept"]["task"] and "task metric after training: exact_match" in result.output
    samples = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "sample" and r["when"] == "after training"]
    assert [s["got"] for s in samples] == [s["got"] for s in after["samples"]]  # the TUI and report still get them
    model, tokenizer = loading.load_for_inference(str(run))  # the saved weights, measured afresh: the same answers
    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert task(model, tokenizer, rows, recipe_module.load(recipe).eval) == after


def test_eval_command_on_a_model_and_on_a_run(tmp_path, small_model_path):
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"prompt": "What is 2 plus 2?", "completion": "4"}) + "\n")
    result = invoke("eval", small_model_path, "--golden", golden, "--metric", "loglik", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["task"]["metric"] == "loglik" and data["task"]["value"] < 0
    assert data["general"]["texts"] == 130 and data["general"]["nll"] == pytest.approx(4.6074, abs=1e-3)
    recipe = write_recipe(tmp_path, small_model_path, steps=2)
    assert invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs").exit_code == 0
    shown = invoke("eval", only_run(tmp_path / "runs") / "sft", "--general", "none")
    assert shown.exit_code == 0, shown.output
    assert shown.output.startswith("exact_match: ") and "of " + str(tmp_path / "test.jsonl") in shown.output
