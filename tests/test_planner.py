"""The planner: memory parts from the model's own shapes, suggestions, the gate in `localtune run`."""
import json

import pytest
from mlx.utils import tree_flatten
from test_cli import ROOT, invoke, write_recipe

from localtune import device, models
from localtune import plan as planner
from localtune import recipe as recipe_mod
from localtune.train.prepare import prepare


def test_weights_and_adapter_parts_are_the_models_own_bytes(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path, batch_size=4)
    parsed = recipe_mod.load(recipe)
    p = planner.plan(parsed, prepare(parsed), calibrate_steps=False)[0]
    model, _ = models.load_model(small_model_path)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert p.parts["weights"] == weights  # fp32 on CPU: 4 bytes per parameter
    # rank-4 LoRA on the 7 linear layers of each block: (in + out) x 4 parameters each, fp32
    d = planner.dims(model)
    per_block = 4 * (2 * (d["h"] + d["h"]) + 2 * (d["h"] + d["kv"]) + 2 * (d["h"] + d["i"]) + (d["i"] + d["h"]))
    assert p.parts["adapters"] == d["layers"] * per_block * 4
    assert p.parts["optimizer"] == 2 * p.parts["adapters"]  # AdamW: two moments
    assert p.peak == sum(p.parts.values())
    assert p.rows == 4 and p.width % 8 == 0 and p.worst_case_peak > p.peak  # max_seq_len 64 > the data's rows


def test_gradient_checkpointing_and_fewer_layers_shrink_the_activations(tmp_path, small_model_path):
    parsed = recipe_mod.load(write_recipe(tmp_path, small_model_path, batch_size=8))
    prepared = prepare(parsed)
    model, _ = models.load_model(small_model_path, lazy=True)
    stage = parsed.stages[0]
    base = planner.plan_with_adapters(model, parsed, stage, prepared.train[stage.name], 6)
    ckpt = planner.plan_with_adapters(model, parsed, stage, prepared.train[stage.name], 6, grad_checkpoint=True)
    half = planner.plan_with_adapters(model, parsed, stage, prepared.train[stage.name], 6, batch_size=4)
    assert ckpt.parts["activations"] < base.parts["activations"]
    assert half.rows == 4 and half.parts["activations"] < base.parts["activations"]
    assert ckpt.parts["weights"] == base.parts["weights"] == half.parts["weights"]


def test_calibrated_plan_runs_real_steps_and_writes_nothing(tmp_path, small_model_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, small_model_path, batch_size=8)
    result = invoke("plan", recipe, "--json")
    assert result.exit_code == 0, result.output
    stage = json.loads(result.output)["stages"][0]
    assert stage["how"] == f"calibrated: 4 and 8 rows of {stage['width']} tokens"  # half and all of the batch
    assert stage["step_sec"] > 0 and stage["stage_sec"] == pytest.approx(stage["step_sec"] * 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml", "test.jsonl", "train.jsonl"]


def test_plan_json_is_only_json_when_a_stage_has_notes(tmp_path, small_model_path, monkeypatch):
    """DPO's calibration notes that pairs share their prompt; `plan --json` prints the plan alone (bench_plan
    reads it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prefs.jsonl").write_text("".join(
        (ROOT / "data/date_prefs/train.jsonl").read_text().splitlines(True)[:16]))
    recipe = write_recipe(tmp_path, small_model_path, batch_size=4)
    dpo = '[[stages]]\nkind = "dpo"\ndata = "prefs.jsonl"\nbeta = 0.1\nsteps = 2\nbatch_size = 4\nmax_seq_len = 64\n'
    recipe.write_text(recipe.read_text().replace("[eval]", dpo + "\n[eval]", 1))
    result = invoke("plan", recipe, "--json")
    assert result.exit_code == 0, result.output
    assert [s["kind"] for s in json.loads(result.stdout)["stages"]] == ["sft", "dpo"]


@pytest.fixture
def tiny_limit(monkeypatch):
    """A device with 40 MB: the small model's SFT stage (about 60 MB) does not fit."""
    monkeypatch.setattr(device, "memory_limit_bytes", lambda: 40 * 2**20)


def test_run_refuses_a_recipe_that_will_not_fit(tmp_path, small_model_path, tiny_limit):
    recipe = write_recipe(tmp_path, small_model_path, batch_size=16, max_seq_len=64)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == planner.DoesNotFit.exit_code == 4
    out = result.output
    assert "this recipe will not fit in memory (40.0 MiB, physical memory)" in out
    assert "[stages.sft] needs about" in out and "weights" in out and "activations" in out
    for fix in ("[stages.sft] grad_checkpoint = true", "[stages.sft] batch_size = 8, grad_accum = 2",
                "[model] quantize = { bits = 4 }", "[stages.sft.adapter] layers = "):
        assert f"fix: {fix}" in out, fix
    assert "--force" in out
    assert not (tmp_path / "runs").exists()  # nothing written


def test_force_runs_it_anyway(tmp_path, small_model_path, tiny_limit):
    recipe = write_recipe(tmp_path, small_model_path, batch_size=16, max_seq_len=64, steps=2)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs", "--force")
    assert result.exit_code == 0, result.output
    assert "over the limit, running anyway (--force)" in result.output and "step     2/2" in result.output


def test_plan_exits_non_zero_with_the_suggestions(tmp_path, small_model_path, tiny_limit):
    recipe = write_recipe(tmp_path, small_model_path, batch_size=16)
    result = invoke("plan", recipe, "--no-calibrate")
    assert result.exit_code == 4
    assert "DOES NOT FIT" in result.output and "try: [stages.sft] grad_checkpoint = true -> peak" in result.output
    assert "s/step x 6 steps" in result.output and "(formula)" in result.output


def test_sliding_windows_and_linear_attention_shape_the_rollout_cache():
    from types import SimpleNamespace

    from localtune.plan import _attention_layers, _linear_state, kv_positions, rollout_cache_bytes

    gemma3 = SimpleNamespace(sliding_window=512, sliding_window_pattern=6)  # 5 local layers, then a global one
    d = {"attention": _attention_layers(gemma3, 12)}
    assert d["attention"] == [512] * 5 + [None] + [512] * 5 + [None]
    assert kv_positions(d, 4096) == 10 * 512 + 2 * 4096 and kv_positions(d, 100) == 12 * 100
    assert _attention_layers(SimpleNamespace(layer_types=["linear_attention", "full_attention"]), 2) == [0, None]
    hybrid = SimpleNamespace(sliding_window=None, full_attention_interval=4,  # mlx-lm's qwen3_5 text args
                             linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                             linear_value_head_dim=16, linear_conv_kernel_dim=4)
    d = {"attention": _attention_layers(hybrid, 4), "kv": 8, "state": _linear_state(hybrid)}
    assert kv_positions(d, 1000) == 1000  # Qwen3.5: 3 of 4 layers linear
    assert d["state"] == 4 * 16 * 16 + 3 * (2 * 2 * 16 + 4 * 16)  # per value head k x v, and the conv's last 3
    assert rollout_cache_bytes(d, 2, 1000, 4) == (2 * 1000 * 8 + 3 * d["state"]) * 2 * 4  # the same at any width
    assert kv_positions({"attention": _attention_layers(SimpleNamespace(), 3)}, 10) == 30


def test_a_moe_token_runs_its_active_experts_but_all_are_held():
    from mlx_lm.models import qwen3_moe

    from localtune.plan import block_params, dims

    args = qwen3_moe.ModelArgs(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                               vocab_size=100, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                               decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                               rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False)
    d = dims(qwen3_moe.Model(args))
    assert (d["i"], d["i_total"]) == (2 * 32, 8 * 32)
    assert block_params(d, "i_total") - block_params(d) == 2 * 3 * 64 * (8 - 2) * 32
