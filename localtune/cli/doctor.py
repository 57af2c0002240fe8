"""`localtune doctor`: the device, and what breaks first runs, each finding with its fix.

Checks: the fast BLAS, free memory against the largest shipped recipe's worst-case plan (the planner's
formula, the number `localtune init` sizes against: weights read lazily, no step run), the Hugging Face
cache and offline mode (the environment and the cache only: no network), and llama-cpp-python for
`export --verify`. Exit 1 when a check is fatal.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import click

from .. import device
from . import cli

RECIPES = Path(__file__).resolve().parent.parent.parent / "recipes"  # the shipped recipes, in a source checkout


def check(name: str, level: str, message: str, fix: str = "") -> dict:
    """level: ok | warn | fatal."""
    return {"check": name, "level": level, "message": message, **({"fix": fix} if fix else {})}


def blas_check() -> dict:
    if sys.platform != "linux" or device.blas_in_use():
        return check("blas", "ok", f"fast BLAS: {device.describe()['blas']}")
    return check("blas", "warn", "reference BLAS in use: training will be about 20x slower", "pip install mkl")


def free_memory_bytes() -> int:
    """Memory available now (Linux: MemAvailable), else the device's limit."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return device.memory_limit_bytes()


def _model_on_disk(ref: str, base: Path) -> int | None:
    """Bytes of a recipe's model, without importing or downloading it: None when it is not local."""
    if ref.startswith("pkg:"):
        package, _, name = ref[4:].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:  # not installed, or a plain module: models
            return None  # refuses it too (a pkg: file lives in a package's folder)
        path = Path(list(spec.submodule_search_locations)[0]) / name
    else:
        path = base / ref
    if path is None or not path.exists():
        return None
    if path.suffix == ".gguf" and not _imported(path):  # importing converts the weights: not for a check
        return None
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _imported(gguf: Path) -> bool:
    from ..models.gguf_import import list_imported

    return any(Path(m.get("source", "")).resolve() == gguf.resolve() for m in list_imported())


def _tokens_per_batch(recipe: dict) -> int:
    """The largest batch_size x max_seq_len of a recipe's stages, as written (defaults: 1 x 2048)."""
    return max((s.get("batch_size", 1) * s.get("max_seq_len", 2048) for s in recipe.get("stages", [])
                if isinstance(s, dict)), default=0)


def largest_plan(recipes_dir: Path = RECIPES):
    """(recipe file, worst-case peak bytes) of the shipped recipe with the largest model on disk (ties: the
    most tokens per batch as written), by the planner's formula: the worst case (every row at max_seq_len)
    `localtune init` sizes against. Planning every candidate would find the largest plan for sure, but
    each prepares its data (1-4 s apiece, about 20 s for the shipped recipes): too slow for a check.
    None without shipped recipes or local models."""
    import tomllib

    from .. import plan, recipe
    from ..train.prepare import prepare

    sized = []
    for f in sorted(recipes_dir.glob("*.toml")):
        try:
            written = tomllib.loads(f.read_text())
            ref = written["model"]["path"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(ref, str) and (size := _model_on_disk(ref, f.parent)) is not None:
            sized.append((size, _tokens_per_batch(written), f.name, f))
    if not sized:
        return None
    f = max(sized)[-1]
    parsed = recipe.load(f)
    plans = plan.plan(parsed, prepare(parsed), calibrate_steps=False)
    return f, max(p.worst_case_peak for p in plans)


def memory_check(recipes_dir: Path = RECIPES) -> dict:
    from .. import plan

    free = free_memory_bytes()
    try:
        found = largest_plan(recipes_dir)
    except click.ClickException as e:  # a shipped recipe that does not prepare here: say so, not fatal
        return check("memory", "warn", f"{plan.gib(free)} free; the largest shipped recipe could not be "
                     f"planned: {e.message.splitlines()[0]}", "`localtune plan RECIPE` shows why")
    if found is None:
        return check("memory", "ok", f"{plan.gib(free)} free (no shipped recipe whose model is a folder or an "
                     "imported .gguf to plan; `localtune plan RECIPE` sizes any recipe)")
    f, peak = found
    name = f"recipes/{f.name}"
    if peak > free:
        return check("memory", "fatal", f"{plan.gib(free)} free, but the largest shipped recipe ({name}) needs "
                     f"up to about {plan.gib(peak)} (every row at max_seq_len)",
                     "close other programs, or use QLoRA and a smaller batch_size "
                     f"(`localtune plan {name}` suggests changes)")
    level = "warn" if peak > 0.8 * free else "ok"
    return check("memory", level, f"{plan.gib(free)} free; the largest shipped recipe ({name}) needs up to "
                 f"about {plan.gib(peak)} ({peak / free:.0%}; every row at max_seq_len)",
                 "close other programs before training" if level == "warn" else "")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def hf_check() -> dict:
    """Where the Hugging Face cache is, its size, and offline mode (no network is touched)."""
    from huggingface_hub import constants

    from .. import plan

    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or constants.HF_HOME) / "hub")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    repos = sorted(p.name for p in cache.glob("*--*")) if cache.is_dir() else []
    where = (f"cache {cache}: {len(repos)} repos, {plan.gib(_dir_bytes(cache))}" if cache.is_dir()
             else f"cache {cache}: not created yet")
    if offline and not repos:
        return check("hf", "warn", f"HF_HUB_OFFLINE=1 and the {where}: a hf: dataset or repo-id model cannot load",
                     "unset HF_HUB_OFFLINE once, where you have network, or use local files and .gguf models")
    return check("hf", "ok", f"{where}; offline mode {'on (HF_HUB_OFFLINE)' if offline else 'off'}")


def llama_cpp_check() -> dict:
    if importlib.util.find_spec("llama_cpp") is not None:
        return check("llama_cpp", "ok", "llama-cpp-python is installed: `export --verify` can load the GGUF back")
    return check("llama_cpp", "warn", "llama-cpp-python is not installed: `export --verify` cannot compare the "
                 "GGUF's logits", "pip install llama-cpp-python")


def checks(recipes_dir: Path = RECIPES) -> list[dict]:
    return [blas_check(), memory_check(recipes_dir), hf_check(), llama_cpp_check()]


@cli.command()
@click.option("--json", "as_json", is_flag=True, help='Print {"device": ..., "checks": [...]} as JSON.')
@click.pass_context
def doctor(ctx, as_json):
    """The device, the BLAS in use, measured matmul GFLOP/s and the memory limit; then what breaks first
    runs (BLAS, free memory, the HF cache and offline mode, llama-cpp-python), each with its fix.
    Exit 1 when a check is fatal."""
    info = device.describe()
    info["matmul_gflops"] = round(device.matmul_gflops(), 1)
    found = checks()
    if as_json:
        click.echo(json.dumps({"device": info, "checks": found}, indent=1))
    else:
        for k, v in info.items():
            click.echo(f"{k:>16}: {v}")
        click.echo("")
        for c in found:
            click.echo(f"{c['level'].upper():>5}  {c['check']}: {c['message']}")
            if c.get("fix"):
                click.echo(f"       fix: {c['fix']}")
    ctx.exit(1 if any(c["level"] == "fatal" for c in found) else 0)
