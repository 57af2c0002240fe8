"""Try prompting first: [eval] prompt_baseline = k, the base model with k training examples in its prompt."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from run_fixtures import make_run
from test_tui import app_for, drive, text_of

from localtune import recipe as recipe_mod
from localtune.cli import cli
from localtune.errors import RecipeError
from localtune.integrity import few_shot
from localtune.recipe import EvalSpec

ROOT = Path(__file__).resolve().parent.parent


def rows_of(path: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (ROOT / path).read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def tokenizer(small_model_path):
    from localtune import models

    return models.load_tokenizer(Path(small_model_path))


def test_examples_are_seeded_and_never_golden():
    train, golden = rows_of("data/dates/train.jsonl", 40), rows_of("data/dates/test.jsonl", 5)
    train = train + [dict(g) for g in golden]  # golden rows in the training data (max_contamination allows some)
    golden_as_chat = [{"messages": [{"role": "user", "content": g["prompt"]},
                                    {"role": "assistant", "content": g["completion"]}]} for g in golden]
    first = few_shot.choose(train, golden_as_chat, 3, seed=0)
    assert first == few_shot.choose(train, golden_as_chat, 3, seed=0) and len(first) == 3
    assert first != few_shot.choose(train, golden_as_chat, 3, seed=1)
    for seed in range(30):  # whatever the seed, a golden row (in either format) is never an example
        for gold in (golden, golden_as_chat):
            chosen = few_shot.choose(train, gold, 8, seed)
            assert not any(c in golden for c in chosen) and len(chosen) == 8


def test_the_note_says_why_there_are_fewer_examples(tokenizer):
    golden = rows_of("data/dates/test.jsonl", 5)
    train = [dict(g) for g in golden] + rows_of("data/dates/train.jsonl", 2)  # 2 rows that are not golden
    plan = few_shot.plan(golden, "completion", [("sft", train, "completion", 512)], EvalSpec(), 0, tokenizer, 1024)
    assert plan["k"] == 2 and plan["note"] == "2 of the 3 examples asked for: [stages.sft] has only 2 rows that " \
        "are not golden"
    prefs = few_shot.plan(golden, "preference", [("dpo", [], "preference", 128)], EvalSpec(metric="preference"), 0,
                          tokenizer, 1024)
    assert prefs["k"] == 0 and prefs["applies"] is False and "metric \"preference\"" in prefs["note"]


def test_examples_are_earlier_turns_and_only_the_golden_answer_is_scored(tokenizer):
    shots = rows_of("data/dates/train.jsonl", 2)
    golden = {"prompt": "Date: 1 May 2020", "completion": "2020-05-01"}
    row = few_shot.with_examples(golden, shots, chat=True)
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * 3 and row[few_shot.CONTEXT] == 4
    assert row["messages"][-1]["content"] == "2020-05-01"
    text = few_shot.with_examples(golden, [{"prompt": "Date: 2 May 2020 ", "completion": "2020-05-02"}], chat=False)
    assert text["prompt"] == "Date: 2 May 2020 2020-05-02\nDate: 1 May 2020"  # prompt + completion, one a line


def test_k_shrinks_when_the_context_is_short(tokenizer):
    train, golden = rows_of("data/dates/train.jsonl", 50), rows_of("data/dates/test.jsonl", 20)
    spec = EvalSpec(prompt_baseline=3, max_tokens=12)
    stages = [("sft", train, "completion", 512)]
    roomy = few_shot.plan(golden, "completion", stages, spec, 0, tokenizer, context=1024)
    assert roomy["k"] == 3 and roomy["note"] == "" and roomy["budget"] == 1024
    need = max(few_shot._length(__import__("localtune.train.data", fromlist=["Encoder"]).Encoder(tokenizer),
                                few_shot.with_examples(g, roomy["examples"], True), True, 12) for g in golden)
    short = few_shot.plan(golden, "completion", stages, spec, 0, tokenizer, context=need - 1)
    assert short["k"] == 2 and short["examples"] == roomy["examples"][:2]
    assert "2 of the 3 examples asked for" in short["note"] and f"{need - 1}-token context" in short["note"]
    by_stage = few_shot.plan(golden, "completion", stages, spec, 0, tokenizer, context=None)
    assert by_stage["budget"] == 512  # no context in the model's config: the stage's max_seq_len


def test_off_and_unmatched_shapes():
    golden = rows_of("data/dates/test.jsonl", 5)
    assert few_shot.plan(golden, "completion", [], EvalSpec(prompt_baseline=0), 0, None, 1024) is None
    prefs = [("dpo", rows_of("data/date_prefs/train.jsonl", 5), "preference", 128)]
    none = few_shot.plan(golden, "completion", prefs, EvalSpec(), 0, None, 1024)
    assert none["k"] == 0 and "no stage's training data has the golden set's shape (completion)" in none["note"]


@pytest.mark.parametrize("base, tuned, n, verdict", [
    (0.90, 0.95, 100, "within noise"),     # 5 points, 2 s.e. = 7.4 points
    (0.10, 0.95, 100, "tune wins"),
    (0.62, 0.70, 400, "tune wins"),        # 8 points, 2 s.e. = 6.6 points
    (0.80, 0.40, 100, "prompting wins"),
    (1.00, 1.00, 50, "within noise"),      # no spread, no difference
    (0.00, 0.00, 50, "within noise"),      # neither works: no "try prompting first"
])
def test_the_tune_must_beat_prompting_by_more_than_two_standard_errors(base, tuned, n, verdict):
    a, b = {"metric": "exact_match", "value": base, "n": n, "k": 3}, {"metric": "exact_match", "value": tuned, "n": n}
    decision = few_shot.compare(a, b)
    assert decision["verdict"] == verdict
    words = few_shot.sentence(a, b, decision)
    assert words.startswith(f"Prompting with 3 examples scores {base:.1%}; the tune scores {tuned:.1%}")
    assert ("Try prompting first." in words) == (verdict != "tune wins" and base + tuned > 0)
    assert ("within noise" in words) == (verdict == "within noise" and base + tuned > 0 and base != tuned)
    assert ("the same on every golden row" in words) == (base == tuned == 1.0)  # no spread on either side
    assert ("neither does the task yet" in words) == (base + tuned == 0)


def test_a_tie_on_every_row_says_so_not_within_a_zero_noise():
    """5 golden rows, both right on the same 3: the paired spread is 0, and "within noise (2 s.e. = 0.0
    points)" would read as nonsense."""
    hits = [True, True, False, True, False]
    a = {"metric": "exact_match", "value": 0.6, "n": 5, "k": 3, "hits": hits}
    b = {"metric": "exact_match", "value": 0.6, "n": 5, "hits": hits}
    decision = few_shot.compare(a, b)
    assert decision["se"] == 0 and decision["verdict"] == "within noise"
    assert few_shot.sentence(a, b, decision) == ("Prompting with 3 examples scores 60.0%; the tune scores 60.0%: "
                                                 "the same on every golden row. Try prompting first.")


def test_loglik_noise_is_the_per_row_spread():
    a = {"metric": "loglik", "value": -1.20, "n": 64, "k": 3, "row_logp": [-1.0, -1.4] * 32, "row_tokens": [1] * 64}
    b = {"metric": "loglik", "value": -1.10, "n": 64, "row_logp": [-1.4, -0.8] * 32, "row_tokens": [1] * 64}
    decision = few_shot.compare(a, b)  # differences -0.4, +0.6: mean 0.1, sd 0.504, s.e. 0.063, 2 s.e. = 0.126
    assert decision["paired"] and decision["se"] == pytest.approx(0.0630, abs=1e-4)
    assert decision["verdict"] == "within noise"
    assert "-1.200 nats/token; the tune scores -1.100 nats/token: within noise (2 s.e. = 0.126 nats/token)" in \
        few_shot.sentence(a, b, decision)
    shifted = [x + 0.3 for x in b["row_logp"]]  # every row gains 0.3 more: the same spread, a clear gain
    assert few_shot.compare(a, {**b, "value": -0.8, "row_logp": shifted})["verdict"] == "tune wins"


def test_the_margin_is_paired_on_the_same_golden_rows():
    """0.90 -> 0.95 on 100 rows where the tune fixed 5 rows and broke none: unpaired, that is within noise
    (2 s.e. = 7.4 points); paired, every difference is 0 or +1 (2 s.e. = 4.4 points), and the tune wins."""
    hits_b = [1] * 90 + [0] * 10
    hits_t = [1] * 95 + [0] * 5
    a = {"metric": "exact_match", "value": 0.90, "n": 100, "k": 3, "hits": hits_b}
    b = {"metric": "exact_match", "value": 0.95, "n": 100, "hits": hits_t}
    decision = few_shot.compare(a, b)
    assert decision["paired"] and decision["se"] == pytest.approx(0.0219, abs=1e-4)
    assert decision["verdict"] == "tune wins"
    swapped = hits_t[:85] + [0] * 5 + hits_t[90:]  # rows 85-89 broken, 90-94 fixed: 90% again
    assert few_shot.compare(a, {**b, "value": 0.90, "hits": swapped})["verdict"] == "within noise"


@pytest.mark.parametrize("line, words", [
    ("prompt_baseline = -1", ["recipe.toml:8", "prompt_baseline = -1 is too small: expected at least 0"]),
    ("prompt_baselines = 3", ["recipe.toml:8", 'unknown key "prompt_baselines" in [eval]',
                              'Did you mean "prompt_baseline"?']),
    ("prompt_baseline = 2.5", ["recipe.toml:8", "eval.prompt_baseline must be an integer, got 2.5"]),
])
def test_recipe_checks_prompt_baseline(line, words):
    text = f'[model]\npath = "m"\n[[stages]]\nkind = "sft"\ndata = "t.jsonl"\nsteps = 1\n[eval]\n{line}\n'
    with pytest.raises(RecipeError) as e:
        recipe_mod.parse(text, "recipe.toml")
    for w in words:
        assert w in str(e.value), str(e.value)
    default = '[model]\npath = "m"\n[[stages]]\nkind = "sft"\ndata = "t.jsonl"\nsteps = 1\n'
    assert recipe_mod.parse(default).eval.prompt_baseline == 3


def run_tiny(tmp_path, small_model_path, extra: str = "") -> tuple[dict, str, str]:
    rows = rows_of("data/months/train.jsonl", 32)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text((ROOT / "data/months/test.jsonl").read_text())
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'seed = 0\n[model]\npath = "{small_model_path}"\n[[stages]]\nkind = "sft"\n'
                      'data = "train.jsonl"\nsteps = 2\nbatch_size = 4\nmax_seq_len = 64\neval_every = 0\n'
                      'save_every = 2\n[eval]\ndata = "test.jsonl"\nmax_tokens = 4\nlimit = 8\n'
                      f'general = "none"\n{extra}')
    result = CliRunner().invoke(cli, ["run", str(recipe), "--no-tui", "--runs-dir", str(tmp_path / "runs")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").iterdir())
    return json.loads((run / "manifest.json").read_text()), (run / "report.md").read_text(), result.output


def test_a_run_measures_prompting_first_and_reports_it(tmp_path, small_model_path):
    manifest, report, output = run_tiny(tmp_path, small_model_path)
    shots = manifest["task"]["few_shot"]
    assert shots["k"] == 3 and shots["asked"] == 3 and shots["stage"] == "sft" and shots["n"] == 8
    assert 0 <= shots["value"] <= 1 and shots["against_tune"]["sentence"].startswith("Prompting with 3 examples")
    assert "| prompting: the base with 3 examples in its prompt" in report
    assert shots["against_tune"]["sentence"] in report and shots["against_tune"]["sentence"] in output
    assert "task metric with 3 examples of [stages.sft] in the prompt" in output


def test_prompt_baseline_0_skips_it(tmp_path, small_model_path):
    manifest, report, output = run_tiny(tmp_path, small_model_path, "prompt_baseline = 0\n")
    assert "few_shot" not in manifest["task"] and "before" in manifest["task"]
    assert "prompting" not in report.casefold() and "examples in the prompt" not in output


def test_the_tui_shows_the_prompting_baseline(tmp_path):
    path = make_run(tmp_path, "shots")
    manifest = json.loads((path / "manifest.json").read_text())
    a, b = {"metric": "exact_match", "value": 0.85, "n": 40, "k": 3}, manifest["task"]["after"]
    decision = few_shot.compare(a, b)
    manifest["task"]["few_shot"] = a | {"against_tune": decision | {"sentence": few_shot.sentence(a, b, decision)}}
    (path / "manifest.json").write_text(json.dumps(manifest))

    async def body(app, pilot):
        report = text_of(app, "#report")
        lines = [line.strip() for line in report.splitlines()]
        assert lines[1:4] == ["before   5.0%", "3-shot  85.0%", "after  90.0%"]
        assert "Prompting with 3 examples scores 85.0%; the tune scores 90.0%: within noise" in report

    drive(app_for(path), body, size=(120, 40))


@pytest.fixture(scope="module")
def tools_model(small_model_path):
    from localtune import models

    template = (ROOT / "recipes" / "chatml-tools.jinja").read_text()
    return models.load_model(Path(small_model_path))[0], models.load_tokenizer(Path(small_model_path), template)


def test_tool_call_examples_bring_their_calls_and_tools(tools_model):
    from localtune.train.data import Encoder

    model, tok = tools_model
    train, golden = rows_of("data/tool_calls/train.jsonl", 20), rows_of("data/tool_calls/test.jsonl", 4)
    spec = EvalSpec(metric="tool_call", max_tokens=8, limit=4)
    plan = few_shot.plan(golden, "messages", [("sft", train, "messages", 512)], spec, 0, tok, 4096)
    assert plan["k"] == 3
    row = few_shot.with_examples(golden[0], plan["examples"], True)
    names = {t["function"]["name"] for t in row["tools"]}
    assert {t["function"]["name"] for s in plan["examples"] + golden[:1] for t in s["tools"]} == names
    text = tok.decode(Encoder(tok).prompt_tokens(row["messages"], row["tools"]))
    assert text.count("<tool_call>") >= 3 and text.endswith("<|im_start|>assistant\n")
    result = few_shot.measure(model, tok, golden, plan, spec)
    assert result["metric"] == "tool_call" and result["n"] == 4 and result["k"] == 3
    assert set(result["secondary"]) == {"parses", "right function"}
    assert result["samples"][0]["prompt"] == golden[0]["messages"][-2]["content"]  # the golden request


def test_loglik_with_examples_scores_only_the_golden_answers(tools_model):
    from localtune.integrity import evaluate

    model, tok = tools_model
    train, golden = rows_of("data/dates/train.jsonl", 20), rows_of("data/dates/test.jsonl", 6)
    spec = EvalSpec(metric="loglik", limit=6)
    plan = few_shot.plan(golden, "messages", [("sft", train, "messages", 128)], spec, 0, tok, 1024)
    plain, shots = evaluate.loglik(model, tok, golden), few_shot.measure(model, tok, golden, plan, spec)
    assert shots["tokens"] == plain["tokens"] and shots["k"] == 3  # the same answer tokens, more context
    assert shots["value"] != plain["value"] and len(plain["row_logp"]) == len(shots["row_logp"]) == 6
    assert shots["row_tokens"] == plain["row_tokens"]  # row by row: the examples' answers are never scored


@pytest.mark.parametrize("name, stage", [("sft-dpo", "sft"), ("grpo", "sft"), ("distill", "teacher")])
def test_shipped_chains_take_examples_from_the_first_stage_shaped_like_the_golden_set(name, stage):
    from localtune.train.prepare import prepare

    plan = prepare(recipe_mod.load(ROOT / "recipes" / f"{name}.toml")).few_shot
    assert plan["stage"] == stage and plan["k"] == 3 and plan["note"] == ""


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    from localtune.integrity.evaluate import shared_prefix

    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts: the last token is still run per prompt
    assert shared_prefix([[7, 1], [8, 1]]) == 0


def test_the_examples_run_once_and_answers_do_not_change(tools_model, monkeypatch):
    """The k examples every few-shot prompt starts with are prefilled once; each row then runs only its own
    tokens, and greedy answers are those of prefilling every prompt in full."""
    from localtune.integrity import evaluate

    model, tok = tools_model
    train, golden = rows_of("data/months/train.jsonl", 20), rows_of("data/months/test.jsonl", 12)
    shots = few_shot.choose(train, golden, 3, 0)
    prompts = [few_shot.with_examples(r, shots, True)["messages"][:-1] for r in golden]
    prefilled = []
    real = evaluate._prefill
    monkeypatch.setattr(evaluate, "_prefill", lambda m, tokens: prefilled.append(len(tokens)) or real(m, tokens))
    shared = evaluate.generate(model, tok, prompts, 4, batch_size=5)
    assert len(prefilled) == 1 and prefilled[0] > 3 * 10  # one prefill of the three examples, for 3 batches
    monkeypatch.setattr(evaluate, "SHARED_PREFIX", 10**9)
    assert evaluate.generate(model, tok, prompts, 4, batch_size=5) == shared and len(prefilled) == 1


def test_short_prompts_prefill_together_and_answers_do_not_change(tools_model, monkeypatch):
    """A batch of short golden prompts is prefilled in one call (mlx-lm's default is 8 at a time); long prompts
    still go 8 at a time at least, and the greedy answers are those of mlx-lm's default."""
    from localtune.integrity import evaluate

    assert evaluate.prefill_batch([[1] * 30] * 32) == 32
    assert evaluate.prefill_batch([[1] * 30] * 5) == 5
    assert evaluate.prefill_batch([[1] * 2000] * 32) == 8  # 8192 tokens a call, but never fewer than 8 prompts
    assert evaluate.prefill_batch([[1] * 500] * 32) == 16
    model, tok = tools_model
    prompts = [evaluate.prompt_and_answer(r)[0] for r in rows_of("data/months/test.jsonl", 24)]
    together = evaluate.generate(model, tok, prompts, 4)
    monkeypatch.setattr(evaluate, "prefill_batch", lambda chunk: 8)
    assert evaluate.generate(model, tok, prompts, 4) == together
