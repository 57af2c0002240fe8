"""Before the first step: each stage's peak memory and time, against the device's limit.

Memory is summed from parts: the base weights at their dtype or quantization, the
adapters, their gradients and optimizer state, and the activations of the widest
micro-batch of the stage's own data (rows x padded width), plus what a method
keeps beside them (teacher cache, rollout KV cache and fp32 sampling copy).

Without calibration the activations come from a per-token formula and the step
time from the stage's FLOPs at the measured matmul speed. With calibration a few
real steps run on the widest rows, at half and all of the batch when the formula
says it fits with room (under 80% of the limit): the peak is measured, the time
fitted as a line in the rows. Nearer the limit they run at 1/4 and 1/2 only, and
the formula's growth to the full batch is added. A PPO stage runs two whole
rollout batches (only under 60% of the limit) and takes the second one's time.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np
from mlx.utils import tree_flatten

from .. import device, methods, models
from ..errors import LocaltuneError
from ..recipe import Recipe, Stage
from ..train import adapters, data, distributed

GiB = 2**30
OPTIMIZER_SLOTS = {"adam": 2, "adamw": 2, "sgd": 0}  # fp32 copies of each trainable weight


class DoesNotFit(LocaltuneError):
    exit_code = 4


@dataclass
class StagePlan:
    name: str
    kind: str
    rows: int  # rows of the widest micro-batch (pairs count 2)
    width: int  # its padded length in tokens
    steps: int
    scored: int = 0  # its positions that reach the vocabulary head
    parts: dict = field(default_factory=dict)  # bytes: weights, adapters, gradients, optimizer, activations, ...
    peak: int = 0
    worst_case_peak: int = 0  # every row at max_seq_len
    step_sec: float | None = None
    stage_sec: float | None = None
    how: str = "formula"
    notes: list = field(default_factory=list)
    suggestions: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Shapes --------------------------------------------------------------------


def example_length(example) -> int:
    if hasattr(example, "tokens"):
        return len(example.tokens)
    return max(len(example.chosen.tokens), len(example.rejected.tokens))  # a preference pair


def pad(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


def micro_shapes(stage: Stage, dataset) -> list[tuple[int, int, int]]:
    """(rows, padded width, scored tokens) of each micro-batch of one epoch on this rank. A DPO batch
    whose pairs share their prompt runs it once: its width is the token count over its 2B rows."""
    method = methods.of(stage)
    if (shapes := method.plan_shapes(stage, dataset)) is not None:
        return shapes
    batches = data.Batches(dataset, stage.batch_size, stage.seed or 0, stage.group_by_length, stage.packing,
                           stage.max_seq_len, shard=distributed.shard())
    out = []
    for item in batches.plan(0):
        if stage.packing:
            out.append((len(item), stage.max_seq_len, sum(int(e.loss_mask.sum()) for b in item for e in b)))
            continue
        examples = [dataset.examples[i] for i in item]
        width = pad(max(example_length(e) for e in examples) - 1)
        if not method.pairs:
            out.append((len(examples), width, sum(int(e.loss_mask.sum()) for e in examples)))
            continue
        rows = [x for e in examples for x in (e.chosen, e.rejected)]
        scored = sum(int(x.loss_mask.sum()) for x in rows) if method.lm_head else 0
        starts = [int(np.argmax(e.chosen.loss_mask)) for e in examples]
        if method.shared_prompts and all(n > 0 and np.array_equal(e.chosen.tokens[:n], e.rejected.tokens[:n])
                                       for e, n in zip(examples, starts)):
            response = pad(max(len(x.tokens) - n for x, n in zip(rows, [n for n in starts for _ in (0, 1)])))
            width = pad(-(-(len(examples) * pad(max(starts)) + len(rows) * response) // len(rows)))
        out.append((len(rows), width, scored))
    return out


# The formula ---------------------------------------------------------------


def dims(model) -> dict:
    args = (model.language_model if "language_model" in model else model).args  # Qwen3.5 nests its text model
    h = args.hidden_size
    heads = args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or h // heads
    kv = getattr(args, "num_key_value_heads", heads) * head_dim
    return {"h": h, "i": _intermediate(args, h, "num_experts_per_tok"),
            "i_total": _intermediate(args, h, "num_experts"),
            "layers": len(model.layers), "heads": heads, "kv": kv, "vocab": args.vocab_size,
            "attention": _attention_layers(args, len(model.layers)), "state": _linear_state(args)}


def _linear_state(args) -> int:
    """Values a linear-attention layer keeps per sequence instead of a KV cache (gated DeltaNet:
    a key x value matrix per value head, and the last conv_kernel - 1 inputs of its conv)."""
    heads, k, v = (getattr(args, f"linear_{n}", 0) or 0 for n in ("num_value_heads", "key_head_dim", "value_head_dim"))
    if not heads:
        return 0
    conv = (getattr(args, "linear_conv_kernel_dim", 4) - 1) * (2 * getattr(args, "linear_num_key_heads", heads) * k
                                                                + heads * v)
    return heads * k * v + conv


def _intermediate(args, h: int, experts: str) -> int:
    """The MLP width: a MoE token runs its top-k experts ("num_experts_per_tok", plus any shared
    expert), so time and activations follow those; the weights hold all ("num_experts")."""
    n, expert = getattr(args, experts, None), getattr(args, "moe_intermediate_size", None)
    if n and expert:
        return n * expert + (getattr(args, "shared_expert_intermediate_size", 0) or 0)
    return getattr(args, "intermediate_size", 4 * h)


def _attention_layers(args, layers: int) -> list:
    """Per layer, how many past positions its KV cache holds: None (all), a window size, or 0
    for a linear-attention layer (a fixed-size state instead)."""
    window = getattr(args, "sliding_window", None)
    kinds = getattr(args, "layer_types", None)
    if kinds:
        return [0 if k == "linear_attention" else window if k == "sliding_attention" else None for k in kinds]
    interval = getattr(args, "full_attention_interval", None)
    if interval:  # Qwen3.5 / Qwen3-Next: every interval-th layer attends, the others are linear
        return [None if (i + 1) % interval == 0 else 0 for i in range(layers)]
    pattern = getattr(args, "sliding_window_pattern", None)
    if window and pattern:  # Gemma 3: every pattern-th layer is global
        return [None if (i + 1) % pattern == 0 else window for i in range(layers)]
    return [None] * layers


def kv_positions(d: dict, width: int) -> int:
    """Cached positions summed over layers for sequences of `width` tokens (sliding windows cap theirs)."""
    return sum(width if w is None else min(width, w) for w in d["attention"])


def rollout_cache_bytes(d: dict, rows: int, width: int, dtype_bytes: int) -> int:
    """Generation's cache for `rows` sequences of `width` tokens: keys and values where a layer
    attends, the fixed recurrent state where it is linear."""
    linear = sum(1 for w in d["attention"] if w == 0)
    return (2 * kv_positions(d, width) * d["kv"] + linear * d["state"]) * rows * dtype_bytes


def block_params(d: dict, mlp: str = "i") -> int:
    """Weights of the transformer blocks, unpacked: q, o (h x h), k, v (h x kv), gate, up, down (h x i);
    "i" the MLP a token runs through (a MoE's active experts), "i_total" every expert."""
    return d["layers"] * (2 * d["h"] * d["h"] + 2 * d["h"] * d["kv"] + 3 * d["h"] * d[mlp])


def activation_bytes(d: dict, stage: Stage, rows: int, width: int, adapted_layers: int, dtype_bytes: int,
                     scored: int) -> int:
    """What the backward pass keeps for one micro-batch: per adapted block, its inputs and the
    attention/MLP intermediates (or only the block input with gradient checkpointing), and the
    output head's fp32 logits for the `scored` positions: whole below logprobs.BLOCKWISE_FROM
    logits, else a few vocabulary blocks (none for a reward head)."""
    from ..methods.logprobs import BLOCKWISE_FROM, LOGITS_BLOCK

    t = rows * width
    per_token = 10 * d["h"] + 4 * d["kv"] + 5 * d["i"]
    attention = 2 * d["heads"] * width  # scores and probabilities per token
    block = t * (per_token + attention) * dtype_bytes
    if stage.grad_checkpoint:
        kept = adapted_layers * t * d["h"] * dtype_bytes + block
    else:
        kept = adapted_layers * block
    k = t if scored > t // 2 else max(64, pad(scored, 64))  # only scored positions reach the head
    logits = k * d["vocab"]
    head = 3 * 4 * (logits if logits < BLOCKWISE_FROM else 2 * LOGITS_BLOCK) + 2 * k * d["h"] * 4
    return int(kept + (head if methods.of(stage).lm_head else 0))


def adapted_blocks(stage: Stage, d: dict) -> int:
    """Blocks the backward pass goes through: the adapted ones (LoRA on the last `layers`)."""
    return min(stage.adapter.layers if stage.adapter.layers > 0 else d["layers"], d["layers"])


def nbytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree))


def plan_stage(model, stage: Stage, dataset, steps: int, extra: dict | None = None) -> StagePlan:
    """The formula estimate for one stage; `model` carries this stage's adapters (not evaluated)."""
    d = dims(model)
    shapes = micro_shapes(stage, dataset)
    rows, width, scored = max(shapes, key=lambda s: (s[0] * s[1], s[1], s[2]))
    trainable = nbytes(model.trainable_parameters())
    frozen = nbytes(model.parameters()) - trainable
    adapted, dtype_bytes = adapted_blocks(stage, d), device.policy().dtype_bytes
    p = StagePlan(stage.name, stage.kind, rows, width, steps, scored=scored)
    p.parts = {"weights": frozen, "adapters": trainable, "gradients": trainable * (1 + (stage.grad_accum > 1)),
               "optimizer": trainable * OPTIMIZER_SLOTS[stage.optimizer],
               "activations": activation_bytes(d, stage, rows, width, adapted, dtype_bytes, scored), **(extra or {})}
    static = sum(v for k, v in p.parts.items() if k != "activations" and not k.startswith("phase:"))
    p.peak = static + p.parts["activations"]
    method = methods.of(stage)
    worst_rows = rows if method.samples else (2 if method.pairs else 1) * stage.batch_size
    p.worst_case_peak = static + activation_bytes(d, stage, worst_rows, pad(stage.max_seq_len), adapted,
                                                  dtype_bytes, worst_rows * stage.max_seq_len)
    for k, v in (extra or {}).items():  # a phase beside training (rollouts, the teacher) may be the peak
        if k.startswith("phase:"):
            p.peak, p.worst_case_peak = max(p.peak, frozen + v), max(p.worst_case_peak, frozen + v)
    flops = step_flops(model, d, stage, shapes)
    p.step_sec = flops / (gflops() * 1e9)
    p.stage_sec = p.step_sec * steps
    return p


@functools.lru_cache(maxsize=1)
def gflops() -> float:
    """This device's fp32 matmul speed, measured once per process."""
    return device.matmul_gflops(512, 3)


def step_flops(model, d: dict, stage: Stage, shapes) -> float:
    """Forward + backward (inputs only: the base is frozen) = 4 x params x tokens, plus attention,
    averaged over the epoch's micro-batches, times grad_accum (PPO: plus sampling and scoring)."""
    params = block_params(d)
    tokens = sum(r * w for r, w, _ in shapes) / len(shapes)
    mean_width = sum(w for _, w, _ in shapes) / len(shapes)
    per_token = 4 * params + 4 * d["layers"] * d["h"] * mean_width + 4 * d["h"] * d["vocab"]
    flops = per_token * tokens * stage.grad_accum
    return flops + methods.of(stage).plan_step_flops(stage, params, mean_width)


# The whole recipe ----------------------------------------------------------


def plan(recipe: Recipe, prepared, calibrate_steps: bool = True, note=lambda m: None) -> list[StagePlan]:
    """Every stage's plan, on the recipe's base (a distill student from its stage on). Calibration
    loads the weights; the formula alone reads only their shapes."""
    from ..loading import folder_of
    from .calibrate import calibrate

    limit = device.memory_limit_bytes()
    model, _ = models.load_model(prepared.folder, recipe.model.quantize, lazy=not calibrate_steps)
    plans = []
    for stage in recipe.stages:
        method = methods.of(stage)
        if start := method.starts_from(stage):  # the chain starts again from this model
            model, _ = models.load_model(folder_of(recipe, start, f"[stages.{stage.name}] student"),
                                         lazy=not calibrate_steps)
        dataset = method.plan_dataset(stage, prepared.train[stage.name], prepared.tokenizer, note)
        steps = method.steps(stage, data.Batches(dataset, stage.batch_size, stage.seed or 0, stage.group_by_length,
                                                stage.packing, stage.max_seq_len, shard=distributed.shard()))
        p = plan_with_adapters(model, recipe, stage, dataset, steps)
        if calibrate_steps and p.peak < 0.9 * limit:
            note(f"{stage.name}: calibrating ({p.kind}) ...")
            calibrate(model, prepared.tokenizer, stage, dataset, p, limit, recipe)
        elif calibrate_steps:
            p.notes.append("not calibrated: the formula's estimate is already over 90% of the limit")
        p.suggestions = suggestions(model, recipe, stage, dataset, steps, p, limit) if p.peak > limit else []
        plans.append(p)
    return plans


def plan_with_adapters(model, recipe: Recipe, stage: Stage, dataset, steps: int, **changes) -> StagePlan:
    """plan_stage with this stage's adapters on (lazy: nothing is computed) and taken off after."""
    stage = dataclasses.replace(stage, **changes) if changes else stage
    adapters.attach(model, stage.adapter, "adapter")
    try:
        extras = methods.of(stage).plan_extras(model, stage, dataset, dims(model), device.policy().dtype_bytes)
        return plan_stage(model, stage, dataset, steps, extras)
    finally:
        adapters.detach(model)


# Suggestions ---------------------------------------------------------------


def suggestions(model, recipe: Recipe, stage: Stage, dataset, steps: int, p: StagePlan, limit: int) -> list:
    """Concrete changes, each with its own estimate (the formula): [{"change", "peak", "fits"}]."""
    out = []
    key = f"[stages.{stage.name}]"

    def add(change: str, peak: int):
        if peak < p.peak:
            out.append({"change": change, "peak": int(peak), "fits": peak <= limit})

    if recipe.model.quantize is None and not models.is_quantized(model):
        weights = p.parts["weights"]
        add("[model] quantize = { bits = 4 } (QLoRA: a 4-bit base)", p.peak - weights + weights * 5 // 32)
    if not stage.grad_checkpoint:
        add(f"{key} grad_checkpoint = true", plan_with_adapters(model, recipe, stage, dataset, steps,
                                                                 grad_checkpoint=True).peak)
    if stage.batch_size > 1:
        half = stage.batch_size // 2
        add(f"{key} batch_size = {half}, grad_accum = {stage.grad_accum * 2} (the same batch per step)",
            plan_with_adapters(model, recipe, stage, dataset, steps, batch_size=half,
                                grad_accum=stage.grad_accum * 2).peak)
    if p.width > 64 and not methods.of(stage).samples:  # sampled responses: their length is max_new_tokens
        shorter = max(64, p.width // 2)
        over = sum(example_length(e) > shorter for e in dataset.examples)
        add(f"{key} max_seq_len = {shorter} ({over} of {len(dataset.examples)} examples would be truncated)",
            p.peak - p.parts["activations"] // 2)
    layers = dims(model)["layers"]
    adapted = stage.adapter.layers if stage.adapter.layers > 0 else layers
    if adapted > 1:
        fewer = max(1, adapted // 2)
        add(f"[stages.{stage.name}.adapter] layers = {fewer} (LoRA on the last {fewer} of {layers} blocks)",
            plan_with_adapters(model, recipe, stage, dataset, steps,
                                adapter=dataclasses.replace(stage.adapter, layers=fewer)).peak)
    return out


# Output --------------------------------------------------------------------


def gib(n: float) -> str:
    """Bytes for people: MiB below 0.1 GiB, so small parts do not read as 0.00."""
    return f"{n / 2**20:.1f} MiB" if n < 0.1 * GiB else f"{n / GiB:.2f} GiB"


def duration(sec: float | None) -> str:
    if sec is None:
        return "?"
    sec = int(round(sec))
    return f"{sec // 3600}:{sec // 60 % 60:02d}:{sec % 60:02d}" if sec >= 60 else f"{sec}s" if sec else "<1s"


def lines(plans: list[StagePlan], limit: int) -> list[str]:
    out = [f"memory limit: {gib(limit)} ({'Metal recommended working set' if device.is_gpu() else 'physical memory'})"]
    for p in plans:
        fits = "fits" if p.peak <= limit else "DOES NOT FIT"
        out.append(f"\n[stages.{p.name}] {p.kind}: peak {gib(p.peak)} of {gib(limit)} ({p.peak / limit:.0%}), {fits}")
        out.append(f"  widest micro-batch: {p.rows} rows x {p.width} tokens; every row at max_seq_len: "
                   f"{gib(p.worst_case_peak)}")
        out.append("  " + " · ".join(f"{k.replace('phase:', 'during ')} {gib(v)}" for k, v in p.parts.items()))
        out.append(f"  time: {p.step_sec:.3g} s/step x {p.steps} steps = {duration(p.stage_sec)} ({p.how})")
        out += [f"  note: {n}" for n in p.notes]
        for s in p.suggestions:
            out.append(f"  try: {s['change']} -> peak {gib(s['peak'])}{' (fits)' if s['fits'] else ''}")
    return out


def refusal(plans: list[StagePlan], limit: int, source: str) -> str | None:
    """The error for a recipe that will not fit, or None."""
    over = [p for p in plans if p.peak > limit]
    if not over:
        return None
    text = [f"{source}: this recipe will not fit in memory ({gib(limit)}, "
            f"{'Metal recommended working set' if device.is_gpu() else 'physical memory'})"]
    for p in over:
        text.append(f"  [stages.{p.name}] needs about {gib(p.peak)}: " +
                    ", ".join(f"{k.replace('phase:', 'during ')} {gib(v)}" for k, v in p.parts.items()
                              if v >= 0.01 * p.peak))
        text += [f"  fix: {s['change']} -> about {gib(s['peak'])}{' (fits)' if s['fits'] else ''}"
                 for s in p.suggestions]
    text.append("  `localtune plan RECIPE` shows every stage; `--force` runs anyway")
    return "\n".join(text)
