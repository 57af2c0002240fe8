"""Training throughput with the TUI attached vs --no-tui, on the same recipe, in one run.

    python tests/benchmarks/bench_tui.py [--steps N] [--repeats R] [--screenshot docs/tui.svg]
    python tests/benchmarks/bench_tui.py --screenshot docs/tui.svg --of runs/quickstart-<stamp>   # no timing

The TUI run is real: `localtune run` under a pseudo-terminal (120x36, xterm-256color), its
output read and thrown away as a terminal would draw it. It quits with `q` once the run is done.
Runs alternate (plain, TUI, TUI, plain, ...) so that load from other jobs hits both alike.
Throughput is the median of the train records' useful tokens/s, skipping the first (compilation).

Also times opening a 100k-line metrics.jsonl: RunState.refresh(), and the app's first paint.
Writes tests/benchmarks/results/bench_tui.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import fcntl
import json
import os
import platform
import pty
import re
import select
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results" / "bench_tui.md"
LOCALTUNE = [sys.executable, "-m", "localtune.cli"]


def write_recipe(folder: Path, steps: int, smoke: bool = False) -> Path:
    text = (ROOT / "recipes" / "quickstart.toml").read_text()
    if smoke:  # models/smaller, a 4-row golden set, 8 general-ability texts, reports every step
        text = text.replace('"../models/small"', '"../models/smaller"').replace("limit = 200", "limit = 4\n"
                            "general_limit = 8").replace("report_every = 10", "report_every = 1")
    text = re.sub(r"(?m)^steps = \d+", f"steps = {steps}", text.replace('"../', f'"{ROOT}/'))
    text = text.replace("limit = 200", "limit = 16").replace("eval_every = 50", f"eval_every = {steps}")
    recipe = folder / "recipe.toml"
    recipe.write_text(text)
    return recipe


def newest(runs: Path) -> Path:
    return max(runs.iterdir(), key=lambda p: p.stat().st_mtime)


def throughput(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r["real_tokens_per_sec"] for r in records if r.get("kind") == "train"]
    return statistics.median(train[1:] or train)


def run_plain(recipe: Path, runs: Path) -> tuple[float, float]:
    t = time.perf_counter()
    subprocess.run([*LOCALTUNE, "run", str(recipe), "--runs-dir", str(runs), "--no-tui"], check=True,
                   stdout=subprocess.DEVNULL, cwd=recipe.parent)
    return throughput(newest(runs)), time.perf_counter() - t


def run_tui(recipe: Path, runs: Path) -> tuple[float, float, int]:
    """`localtune run` in a pseudo-terminal; returns tokens/s, seconds and bytes the TUI drew."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 36, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "36"}
    t = time.perf_counter()
    proc = subprocess.Popen([*LOCALTUNE, "run", str(recipe), "--runs-dir", str(runs)], stdin=slave, stdout=slave,
                            stderr=slave, env=env, cwd=recipe.parent, start_new_session=True)
    os.close(slave)
    drawn, quit_sent, run = 0, False, None
    while proc.poll() is None:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                drawn += len(os.read(master, 1 << 16))
            except OSError:
                break
        if run is None and runs.exists() and any(runs.iterdir()):
            run = newest(runs)
        status = json.loads((run / "status.json").read_text() or "{}") if run and (run / "status.json").exists() else {}
        if status.get("state") in ("done", "failed") and not quit_sent:
            time.sleep(1.0)  # let the view show the report, as a user would see it
            os.write(master, b"q")
            quit_sent = True
    proc.wait(timeout=30)
    os.close(master)
    if json.loads((run / "status.json").read_text()).get("state") != "done":
        raise SystemExit(f"the TUI run did not finish: {run / 'train.log'}")
    return throughput(run), time.perf_counter() - t, drawn


def open_times(folder: Path, lines: int = 100_000) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from run_fixtures import make_run

    from localtune.tui.app import LocaltuneApp
    from localtune.tui.state import RunState

    path = make_run(folder, "long", steps=lines, report_every=1, task=False)
    t = time.perf_counter()
    state = RunState(path)
    state.refresh()
    read = time.perf_counter() - t

    async def first_paint():
        app = LocaltuneApp(path, runs_dir=folder, poll_interval=60)
        t = time.perf_counter()
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.pause()
            return time.perf_counter() - t

    return {"lines": sum(1 for _ in open(path / "metrics.jsonl")), "read_sec": read,
            "first_paint_sec": asyncio.run(first_paint())}


def screenshot(run: Path, out: Path) -> None:
    from localtune.tui.app import LocaltuneApp

    async def shoot():
        app = LocaltuneApp(run, runs_dir=run.parent, poll_interval=60)
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.pause()
            app.save_screenshot(filename=out.name, path=str(out.parent))

    out.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(shoot())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--screenshot", default=None, help="save an SVG of the TUI on the last TUI run")
    parser.add_argument("--of", default=None, help="with --screenshot: the SVG of this finished run, and nothing "
                        "else (the README's picture is a whole quickstart run)")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--smoke", action="store_true", help="models/smaller, 2 steps, one repeat, a 1,000-line "
                        "metrics file, nothing written: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.repeats, args.screenshot = 2, 1, None

    import localtune  # noqa: F401  (MKL before mlx)

    if args.of:
        if not args.screenshot:
            parser.error("--of needs --screenshot FILE")
        screenshot(Path(args.of).resolve(), Path(args.screenshot).resolve())
        return
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_tui-"))
    try:
        recipe = write_recipe(work, args.steps, args.smoke)
        plain, tui, drawn = [], [], []
        order = []
        for i in range(args.repeats):
            order += [("plain", "tui") if i % 2 == 0 else ("tui", "plain")]
        for i, pair in enumerate(order):
            for mode in pair:
                runs = work / f"runs-{mode}-{i}"
                if mode == "plain":
                    tok, sec = run_plain(recipe, runs)
                    plain.append(tok)
                else:
                    tok, sec, nbytes = run_tui(recipe, runs)
                    tui.append(tok)
                    drawn.append(nbytes)
                print(f"  {mode:<6} repeat {i + 1}: {tok:,.0f} tok/s  ({sec:.0f} s)", flush=True)
        if args.screenshot:
            screenshot(newest(work / f"runs-tui-{len(order) - 1}"), Path(args.screenshot).resolve())
        opened = open_times(work, 1_000 if args.smoke else 100_000)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratio = statistics.median(tui) / statistics.median(plain)
    lines = [
        "# localtune training with the TUI attached vs --no-tui",
        "",
        f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.machine()}; Python {platform.python_version()}",
        f"- command: `python tests/benchmarks/bench_tui.py --steps {args.steps} --repeats {args.repeats}` "
        f"({(time.perf_counter() - t_start) / 60:.1f} min)",
        f"- recipe: recipes/quickstart.toml with {args.steps} steps on models/small; the TUI in a 120x36 "
        "pseudo-terminal",
        "",
        "| mode | tok/s per repeat | median tok/s |",
        "| --- | --- | ---: |",
        f"| --no-tui | {', '.join(f'{x:,.0f}' for x in plain)} | {statistics.median(plain):,.0f} |",
        f"| TUI attached | {', '.join(f'{x:,.0f}' for x in tui)} | {statistics.median(tui):,.0f} |",
        "",
        f"Throughput with the TUI: **{ratio:.3f}x** of --no-tui (target: at least 0.97x). "
        f"The TUI drew {statistics.mean(drawn) / 1024:,.0f} KiB per run.",
        "",
        f"Opening a {opened['lines']:,}-line metrics.jsonl: read in {opened['read_sec']:.2f} s; the run view's "
        f"first paint (read included) in {opened['first_paint_sec']:.2f} s.",
        "",
    ]
    print("\n".join(lines))
    if not args.smoke:
        Path(args.output).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
