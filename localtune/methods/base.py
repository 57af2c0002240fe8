"""What a training method is: a small object with optional hooks, called by the stage loop
(train/pipeline.py), the recipe parser, the planner and the report. The defaults suit a method
that trains on rows of text with its own loss (sft.py is nothing more), so a method implements
only what it changes. None of the shared code asks which method it runs.

    options                          its recipe keys (a dataclass)   validate(stage, before, fail)  recipe checks
    check(recipe, stage, tok, dir)   gate-time checks                encode(stage, rows, fmt, ...)  rows -> examples
    before(ctx)                      teacher cache, answers          heads(model)                   trainable heads
    setup(ctx) -> (loss, batches, valid)                             evaluator, heldout(ctx, model) numbers around it
    after(ctx, summary)              detach heads, results           report(stage, result, run)     report.md section
    metrics, steps_per_batch, starts_from, references, plan_*        (the planner's shapes, extras and timings)
    init_for, init_lr_factor, init_lines(draft)                      what `localtune init` writes for a stage

The one registry is methods/__init__.py; recipe.py reaches validate through it.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

TEXT_FORMATS = ("messages", "completion", "text")


@dataclasses.dataclass
class StageContext:
    """One stage as it runs: what the hooks read, and may replace (a distill student swaps `model`)."""

    recipe: Any
    stage: Any
    model: Any
    tokenizer: Any
    train: Any  # the encoded training set (a method's `encode` result)
    valid: Any
    stage_dir: Path
    batches: Any = None  # data.Batches over `train`, built by the loop (None before `before` ran)
    evaluate: Callable | None = None  # the loop's periodic evaluation (`Method.evaluator`)
    run: Any = None  # run.Run (the planner's calibration gets a scratch run)
    planning: bool = False  # the planner times a few steps: no earlier stage exists yet
    steps: int = 0
    eval_rows: list | None = None  # the golden set, when the recipe has one
    task: dict = dataclasses.field(default_factory=dict)  # the run's task-metric record (manifest "task")
    log_task: Callable | None = None  # (when, result) -> logs a task metric like the pipeline does
    report: Callable = print
    state: dict = dataclasses.field(default_factory=dict)  # a method's own, between its hooks

    def note(self, message: str, warning: bool = False) -> None:
        if self.run is None:
            return
        name = self.stage.name
        self.report(self.run.warn(name, 0, message) if warning else
                    self.run.log(name, 0, "event", event="info", message=message))


class Method:
    """A training method. Subclasses set what differs; every hook has a do-nothing (SFT) default."""

    kind = ""
    options = None  # a frozen dataclass of the recipe keys only this method takes (recipe.option fields)
    formats = TEXT_FORMATS  # the row formats a stage's data may have
    pairs = False  # examples are preference pairs: two rows each in a batch
    shared_prompts = False  # a batch of pairs runs each shared prompt once (the planner's widths)
    lm_head = True  # the loss reads the vocabulary head (a reward model reads its score head instead)
    branch = False  # the stage's adapters come off when it ends; the chain goes on as the stage found it
    scores = False  # a finished stage is a reward model (`localtune score`)
    capability = None  # the support-matrix column (models.families.CAPABILITIES) a stage needs
    samples = False  # samples its own responses: a batch is a rollout batch of prompts
    one_process = None  # why the method is refused under mlx.launch (None: it runs on every rank)
    metrics = ()  # train.metrics.Metric: what the TUI and `status` show for this method
    collate = None  # examples -> data.Batch, when the default does not fit
    init_for = ()  # the canonical data formats `localtune init` makes a stage of this method for
    init_lr_factor = 1.0  # init's learning rate: the size-based one (SFT's) times this

    def init_lines(self, draft) -> list[str]:
        """Stage lines (commented) this method wants in a recipe `localtune init` writes (cli/init.Draft)."""
        return []

    # --- the recipe -------------------------------------------------------------------------
    def validate(self, stage, before: list, fail) -> None:
        """Recipe checks; `before` are the earlier stages. Raise fail(key, message, fix)."""

    def describe(self, stage) -> str:
        """How errors name a stage of this method."""
        return f"a {self.kind} stage"

    def data_formats(self, stage) -> tuple:
        return self.formats

    def data_hint(self, stage) -> str | None:
        """Added to a data file's error when its rows are not one of `formats`."""
        return None

    def starts_from(self, stage) -> str | None:
        """A model reference the chain starts again from (a distill student), or None."""
        return None

    def files(self, stage) -> tuple:
        """Files besides the data whose content the stage depends on (a resume checks them)."""
        return ()

    def references(self, stage) -> dict:
        """{key: model reference} this stage reads besides the chain (teacher, reward model)."""
        return {}

    # --- before any weights load ------------------------------------------------------------
    def encode(self, stage, rows: list, fmt: str, tokenizer, source: str):
        """Rows -> the dataset `setup` batches."""
        from ..train import data

        if fmt == "preference":
            from .pairs import encode_pairs

            return encode_pairs(rows, tokenizer, stage.max_seq_len, source)
        return data.encode(rows, fmt, tokenizer, stage.max_seq_len, stage.mask_prompt, source, stage.thinking)

    def check(self, recipe, stage, tokenizer, folder: Path) -> None:
        """Gate-time checks with the tokenizer loaded (no weights yet)."""

    def steps_per_batch(self, stage) -> int:
        """Optimizer steps each batch of rows gives (PPO: epochs over minibatches of a rollout)."""
        return 1

    def steps(self, stage, batches) -> int:
        if stage.steps:
            return stage.steps
        return max(1, math.ceil(stage.epochs * batches.batches_per_epoch * self.steps_per_batch(stage)
                                / stage.grad_accum))

    # --- the stage --------------------------------------------------------------------------
    def before(self, ctx: StageContext) -> None:
        """Work before training (a teacher's cache or answers); may replace ctx.model / train / valid."""

    def heads(self, model) -> dict:
        """Attach this method's trainable heads; returns adapter_config entries recording them."""
        return {}

    def load_heads(self, model) -> None:
        """Heads a finished stage's saved adapters carry, attached before loading them."""

    def setup(self, ctx: StageContext):
        """(loss, training batches, fixed validation batches or None) for the one loop."""
        from ..train import data

        stage, valid = ctx.stage, ctx.valid
        return self.loss(stage), ctx.batches, \
            data.eval_batches(valid, stage.batch_size, stage.eval_batches, self.collate) if valid else None

    def loss(self, stage):
        """The loss the default `setup` trains with: (model, batch) -> (L, weight, metrics)."""
        raise NotImplementedError(f"the {self.kind} method defines loss(stage) or setup(ctx)")

    def evaluator(self, ctx: StageContext, loss_fn, valid_batches):
        """The loop's periodic evaluation of a model: by default the loss on the fixed validation batches."""
        if not valid_batches:
            return None
        from ..train import trainer

        def evaluate(model):
            return trainer.evaluate_loss(model, loss_fn, valid_batches)

        return evaluate

    def heldout(self, ctx: StageContext, model) -> dict | None:
        """Held-out numbers measured before and after the stage (None: none)."""
        return None

    def heldout_line(self, when: str, result: dict) -> str | None:
        """A log line for `heldout`'s result."""
        return None

    def after(self, ctx: StageContext, summary: dict) -> None:
        """When training ends: detach heads that do not outlive the stage, add results to `summary`."""

    # --- reading a finished run ---------------------------------------------------------------
    def report(self, stage, result: dict, run_path: Path) -> list[str]:
        """report.md lines for this stage's results."""
        return []

    # --- the planner ------------------------------------------------------------------------
    not_calibrated = None  # why the planner does not time this method's steps (None: it does)

    def plan_dataset(self, stage, dataset, tokenizer, note):
        """The dataset the planner sizes batches on (the encoded one, unless `encode` deferred it)."""
        return dataset

    def plan_shapes(self, stage, dataset) -> list | None:
        """(rows, width, scored tokens) of each micro-batch, when a batch is not rows of examples."""
        return None

    def plan_extras(self, model, stage, dataset, dims: dict, dtype_bytes: int) -> dict:
        """Bytes beside the training step; keys "phase:..." are phases that may peak on their own."""
        return {}

    def plan_step_flops(self, stage, params: float, mean_width: float) -> float:
        """Flops per optimizer step beyond forward + backward (PPO: its share of a rollout)."""
        return 0.0

    def plan_calibrate(self, model, stage, rows, folder: Path, examples: int) -> dict:
        """Work beside the steps, timed on the calibration rows: {"extra_step_sec": seconds added to
        each step} or {"before_steps_sec": seconds once, "before_steps": what}; `examples` is the
        whole dataset's size."""
        return {}
