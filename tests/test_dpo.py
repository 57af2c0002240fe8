"""DPO: the losses' maths, the reference as "adapters off", gradients that flow, and its data."""
import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_tiny_model
from mlx.utils import tree_flatten, tree_unflatten
from test_trainer import fit, snapshot

from localtune.cli import cli
from localtune.methods import dpo, logprobs
from localtune.recipe import Adapter, make_stage
from localtune.train import adapters, data, trainer

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
    return make_stage("dpo", data="x", beta=kw.pop("beta", 0.1), adapter=Adapter(rank=4, alpha=8), **kw)


def batch_with_reference(model, pair_set, cache=None):
    b = next(data.Batches(pair_set, 4, 0, collate=dpo.collate_pairs))
    return trainer.to_mx(dpo.WithReference(None, model, cache).attach(b))


def test_sequence_logps_sum_the_response_tokens_of_each_row():
    model = make_tiny_model()
    ps = pairs()
    b = trainer.to_mx(dpo.collate_pairs(ps.examples[:3]))
    logps, ntoks = dpo.sequence_logps(model, b)
    logits = model(b["inputs"]).astype(mx.float32)
    token = mx.take_along_axis(logits, b["targets"][..., None], axis=-1)[..., 0] - mx.logsumexp(logits, axis=-1)
    np.testing.assert_allclose(np.array(logps), np.array((token * b["loss_mask"]).sum(-1)), rtol=1e-5)
    assert ntoks.tolist() == b["loss_mask"].sum(-1).tolist()


def unshared(batch):
    return {k: v for k, v in batch.items() if k not in ("prompt", "prompt_real", "response", "response_mask")}


def tiny_gemma3(window: int):
    """Gemma 3's layout: 5 sliding-window layers of `window` positions, then a global one."""
    from mlx_lm.models import gemma3_text

    mx.random.seed(0)
    args = gemma3_text.ModelArgs(model_type="gemma3_text", hidden_size=64, num_hidden_layers=6, intermediate_size=96,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=100,
                                 query_pre_attn_scalar=16, sliding_window=window, sliding_window_pattern=6)
    model = gemma3_text.Model(args)
    model.tie_word_embeddings = True
    model.pop("lm_head")
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("kind", ["float", "tied", "quantized", "blockwise head", "gemma3 sliding window"])
def test_one_prompt_pass_for_both_responses_gives_the_same_logps_and_gradients(kind, monkeypatch):
    from localtune import models
    from localtune.methods import logprobs

    model = tiny_gemma3(window=5) if kind.startswith("gemma3") else make_tiny_model(tie=kind == "tied")
    if kind == "quantized":
        models.quantize_base(model, bits=4, group_size=32)
        models.use_cpu_quantized_path(model)
    if kind == "blockwise head":
        monkeypatch.setattr(logprobs, "BLOCKWISE_FROM", 1)
        monkeypatch.setattr(logprobs, "_BLOCK", 64 * 30)
    adapters.attach(model, Adapter(rank=4, alpha=8))
    _randomize = np.random.default_rng(1)
    model.update(tree_unflatten([(k, mx.array(_randomize.normal(0, 0.1, v.shape), v.dtype))
                                          for k, v in adapters.trainable_weights(model).items()]))
    b = trainer.to_mx(dpo.collate_pairs(pairs(6).examples))  # prompts of 4-9 tokens: left padding differs
    assert b["prompt"].shape[0] == 6 and b["response"].shape[0] == 12

    def total(m, batch):
        logps, n = dpo.sequence_logps(m, batch)
        return (logps * mx.arange(1, 13)).sum(), (logps, n)

    (shared_total, (shared, n1)), g1 = nn.value_and_grad(model, lambda m: total(m, b))(model)
    (plain_total, (plain, n2)), g2 = nn.value_and_grad(model, lambda m: total(m, unshared(b)))(model)
    np.testing.assert_allclose(np.array(shared), np.array(plain), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.array(n1), np.array(n2))
    for (k, a), (_, c) in zip(tree_flatten(g1), tree_flatten(g2)):
        a, c = np.array(a), np.array(c)
        if kind.startswith("gemma3"):  # sqrt(hidden)-scaled embeddings: gradients of size ~10, compare as a whole
            assert np.linalg.norm(a - c) <= 1e-4 * np.linalg.norm(c), (k, np.linalg.norm(a - c) / np.linalg.norm(c))
        else:
            np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4, err_msg=k)


def test_pairs_with_different_prompts_keep_one_row_per_response():
    ps = pairs(4)
    p = ps.examples[0]
    other = data.Example(np.concatenate([[7], p.rejected.tokens[1:]]).astype(np.int32), p.rejected.loss_mask)
    ps.examples[0] = dpo.Pair(0, p.chosen, other)
    assert "prompt" not in dpo.collate_pairs(ps.examples).extras
    assert "prompt" in dpo.collate_pairs(ps.examples[1:]).extras


def test_a_model_whose_numbers_differ_when_sharing_prompts_runs_them_per_response(monkeypatch):
    model = make_tiny_model()
    adapters.attach(model, Adapter(rank=4, alpha=8))
    notes = []
    monkeypatch.setattr(logprobs, "shared_logps", lambda m, b: (mx.zeros((16,)), mx.ones((16,))))
    dpo.check_shared_prompts(model, data.Batches(pairs(), 8, 0, collate=dpo.collate_pairs), notes.append)
    assert "sharing them does not reproduce this model's numbers" in notes[0]
    b = trainer.to_mx(dpo.collate_pairs(pairs().examples))
    assert dpo.sequence_logps(model, b)[0].abs().min().item() > 0  # the per-response path, not the stub


def test_at_step_zero_the_loss_is_log_2_and_rewards_are_zero():
    model = make_tiny_model()
    adapters.attach(model, Adapter(rank=4, alpha=8))
    b = batch_with_reference(model, pairs())
    loss, n, metrics = dpo.make_loss(stage())(model, b)
    assert n.item() == 4
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert metrics["reward_margin"].item() == 0.0 and metrics["rewards_chosen"].item() == 0.0


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_off_is_exactly_the_base_model_even_after_training(tmp_path, kind):
    base = make_tiny_model(seed=3)
    x = mx.array(np.random.default_rng(0).integers(0, 100, (2, 9)))
    expected = np.array(base(x))
    adapters.attach(base, Adapter(type=kind, rank=4, alpha=8))
    fit(base, data.Batches(pairs(), 4, 0, collate=dpo.collate_pairs), tmp_path, 2, attached=True,
        loss=lambda m, b: (m(b["inputs"]).mean(), mx.array(1.0), {}))  # anything that moves the adapters
    trained = np.array(base(x))
    assert not np.allclose(trained, expected)
    with adapters.adapters_disabled(base):
        np.testing.assert_allclose(np.array(base(x)), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.array(base(x)), trained)  # and switched back on


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_dpo_gradients_reach_every_adapter_parameter(tmp_path, kind):
    model = make_tiny_model()
    adapters.attach(model, Adapter(type=kind, rank=4, alpha=8))
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


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_reference_pass_inside_the_compiled_step_trains_like_one_attached_to_the_batch(tmp_path, kind):
    runs = []
    for in_graph in (True, False):
        model = make_tiny_model()
        adapters.attach(model, Adapter(type=kind, rank=4, alpha=8))
        batches = data.Batches(pairs(16), 4, 0, collate=dpo.collate_pairs)
        losses = []
        fit(model, batches if in_graph else dpo.WithReference(batches, model, None), tmp_path / str(in_graph), 4,
            loss=dpo.make_loss(stage()), attached=True,
            report=lambda r: losses.append(r["loss"]) if r["kind"] == "train" else None)
        runs.append((losses, adapters.trainable_weights(model)))
    (graph_losses, graph_weights), (eager_losses, eager_weights) = runs
    assert len(graph_losses) == 4 and math.isclose(graph_losses[0], math.log(2), rel_tol=1e-5)
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=1e-5)
    for k in eager_weights:
        np.testing.assert_allclose(np.array(graph_weights[k]), np.array(eager_weights[k]), atol=1e-6)


def test_changed_pairs_rebuild_the_cache(tmp_path):
    model = make_tiny_model()
    first = dpo.ReferenceCache.build(model, pairs(6, seed=1), tmp_path / "ref.safetensors", 4)
    second = dpo.ReferenceCache.build(model, pairs(6, seed=2), tmp_path / "ref.safetensors", 4)
    assert not np.allclose(first.chosen, second.chosen)


@pytest.mark.parametrize("total,passes,known", [
    (5, 3, 20),  # a whole epoch of 4-pair batches: 8 + 8 + 4 pairs, each computed once
    (3, 2, 12),  # three batches: the pairs of batches 1-2, then of batch 3 (nothing training will not use)
    (None, 3, 20),
])
def test_the_cache_fills_a_pass_at_a_time_with_the_pairs_training_reaches_next(tmp_path, total, passes, known):
    model = make_tiny_model()
    adapters.attach(model, Adapter(rank=4, alpha=8))
    ps = pairs(20)
    full = dpo.ReferenceCache.build(model, ps, tmp_path / "full.safetensors", 8)
    assert full.passes == 3 and full.known.all()
    cache = dpo.ReferenceCache(model, ps, tmp_path / "ref.safetensors", 8)
    stream = data.Batches(ps, 4, 0, collate=dpo.collate_pairs)
    second = stream.upcoming()
    next(second)
    second = next(second)  # the batch after the first, as the stream will serve it
    batches = dpo.WithReference(stream, model, cache, total)
    first = next(batches)
    ids = first.extras["pair_ids"]
    assert cache.passes == 1 and cache.known.sum() == 8 and cache.known[ids].all() and cache.known[second].all()
    np.testing.assert_allclose(first.extras["reference_chosen"], full.chosen[ids], rtol=1e-5)
    assert next(batches).extras["pair_ids"].tolist() == second
    for _ in range((total or 5) - 2):
        next(batches)
    assert cache.passes == passes and cache.known.sum() == known
    served = cache.known
    np.testing.assert_allclose(cache.rejected[served], full.rejected[served], rtol=1e-5)
    assert (tmp_path / "ref.safetensors").exists() is (known == 20)  # complete: saved


def test_a_checkpoint_keeps_a_partial_cache_for_resume(tmp_path):
    model = make_tiny_model()
    adapters.attach(model, Adapter(rank=4, alpha=8))
    ps = pairs(20)
    cache = dpo.ReferenceCache(model, ps, tmp_path / "ref.safetensors", 8)
    batches = dpo.WithReference(data.Batches(ps, 4, 0, collate=dpo.collate_pairs), model, cache)
    next(batches)
    assert not (tmp_path / "ref.safetensors").exists()
    batches.state()  # what the trainer asks for when it checkpoints
    resumed = dpo.ReferenceCache(model, ps, tmp_path / "ref.safetensors", 8)
    assert resumed.known.sum() == 8
    np.testing.assert_array_equal(resumed.chosen[resumed.known], cache.chosen[cache.known])


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

def write_sft_dpo(tmp_path, small_model_path, dpo_rows=None, quantize=False, **dpo_stage):
    from conftest import ROOT

    prefs = ROOT / "data" / "date_prefs"
    (tmp_path / "sft.jsonl").write_text("".join((prefs / "sft.jsonl").read_text().splitlines(True)[:64]))
    rows = dpo_rows or [json.loads(x) for x in (prefs / "train.jsonl").read_text().splitlines()[:32]]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "valid.jsonl").write_text("".join((prefs / "valid.jsonl").read_text().splitlines(True)[:8]))
    settings = {"kind": "dpo", "data": "prefs.jsonl", "valid": "valid.jsonl", "beta": 0.1, "steps": 4,
                "batch_size": 4, "max_seq_len": 64, "eval_every": 4, "save_every": 2, "report_every": 1,
                "reference": "precomputed", **dpo_stage}
    lines = [f'[model]\npath = "{small_model_path}"\n'
             + ("quantize = { bits = 4, group_size = 32 }\n" if quantize else ""),
             '[[stages]]\nkind = "sft"\ndata = "sft.jsonl"\nsteps = 4\nbatch_size = 4\nlearning_rate = 1e-3\n'
             "max_seq_len = 64\neval_every = 0\nreport_every = 2\n[stages.adapter]\nrank = 4\nalpha = 8\n",
             "[[stages]]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items() if v is not None]
    lines += ["[stages.adapter]\nrank = 4\nalpha = 8\n", "[eval]\ngeneral_limit = 16\n"]
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("\n".join(lines) + "\n")
    return recipe


@pytest.mark.parametrize("quantize", [False, True], ids=["float base (sft fused)", "QLoRA base (sft stacked)"])
def test_sft_then_dpo_uses_the_sft_model_as_reference(tmp_path, small_model_path, quantize):
    from localtune.loading import load_for_inference

    recipe = write_sft_dpo(tmp_path, small_model_path, quantize=quantize)
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
    shared = "on CPU a second pass would dequantize the 4-bit base again" if quantize else "each prompt runs once"
    assert shared in result.output
    how = "stacked" if quantize else "fused"
    assert f"sft's adapters {how} under dpo's" in result.output

    # the cached reference log-probs are the SFT model's (no DPO adapters), pair by pair
    cached = mx.load(str(run / "dpo" / "reference_logps.safetensors"))
    model, tokenizer = load_for_inference(str(run), "sft")
    rows = [json.loads(x) for x in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    ps = dpo.encode_pairs(rows, tokenizer, 64, "prefs.jsonl")
    b = trainer.to_mx(dpo.collate_pairs(ps.examples[:4]))
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
    assert "sft.jsonl:1: a dpo stage needs" in result.output and "prompt" in result.output
    assert not (tmp_path / "runs").exists()  # nothing written


def test_dora_after_an_earlier_stage_on_a_quantized_base_is_refused_before_training(tmp_path, small_model_path):
    recipe = write_sft_dpo(tmp_path, small_model_path, quantize=True)
    recipe.write_text(recipe.read_text().replace("[stages.adapter]\nrank = 4", '[stages.adapter]\ntype = "dora"\nrank = 4'))
    result = CliRunner().invoke(cli, ["run", str(recipe), "--no-tui", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert '[stages.dpo.adapter] type = "dora" cannot follow an earlier stage on a quantized base' in result.output
    assert 'fix: use type = "lora"' in result.output
    assert not (tmp_path / "runs").exists()
