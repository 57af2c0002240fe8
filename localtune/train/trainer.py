"""The one training loop: train(model, loss_fn, batches, args, run).

Each method supplies `loss_fn(model, batch) -> (loss, n_tokens, metrics)` and a
batch iterator with `state()` / `restore()` (and optionally `metrics()`, merged into each
report: PPO's rollout statistics). The loop owns the optimizer, the
schedule, accumulation, clipping, checkpoints, evaluation, metrics, the NaN
guard, Ctrl-C and resume.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from .. import device
from ..errors import TrainingError
from ..models import CPUQuantizedEmbedding, CPUQuantizedLinear
from . import checkpoint, distributed
from .adapters import save


@dataclass(frozen=True)
class TrainArgs:
    steps: int
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 1.0
    grad_checkpoint: bool = False
    eval_every: int = 50
    save_every: int = 50
    report_every: int = 10
    seed: int = 0
    compile: bool = True


def schedule(args: TrainArgs):
    """Linear warmup from 0, then cosine / linear decay to min_lr_ratio * lr, or constant."""
    lr, warm = args.learning_rate, args.warmup_steps
    decay_steps = max(1, args.steps - warm)
    end = lr * args.min_lr_ratio
    if args.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, decay_steps, end)
    elif args.lr_schedule == "linear":
        main = optim.linear_schedule(lr, end, decay_steps)
    else:
        main = lambda step: mx.array(lr, mx.float32)  # noqa: E731
    if not warm:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(args: TrainArgs) -> optim.Optimizer:
    lr = schedule(args)
    if args.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    return optim.SGD(learning_rate=lr, weight_decay=args.weight_decay)


def checkpoint_layers(model: nn.Module) -> None:
    """Gradient checkpointing per block *instance* (mlx-lm patches the class, hitting every model)."""
    for block in model.layers:
        cls = type(block)
        if getattr(cls, "_localtune_checkpointed", False):
            continue

        def call(self, *args, _base=cls.__call__, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return _base(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        block.__class__ = type(cls.__name__, (cls,), {"__call__": call, "_localtune_checkpointed": True})


# The loop ------------------------------------------------------------------


class _StopRequest:
    """Ctrl-C sets a flag; the loop checkpoints after the current step and exits."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, *_):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class _Window:
    """Running sums between two progress reports."""

    def __init__(self):
        self.loss, self.tokens, self.real, self.time, self.steps, self.metrics = 0.0, 0, 0, 0.0, 0, {}
        self.pairs = 0

    def add(self, loss: float, counts: list[float], seconds: float, metrics: dict) -> None:
        """counts: target tokens, real tokens and pairs of the step (every rank's)."""
        self.loss += loss
        self.tokens += int(counts[0])
        self.real += int(counts[1])
        self.pairs += int(counts[2])
        self.time += seconds
        self.steps += 1
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v

    def record(self, steps_left: int) -> dict:
        n = self.steps
        record = {"loss": self.loss / n, "time_sec": self.time, "tokens_per_sec": self.tokens / self.time,
                  "real_tokens_per_sec": self.real / self.time, "eta_sec": self.time / n * steps_left,
                  **{k: v / n for k, v in self.metrics.items()}}
        if self.pairs:
            record["pairs_per_sec"] = self.pairs / self.time
        return record


CPU_DEQUANTIZED = (CPUQuantizedLinear, CPUQuantizedEmbedding)


class _Control:
    """Requests from a watcher through run/control.json: pause, resume, checkpoint now.

    Read once per step, only when the file changed (one stat() call otherwise).
    """

    def __init__(self, run):
        self.run, self.path, self.mtime = run, run.path / "control.json", None
        self.seen_checkpoint = run.control().get("checkpoint", 0)

    def poll(self) -> dict:
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return {}
        if mtime == self.mtime:
            return {}
        self.mtime = mtime
        control = self.run.control()
        asked = control.get("checkpoint", 0)
        wants_checkpoint = asked != self.seen_checkpoint
        self.seen_checkpoint = asked
        return {"paused": bool(control.get("paused")), "checkpoint": wants_checkpoint}


def _wait_while_paused(control: _Control, stop, run, stage: str, step: int, steps: int, request: dict, report):
    """Block between steps while a watcher has paused the run; Ctrl-C/stop still works."""
    if not request.get("paused"):
        return
    run.set_status(state="paused", stage=stage, step=step, steps_total=steps)
    report(run.log(stage, step, "event", event="paused", message=f"paused at step {step}"))
    while not stop.requested:
        time.sleep(0.2)
        new = control.poll()
        if new and not new["paused"]:
            break
    run.set_status(state="running", stage=stage, step=step, steps_total=steps)
    report(run.log(stage, step, "event", event="unpaused", message=f"continuing from step {step}"))


class Interrupted(Exception):
    def __init__(self, step: int):
        self.step = step


def to_mx(batch) -> dict:
    """numpy Batch -> mx arrays, plus the flat indices of scored positions (see methods/logprobs.py)."""
    out = {"inputs": mx.array(batch.inputs), "targets": mx.array(batch.targets),
           "loss_mask": mx.array(batch.loss_mask)}
    if (positions := batch.target_positions()) is not None:
        out["target_index"], out["target_weight"] = map(mx.array, positions)
    if batch.segments is not None:
        out["segments"] = mx.array(batch.segments)
    out.update({k: mx.array(v) for k, v in batch.extras.items()})
    return out


def train(model, loss_fn, batches, args: TrainArgs, *, run, stage: str, stage_dir: Path,
          adapter_config: dict, eval_fn=None, guard=None, fingerprint: str | None = None, report=print) -> dict:
    """Train `args.steps` optimizer steps, resuming from stage_dir/checkpoint if present.

    `fingerprint` (the stage's recipe and data) is saved in each checkpoint; a resume takes only a
    checkpoint with the same one. Returns a summary dict (final step, last train/eval loss,
    tokens/s, peak memory).
    """
    ckpt_dir = stage_dir / "checkpoint"
    optimizer = make_optimizer(args)
    optimizer.init(model.trainable_parameters())
    start = 0
    world = distributed.size()

    def warn(message):
        report(run.warn(stage, 0, message))

    meta = checkpoint.load(ckpt_dir, model, optimizer, batches, steps=args.steps, fingerprint=fingerprint, warn=warn)
    if meta is None and run.status().get("stage") == stage and run.status().get("checkpoint_step"):
        warn(f"{ckpt_dir}: no checkpoint (status.json recorded one at step {run.status()['checkpoint_step']}); "
             "the stage starts again from step 0")
    if meta is not None:
        if meta.get("world", 1) != world:  # the data order and batch size depend on it
            raise TrainingError(
                f"{ckpt_dir}: this stage was trained on {meta.get('world', 1)} process(es), and is resumed on "
                f"{world}; each global batch would hold other rows\n  fix: resume with the same launch, e.g. "
                f"`mlx.launch -n {meta.get('world', 1)} -- localtune run --resume RUN` (or plain `localtune run "
                "--resume RUN` for 1)")
        start = meta["step"]
        report(run.log(stage, start, "event", event="resumed", message=f"resumed from checkpoint at step {start}"))
    if args.grad_checkpoint:
        checkpoint_layers(model)

    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    def micro(batch):
        (loss, ntoks, metrics), grads = value_and_grad(model, batch)
        return loss, ntoks, metrics, grads

    def apply(grads):
        grad_norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
        if args.grad_clip > 0:
            scale = mx.minimum(1.0, args.grad_clip / (grad_norm + 1e-6))
            grads = tree_map(lambda g: g * scale, grads)
        optimizer.update(model, grads)
        return grad_norm

    if args.compile:
        # Compiling the forward/backward over CPU-dequantized layers holds ~15% more peak memory
        # (SmolLM2 QLoRA: 0.45 vs 0.40 GiB) for ~12% more speed: the device policy decides.
        dequantizing = any(isinstance(m, CPU_DEQUANTIZED) for _, m in model.named_modules())
        if device.policy().compile_qlora_step or not dequantizing:
            micro = mx.compile(micro, inputs=state, outputs=state)
        apply = mx.compile(apply, inputs=state, outputs=state)

    if guard is not None:
        model.eval()
        guard.start(model, start)
    model.train()
    window = _Window()
    summary = {"step": start}
    t_stage = time.perf_counter()
    mx.reset_peak_memory()  # the stage's own peak: not model loading, or generation before it
    control = _Control(run)
    request = control.poll()
    with _StopRequest() as stop:
        for step in range(start + 1, args.steps + 1):
            _wait_while_paused(control, stop, run, stage, step - 1, args.steps, request, report)
            tic = time.perf_counter()
            mx.random.seed(args.seed * 1_000_003 + step)  # dropout noise is a function of the step
            micro_batches = [next(batches) for _ in range(args.grad_accum)]
            local = [sum(b.weight for b in micro_batches), sum(b.n_tokens for b in micro_batches),
                     sum(b.n_real_tokens for b in micro_batches), sum(b.pairs for b in micro_batches)]
            counts = distributed.all_sum(local) if world > 1 else local
            total = counts[0] or 1
            grads, loss_sum, metric_sums = None, 0.0, {}
            for b in micro_batches:  # token- (or pair-) weighted: accumulation (and ranks) equal one large batch
                weight = b.weight / total
                loss, ntoks, metrics, g = micro(to_mx(b))
                if args.grad_accum > 1 or world > 1:  # no extra gradient copy in the common case
                    g = tree_map(lambda x: x * weight, g)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                loss_sum = loss_sum + loss * weight
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + v * weight
                if args.grad_accum > 1:  # one micro-batch's graph at a time: accumulation bounds the peak
                    mx.eval(grads, loss_sum, metric_sums)
            if world > 1:
                grads = distributed.sum_gradients(grads)
            grad_norm = apply(grads)
            mx.eval(state, loss_sum, grad_norm, metric_sums)
            loss_value, norm_value = loss_sum.item(), grad_norm.item()
            metric_values = {k: v.item() for k, v in metric_sums.items()}
            if world > 1:  # every rank's share of the loss and metrics, summed
                reduced = distributed.all_sum([loss_value, *metric_values.values()])
                loss_value, metric_values = reduced[0], dict(zip(metric_values, reduced[1:]))
            if not math.isfinite(loss_value) or not math.isfinite(norm_value):
                raise TrainingError(
                    f"stage {stage}, step {step}: the loss became {loss_value} (gradient norm "
                    f"{norm_value}); stopped without saving this step. The last good checkpoint "
                    f"(step {checkpoint.step_of(ckpt_dir)}) is kept in {ckpt_dir}.\n"
                    "  fix: lower learning_rate, set grad_clip, or check the data for empty targets; "
                    "then `localtune run --resume RUN`")
            window.add(loss_value, counts[1:], time.perf_counter() - tic, metric_values)

            if step % args.report_every == 0 or step == args.steps:
                record = {**window.record(args.steps - step), "lr": float(optimizer.learning_rate.item()),
                          "grad_norm": norm_value, "peak_memory_gb": device.peak_memory() / 2**30,
                          "steps_total": args.steps}
                if hasattr(batches, "metrics"):
                    record.update(batches.metrics())
                report(run.log(stage, step, "train", **record))
                run.set_status(state="running", stage=stage, step=step, steps_total=args.steps)
                summary.update(record)
                window = _Window()

            if eval_fn is not None and args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                model.eval()
                result = eval_fn(model)
                model.train()
                if "loss" in result:
                    summary["eval_loss"] = result["loss"]
                summary.update({f"eval_{k}": v for k, v in result.items() if k != "loss"})
                report(run.log(stage, step, "eval", **result, steps_total=args.steps))

            if guard is not None and (step % guard.every == 0 or step == args.steps):
                model.eval()
                result = guard.check(model, step)
                model.train()
                report(run.log(stage, step, "guard", **result, steps_total=args.steps))
                if guard.stop:
                    summary["stopped_at"] = step
                    report(run.log(stage, step, "event", event="warning", message=(
                        f"forgetting guard: general NLL {result['general_nll']:.4f} is "
                        f"{result['general_nll_increase']:+.1%} over the base (budget {guard.budget:.0%}); "
                        "stopping the stage")))
                    break

            last = step == args.steps
            request = control.poll()  # read once per step; a pause waits for the next one
            asked = request.get("checkpoint")
            if step % args.save_every == 0 or last or stop.requested or asked:
                checkpoint.save(ckpt_dir, model, optimizer, step, batches,
                                {"seed": args.seed, "world": world, "fingerprint": fingerprint})
                save(model, stage_dir, adapter_config)
                run.set_status(state="running", stage=stage, step=step, steps_total=args.steps, checkpoint_step=step)
                if not last:
                    why = " (asked for)" if asked else ""
                    report(run.log(stage, step, "event", event="checkpoint", path=str(ckpt_dir),
                                   message=f"checkpoint at step {step}{why}"))
            summary["step"] = step
            if stop.requested and not last:
                raise Interrupted(step)
    summary["train_time_sec"] = time.perf_counter() - t_stage
    if guard is not None:
        kept = guard.restore(model)
        if kept is not None:  # the stage's adapters are the kept checkpoint's
            save(model, stage_dir, adapter_config)
            report(run.log(stage, summary["step"], "event", event="info", message=(
                f"forgetting guard ({guard.action}): kept the weights of step {kept['step']} "
                f"(general NLL {kept['general_nll']:.4f}"
                + (f", task {kept['task']:.1%}" if kept.get("task") is not None else "") + ")")))
        summary["forgetting"] = guard.summary()
    return summary


def evaluate_loss(model, loss_fn, batches) -> dict:
    """{"loss", and each metric of the loss}: weighted means over fixed validation batches."""
    sums, n = {}, 0.0
    for b in batches:
        loss, ntoks, metrics = loss_fn(model, to_mx(b))
        mx.eval(loss, ntoks, metrics)
        w = ntoks.item()
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + v.item() * w
        n += w
    return {k: v / max(n, 1) for k, v in sums.items()}
