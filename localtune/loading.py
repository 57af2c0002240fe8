"""A run directory (or one of its stages) as a model: the chain of stages whose weights make it,
its base, and loading it with each finished stage's adapters. Export, the TUI, the CLI and the
planner read runs through here; the training side (train/pipeline.py) is not imported.

Targets: RUN, RUN/stage or a model reference (a folder, repo id, .gguf, pkg:), parsed once by `parse_target`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import methods
from .errors import LocaltuneError, ModelError, RecipeError
from .recipe import Recipe
from .run import LIVE_STATES, Run, effective_state, is_run_dir, trainer_of


@dataclass(frozen=True)
class Target:
    """What a command was pointed at: a run (`stage` None: all of it), one stage of a run, or a model."""

    text: str
    run: Path | None = None
    stage: str | None = None


def parse_target(text: str | Path) -> Target:
    """RUN, RUN/stage, or a model reference."""
    path = Path(text)
    if is_run_dir(path):
        return Target(str(text), path)
    if path.name and is_run_dir(path.parent):
        return Target(str(text), path.parent, path.name)
    return Target(str(text))


def folder_of(recipe: Recipe, ref: str, what: str) -> Path:
    """A model folder for a reference in the recipe: a folder, .gguf, repo id, or a run directory."""
    from . import models

    path = Path(recipe.resolve(ref))
    if is_run_dir(path):  # a run: its model's folder
        parsed, stages = chain(path)
        if (start := starting_model(stages)) is not None:
            return folder_of(parsed, start, "student")
        return model_folder(path)
    try:
        return models.resolve(str(path) if path.exists() else ref)
    except ModelError as e:
        raise ModelError(f"{recipe.source}: {what} = {ref!r} cannot be loaded: {e.message}") from None


def model_folder(run_path: str | Path) -> Path:
    """The base model folder a run trained on, from its manifest."""
    folder = Run.open(run_path).manifest().get("model", {}).get("folder")
    if not folder:
        raise LocaltuneError(f"{run_path}: the run has not loaded its model yet (manifest.json names no model "
                             f"folder)\n  fix: wait for it to start (`localtune watch {run_path}`), or start it "
                             f"with `localtune run --resume {run_path}`")
    return Path(folder)


def require_finished(recipe: Recipe, run: Path, stage: str | None, key: str) -> None:
    """Another run used by this one (a teacher, a reward model) must have finished: its model up to
    `stage` (None: all of it), not a checkpoint that still changes or a prefix of its stages."""
    try:
        _, _, left = finished_chain(run, stage)
    except LocaltuneError as e:
        raise RecipeError(f"{recipe.source}: {key}: {e.message}") from None
    if left:
        raise RecipeError(f"{recipe.source}: {key}: {not_finished(run, left[0], [])}")


def load_teacher(recipe: Recipe, ref: str, what: str):
    """(model, tokenizer) of a teacher: a model reference, or a run directory (base + adapters)."""
    from . import models

    path = Path(recipe.resolve(ref))
    if is_run_dir(path):
        return load_for_inference(str(path))
    folder = folder_of(recipe, ref, what)
    model, _ = models.load_model(folder)
    return model, models.load_tokenizer(folder)


def chain(target: str | Path, until_stage: str | None = None):
    """(parsed recipe, the stages whose weights make the run's model, up to `until_stage`). A distill
    stage with a `student` starts the chain again from that student. Reward stages are branches:
    left out, unless `until_stage` names one (then it comes last, on the chain before it)."""
    path = Path(target)
    parsed = Run.open(path).recipe()
    names = [s.name for s in parsed.stages]
    if until_stage and until_stage not in names:
        raise LocaltuneError(f"{target}: no stage {until_stage!r}; stages are {names}")
    stages = parsed.stages[: names.index(until_stage) + 1] if until_stage else parsed.stages
    stages = [s for s in stages if not methods.of(s).branch or s.name == until_stage]
    start = max((i for i, s in enumerate(stages) if methods.of(s).starts_from(s)), default=0)
    return parsed, stages[start:]


def starting_model(stages: list) -> str | None:
    """The model reference the chain starts from when its first stage names one (a distill
    student, see `chain`); None: the recipe's base."""
    return methods.of(stages[0]).starts_from(stages[0]) if stages else None


def chain_base(parsed: Recipe, stages: list) -> tuple:
    """(model, tokenizer, folder) the chain starts from: the recipe's base (with the recipe's chat
    template, when it sets one), or a distill student."""
    from . import models

    if (start := starting_model(stages)) is not None:
        folder = folder_of(parsed, start, f"[stages.{stages[0].name}] student")
        model, _ = models.load_model(folder)
        return model, models.load_tokenizer(folder), folder
    model, tokenizer, _, folder = models.load(parsed.resolve(parsed.model.path), parsed.model.revision,
                                              parsed.model.quantize, parsed.chat_template())
    return model, tokenizer, folder


def finished_chain(target: str | Path, until_stage: str | None = None):
    """`chain`, cut at the first stage that has not finished (manifest.json "stages_done"): a stage in
    progress rewrites its adapters.safetensors at every checkpoint, so fuse, export, generate and eval
    read finished stages only. Naming an unfinished stage, or a run whose model has no finished stage
    yet, is an error. Returns (parsed recipe, the finished stages, names of the stages left out)."""
    parsed, stages = chain(target, until_stage)
    done = set(Run.open(target).manifest().get("stages_done", []))
    n = next((i for i, s in enumerate(stages) if s.name not in done), len(stages))
    if n < len(stages) and (until_stage or n == 0):
        raise LocaltuneError(not_finished(Path(target), stages[n].name, [s.name for s in stages[:n]]))
    return parsed, stages[:n], [s.name for s in stages[n:]]


def not_finished(run: Path, name: str, finished: list[str]) -> str:
    """Why stage `name` of `run` cannot be read yet, and what to do."""
    status = Run.open(run).status()
    state, current = effective_state(status, run), status.get("stage")
    if state in LIVE_STATES:
        who = trainer_of(run, status) or {}
        by = f"pid {who.get('pid') or status.get('pid')} on {who.get('host') or '?'}"
        why = (f"it is still training (step {status.get('step', 0)}/{status.get('steps_total') or '?'}, {by})"
               if current == name else f"it has not started (the run is training {current!r}, {by})")
        fix = f"wait for it to finish (`localtune watch {run}`)"
    else:
        why = f"it stopped at step {status.get('step', 0)} ({state})" if current == name else "it has not started"
        fix = f"`localtune run --resume {run}` trains it to the end"
    other = f", or name a finished stage: {run / finished[-1]}" if finished else ""
    return (f"{run}: stage {name!r} has not finished: {why}. Until it does, its adapters are a checkpoint "
            f"that changes as it trains, so they are not read.\n  fix: {fix}{other}")


def load_for_inference(target: str, until_stage: str | None = None, in_progress: bool = False):
    """A run directory (base + each finished stage's adapters, in order; see `finished_chain`) or a
    plain model reference. `in_progress` also takes the adapters an unfinished stage saved at its
    last checkpoint: the TUI's preview while a run trains."""
    from . import models

    path = Path(target)
    if not is_run_dir(path):
        model, tokenizer, _, _ = models.load(target)
        return model, tokenizer
    parsed, stages = chain(path, until_stage) if in_progress else finished_chain(path, until_stage)[:2]
    model, tokenizer, _ = chain_base(parsed, stages)
    apply_stages(model, path, stages, in_progress)
    return model, tokenizer


def apply_stages(model, run: Path, stages: list, in_progress: bool = False) -> None:
    """Each stage's saved weights on `model` (the chain's base), in order: LoRA / DoRA adapters, or a
    full fine-tune's weights. `in_progress` stops at the first stage that has saved nothing yet."""
    from .train import adapters

    for i, stage in enumerate(stages):
        if in_progress and not (run / stage.name / "adapters.safetensors").exists():
            break  # a stage that has not saved yet (a finished stage's missing file is an error, below)
        if i:
            adapters.next_stage(model)  # earlier stages become part of the model (fused or stacked)
        methods.of(stage).load_heads(model)
        adapters.load(model, run / stage.name)


def load_before_last(run: Path, stages: list):
    """The model as the last of `stages` (a chain of `run`, see `chain`) found it: the chain's base
    with the earlier stages applied. `chat --compare` loads it beside a full fine-tune, which has no
    adapters to switch off. Returns (model, tokenizer)."""
    model, tokenizer, _ = chain_base(Run.open(run).recipe(), stages)
    apply_stages(model, run, stages[:-1])
    return model, tokenizer


def load(t: Target, in_progress: bool = False):
    """(model, tokenizer) of a parsed target: RUN, RUN/stage (its chain up to that stage), or a model."""
    return load_for_inference(str(t.run) if t.run else t.text, t.stage, in_progress)
