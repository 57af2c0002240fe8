"""The one loop: it trains what it should, accumulates exactly, resumes exactly, stops on NaN."""
import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_tiny_model

from localtune import models
from localtune.errors import TrainingError
from localtune.methods import sft
from localtune.recipe import Adapter
from localtune.run import Run
from localtune.train import adapters, checkpoint, data, trainer


def examples(n=32, seed=0, equal_length=False, vocab=100, prompt_share=1 / 3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = 16 if equal_length else int(rng.integers(6, 30))
        tokens = rng.integers(3, vocab, size=length).astype(np.int32)
        mask = np.ones(length, bool)
        mask[: int(length * prompt_share)] = False  # a "prompt" with no loss
        out.append(data.Example(tokens, mask))
    return data.Dataset(out, source="mem")


class ListBatches:
    """A fixed sequence of batches with the trainer's cursor protocol."""

    def __init__(self, batches):
        self.batches, self.index = batches, 0

    def __next__(self):
        b = self.batches[self.index % len(self.batches)]
        self.index += 1
        return b

    def state(self):
        return {"index": self.index}

    def restore(self, state):
        self.index = state["index"]


def run_dir(tmp_path, name="t"):
    return Run.create(tmp_path, name, "")


def fit(model, batches, tmp_path, steps, name="t", report=lambda r: None, loss=sft.loss, **kw):
    mx.random.seed(1)  # the same LoRA init for every model in a test
    cfg = adapters.attach(model, Adapter(rank=4, alpha=8)) if not kw.pop("attached", False) else {}
    run = kw.pop("run", None) or run_dir(tmp_path, name)
    args = trainer.TrainArgs(steps=steps, learning_rate=kw.pop("learning_rate", 1e-2), report_every=1,
                             save_every=kw.pop("save_every", 100), eval_every=0, **kw)
    return trainer.train(model, loss, batches, args, run=run, stage="sft", stage_dir=run.path / "sft",
                         adapter_config=cfg, report=report), run


def snapshot(model):
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_lora_trainable_parameter_count_is_exact(tiny_model):
    adapters.attach(tiny_model, Adapter(rank=4, alpha=8))
    trainable, total = models.count_parameters(tiny_model)
    # per block, r*(in+out): q 4*128 + k 4*96 + v 4*96 + o 4*128 + gate/up/down 3 * 4*192
    assert trainable == 2 * (512 + 384 + 384 + 512 + 3 * 768) == 8192
    assert total == 86_848 + 8192


def test_targets_and_layers_limit_what_is_adapted(tiny_model):
    adapters.attach(tiny_model, Adapter(rank=2, alpha=2, layers=1, targets=["self_attn.q_proj", "self_attn.v_proj"]))
    assert models.count_parameters(tiny_model)[0] == 2 * 128 + 2 * 96


def test_asking_for_more_layers_than_the_model_has(tiny_model):
    from localtune.errors import RecipeError

    with pytest.raises(RecipeError, match="asked for 5 adapted layers but the model has 2"):
        adapters.attach(tiny_model, Adapter(layers=5))


def test_training_changes_every_trainable_and_no_frozen_parameter(tiny_model, tmp_path):
    adapters.attach(tiny_model, Adapter(rank=4, alpha=8))
    before = snapshot(tiny_model)
    trainable = set(adapters.trainable_weights(tiny_model))
    # two steps: lora_b starts at zero, so lora_a's gradient is zero on the first step
    fit(tiny_model, data.Batches(examples(), 4, 0), tmp_path, 2, attached=True)
    after = snapshot(tiny_model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == trainable and len(trainable) == 28


def test_loss_goes_down(tiny_model, tmp_path):
    records = []
    fixed = ListBatches([data.collate_examples(examples(4, equal_length=True).examples)])
    fit(tiny_model, fixed, tmp_path, 40, report=records.append, learning_rate=3e-2, lr_schedule="constant")
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.5  # nats, on memorising 4 random rows


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    exs = examples(8, equal_length=False).examples
    big = ListBatches([data.collate_examples(exs[:4]), data.collate_examples(exs[4:])])
    small = ListBatches([data.collate_examples(exs[i:i + 2]) for i in range(0, 8, 2)])
    m1, m2 = make_tiny_model(), make_tiny_model()
    fit(m1, big, tmp_path, 2, "a", optimizer="sgd")
    fit(m2, small, tmp_path, 2, "b", optimizer="sgd", grad_accum=2)
    a, b = adapters.trainable_weights(m1), adapters.trainable_weights(m2)
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5)


def test_gradient_accumulation_holds_one_micro_batch_at_a_time(tmp_path):
    """Eight micro-batches of 4 rows peak near one of them, not near the 32-row batch they add up to."""
    exs = examples(32, equal_length=True).examples
    peaks = {}
    for name, rows, accum in (("one", 32, 1), ("accumulated", 4, 8), ("micro", 4, 1)):
        batches = ListBatches([data.collate_examples(exs[i:i + rows]) for i in range(0, 32, rows)])
        model = make_tiny_model(vocab=4096, hidden=128)  # activations (the logits) dominate the peak
        summary, _ = fit(model, batches, tmp_path, 1, name, grad_accum=accum, compile=False)
        peaks[name] = summary["peak_memory_gb"]
    assert peaks["accumulated"] < 0.5 * peaks["one"], peaks
    assert peaks["accumulated"] < 1.3 * peaks["micro"], peaks


def test_resume_after_a_crash_ends_with_the_same_adapter(tmp_path):
    ds = examples(24)
    straight = make_tiny_model()
    fit(straight, data.Batches(ds, 4, 0), tmp_path, 10, "straight", save_every=4)

    def crash_at_6(record):
        if record["kind"] == "train" and record["step"] == 6:
            raise RuntimeError("simulated crash")

    crashed = make_tiny_model()
    mx.random.seed(1)
    cfg = adapters.attach(crashed, Adapter(rank=4, alpha=8))
    run = run_dir(tmp_path, "crashed")
    args = trainer.TrainArgs(steps=10, learning_rate=1e-2, report_every=1, save_every=4, eval_every=0)
    with pytest.raises(RuntimeError):
        trainer.train(crashed, sft.loss, data.Batches(ds, 4, 0), args, run=run, stage="sft",
                      stage_dir=run.path / "sft", adapter_config=cfg, report=crash_at_6)
    resumed = make_tiny_model()
    mx.random.seed(99)  # a fresh process: other LoRA init, then restored from the checkpoint
    adapters.attach(resumed, Adapter(rank=4, alpha=8))
    summary = trainer.train(resumed, sft.loss, data.Batches(ds, 4, 0), args, run=run, stage="sft",
                            stage_dir=run.path / "sft", adapter_config=cfg, report=lambda r: None)
    assert summary["step"] == 10
    a, b = adapters.trainable_weights(straight), adapters.trainable_weights(resumed)
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-4, atol=1e-6)
    events = [m.get("event") for m in run.metrics()]
    assert "resumed" in events


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path):
    calls = {"n": 0}

    def poisoned(model, batch):
        loss, ntoks, metrics = sft.loss(model, batch)
        calls["n"] += 1
        return (loss * mx.array(float("nan")) if calls["n"] >= 3 else loss), ntoks, metrics

    with pytest.raises(TrainingError) as err:
        fit(tiny_model, data.Batches(examples(), 4, 0), tmp_path, 10, loss=poisoned, save_every=2, compile=False)
    message = err.value.message
    assert "step 3" in message and "nan" in message and "step 2" in message and "--resume" in message
    run_path = next(tmp_path.glob("t-*"))
    assert checkpoint.step_of(run_path / "sft" / "checkpoint") == 2


def test_packed_rows_score_like_separate_sequences(tiny_model):
    ds = examples(6, seed=3)
    tiny_model.eval()
    separate = data.collate_examples(ds.examples)
    loss_sep, n_sep, _ = sft.loss(tiny_model, trainer.to_mx(separate))
    bins = data._pack(ds.examples, 64)
    packed = data._collate_packed(bins, 64)
    assert len(bins) < len(ds.examples)  # it really packed
    loss_packed, n_packed, _ = sft.loss(tiny_model, trainer.to_mx(packed))
    assert n_sep.item() == n_packed.item()
    assert math.isclose(loss_sep.item(), loss_packed.item(), rel_tol=1e-4)


def test_gradient_checkpointing_is_per_instance(tmp_path):
    m1, m2 = make_tiny_model(), make_tiny_model()
    adapters.attach(m1, Adapter(rank=4, alpha=8))
    adapters.attach(m2, Adapter(rank=4, alpha=8))
    batch = trainer.to_mx(data.collate_examples(examples(4).examples))
    import mlx.nn as nn

    plain = nn.value_and_grad(m1, sft.loss)(m1, batch)[1]
    trainer.checkpoint_layers(m1)
    assert type(m1.layers[0]) is not type(m2.layers[0])  # the other model's blocks are untouched
    ckpt = nn.value_and_grad(m1, sft.loss)(m1, batch)[1]
    from mlx.utils import tree_flatten

    for (k, a), (_, b) in zip(tree_flatten(plain), tree_flatten(ckpt)):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)


def test_schedule_warmup_then_cosine():
    lr = trainer.schedule(trainer.TrainArgs(steps=110, learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1))
    assert lr(0).item() == 0.0
    assert math.isclose(lr(5).item(), 0.5, rel_tol=1e-6)
    assert math.isclose(lr(10).item(), 1.0, rel_tol=1e-6)
    assert math.isclose(lr(60).item(), 0.55, rel_tol=1e-4)  # halfway down the cosine
    assert math.isclose(lr(110).item(), 0.1, rel_tol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_scoring_only_target_positions_equals_the_full_masked_loss(tie):
    import mlx.nn as nn

    model = make_tiny_model(tie=tie)
    batch = trainer.to_mx(data.collate_examples(examples(5, seed=1, prompt_share=0.8).examples))
    assert "target_index" in batch  # mostly prompt: only the scored positions go through the head
    full = nn.losses.cross_entropy(model(batch["inputs"]), batch["targets"]) * batch["loss_mask"]
    expected = full.sum() / batch["loss_mask"].sum()
    loss, ntoks, _ = sft.loss(model, batch)
    assert ntoks.item() == batch["loss_mask"].sum().item()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)


def test_dora_trains_its_magnitudes_too(tiny_model, tmp_path):
    adapters.attach(tiny_model, Adapter(type="dora", rank=4, alpha=8))
    trainable = set(adapters.trainable_weights(tiny_model))
    assert sum(k.endswith(".m") for k in trainable) == 14  # one magnitude vector per adapted linear
    before = snapshot(tiny_model)
    fit(tiny_model, data.Batches(examples(), 4, 0), tmp_path, 2, attached=True)
    after = snapshot(tiny_model)
    assert {k for k in before if not np.array_equal(before[k], after[k])} == trainable


def test_full_finetuning_of_the_last_block(tiny_model):
    adapters.attach(tiny_model, Adapter(type="full", layers=1))
    trainable, total = models.count_parameters(tiny_model)
    assert trainable == 36_992 and total == 86_848  # one block: q,k,v,o + gate,up,down + two norms



def test_a_watcher_can_ask_for_a_checkpoint_now(tiny_model, tmp_path):
    run, events = run_dir(tmp_path), []

    def report(record):
        if record["kind"] == "train" and record["step"] == 2:
            run.request(checkpoint=1.0)  # what the TUI's `s` key writes
        if record["kind"] == "event":
            events.append((record["step"], record["event"], record.get("message")))

    fit(tiny_model, data.Batches(examples(), 4, 0), tmp_path, 4, report=report, save_every=100, run=run)
    assert [e for e in events if e[1] == "checkpoint"] == [(2, "checkpoint", "checkpoint at step 2 (asked for)")]


def test_pause_holds_training_between_steps_until_resumed(tiny_model, tmp_path):
    import threading

    run, seen = run_dir(tmp_path), []

    def report(record):
        seen.append((record["kind"], record["step"], record.get("event")))
        if record["kind"] == "train" and record["step"] == 1:
            run.request(paused=True)  # the TUI's `p` key
            threading.Timer(0.5, lambda: run.request(paused=False)).start()

    summary, _ = fit(tiny_model, data.Batches(examples(), 4, 0), tmp_path, 3, report=report, run=run)
    assert summary["step"] == 3
    assert [s for s in seen if s[0] == "event"] == [("event", 1, "paused"), ("event", 1, "unpaused")]
    assert [s[1] for s in seen if s[0] == "train"] == [1, 2, 3]


def test_reported_peak_memory_is_the_stage_own(tiny_model, tmp_path):
    big = mx.zeros((64, 1024, 1024))  # 256 MiB, gone before training starts
    mx.eval(big)
    del big
    records = []
    fit(tiny_model, data.Batches(examples(), 4, 0), tmp_path, 2, report=records.append)
    peaks = [r["peak_memory_gb"] for r in records if r["kind"] == "train"]
    assert peaks and max(peaks) < 0.1  # a tiny model trains in a few MiB
