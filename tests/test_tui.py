"""The TUI: state first (what is shown), then snapshots; it only ever reads the run directory."""
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from run_fixtures import DEAD_PID, T0, make_run, train_record

from localtune.cli import cli
from localtune.train import metrics
from localtune.tui.app import LocaltuneApp
from localtune.tui.screens import QuitScreen, RunScreen, RunsScreen
from localtune.tui.state import MetricsTail, RunState, downsample
from localtune.tui.widgets import braille_plot


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")  # event times in snapshots
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def app_for(path, **kw):
    return LocaltuneApp(path, runs_dir=path.parent if path else kw.pop("runs_dir"), clock=lambda: T0 + 3600,
                        poll_interval=kw.pop("poll_interval", 60), **kw)


def text_of(app, selector) -> str:
    widget = app.screen.query_one(selector)
    return str(widget.render()) if not hasattr(widget, "content") else str(widget.content)


def drive(app, body, size=(100, 30)):
    """Run the app headless, hand (app, pilot) to an async body, and return app.run()'s result."""

    async def main():
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await body(app, pilot)
        return app.return_value

    return asyncio.run(main())


# --- reading the run directory ------------------------------------------------------------

def test_metrics_tail_waits_for_the_end_of_a_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole, half = json.dumps({"kind": "train", "step": 1}), json.dumps({"kind": "train", "step": 2})
    path.write_text(whole + "\n" + half[:10])
    tail = MetricsTail(path)
    assert [r["step"] for r in tail.read()] == [1]
    with open(path, "a") as f:
        f.write(half[10:] + "\n")
    assert [r["step"] for r in tail.read()] == [2]
    assert tail.read() == []
    path.write_text(whole + "\n")  # replaced by a shorter file: read from the start again
    assert [r["step"] for r in tail.read()] == [1]


def test_state_of_a_run_whose_process_is_gone_is_crashed(tmp_path):
    crashed = RunState(make_run(tmp_path, "crashed", state="running", upto=40, pid=DEAD_PID))
    live = RunState(make_run(tmp_path, "live", state="running", upto=40))
    crashed.refresh(), live.refresh()
    assert crashed.state == "crashed" and live.state == "running"
    assert crashed.stage_state("sft") == "crashed"
    assert live.progress("sft") == (40, 100, 120.0)


def test_a_hundred_thousand_line_metrics_file_opens_and_charts_downsampled(tmp_path):
    path = make_run(tmp_path, "long", steps=100_000, report_every=1, task=False)
    state = RunState(path)
    state.refresh()
    assert len(state.stages["sft"].train) == 100_000
    assert state.progress("sft")[:2] == (100_000, 100_000)
    points = downsample(state.stages["sft"].train, 160)
    assert len(points) == 160 and points[-1][0] == 100_000


def test_downsample_takes_bucket_means():
    assert downsample([(i, float(i)) for i in range(6)], 3) == [(1, 0.5), (3, 2.5), (5, 4.5)]
    assert downsample([(0, 1.0)], 3) == [(0, 1.0)]


def test_braille_plot_draws_both_series_inside_its_box():
    text = braille_plot([([(0, 2.0), (10, 1.0)], "cyan", True), ([(5, 1.5)], "yellow", False)], 30, 6)
    lines = text.plain.split("\n")
    assert len(lines) == 6 and all(len(line) <= 30 for line in lines)
    assert lines[0].strip().startswith("2") and lines[4].strip().startswith("1")  # y axis: max and min
    assert "step 0" in lines[-1] and lines[-1].rstrip().endswith("10")
    assert any(0x2800 < ord(c) <= 0x28FF for c in text.plain)


def test_unknown_methods_get_a_generic_panel_of_their_numbers():
    record = train_record("x", "mystery", 10, 100, T0)
    shown = {m.key: v for m, v in metrics.method_metrics("mystery", record)}
    assert shown == {"widgets_per_sec": 20.0, "wobble": 0.5}
    named = [m.key for m, _ in metrics.method_metrics("dpo", train_record("x", "dpo", 10, 100, T0))]
    assert named == ["reward_margin", "preference_accuracy"]


# --- the run view, driven by Pilot ----------------------------------------------------------

CASES = {
    # fixture: (make_run kwargs, words the run view must show)
    "sft-done": (dict(state="done"), ["done", "✓ sft", "step 100/100", "exact match of 40", "before", "after",
                                      "90.0%", "1889-03-31"]),
    "dpo-running": (dict(stages=(("sft", "sft"), ("dpo", "dpo")), state="running", upto=60),
                    ["running", "✓ sft", "● dpo", "step 60/100", "ETA 0:01:20", "reward margin", "+1.200",
                     "pref. accuracy", "80.0%"]),
    "ppo-running": (dict(stages=(("sft", "sft"), ("reward", "reward"), ("ppo", "ppo")), state="running", upto=30),
                    ["● ppo", "KL to reference", "clip fraction", "8.0%", "entropy"]),
    "grpo-running": (dict(stages=(("sft", "sft"), ("grpo", "grpo")), state="running", upto=50),
                     ["● grpo", "solved", "40.0%", "equal-reward groups", "25%", "completion length", "sampling s",
                      "reward 2", "+0.500"]),
    "distill-done": (dict(stages=(("distill", "distill"),), state="done"),
                     ["✓ distill", "KL to teacher", "JSD to teacher", "student/teacher task"]),
    "crashed": (dict(state="running", upto=40, pid=DEAD_PID),
                ["crashed", "step 40/100", "localtune run --resume"]),
    "partial-line": (dict(state="running", upto=40, partial_line=True), ["running", "step 40/100"]),
    "failed": (dict(state="failed", upto=30, error="stage sft, step 30: the loss became nan"),
               ["failed", "the loss became nan"]),
}


def shown_text(app) -> str:
    parts = [text_of(app, sel) for sel in ("#title", "#chain", "#progress-label", "#stats", "#report", "#samples",
                                           "#events")]
    return "\n".join(parts)


@pytest.mark.parametrize("case", CASES)
def test_run_view_shows_what_the_method_lives_by(tmp_path, case):
    kwargs, words = CASES[case]
    path = make_run(tmp_path, case, **kwargs)

    async def body(app, pilot):
        assert isinstance(app.screen, RunScreen)
        shown = shown_text(app)
        for word in words:
            assert word in shown, f"{word!r} not shown in:\n{shown}"

    drive(app_for(path), body)


@pytest.mark.parametrize("case", ["sft-done", "dpo-running", "crashed", "distill-done"])
def test_run_view_snapshot(tmp_path, case, snap_compare):
    kwargs, _ = CASES[case]
    # the path is shown in the view: keep it the same on every machine
    root = tmp_path / "runs"
    path = make_run(root, case, **kwargs)
    app = app_for(path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        app.run_path = os.path.relpath(path, tmp_path)
        assert snap_compare(app, terminal_size=(100, 30))
    finally:
        os.chdir(cwd)


def test_the_view_follows_a_live_metrics_file(tmp_path):
    path = make_run(tmp_path, "live", state="running", upto=20)

    async def body(app, pilot):
        assert "step 20/100" in text_of(app, "#progress-label")
        with open(path / "metrics.jsonl", "a") as f:
            for step in (30, 40):
                f.write(json.dumps(train_record("sft", "sft", step, 100, T0 + step)) + "\n")
            f.write(json.dumps(train_record("sft", "sft", 50, 100, T0 + 50))[:20])  # still being written
        await pilot.pause(0.3)
        assert "step 40/100" in text_of(app, "#progress-label")
        assert app.screen.query_one("#chart").train[-1][0] == 40

    drive(app_for(path, poll_interval=0.05), body)


def test_stage_keys_switch_the_stage_shown(tmp_path):
    path = make_run(tmp_path, "two", stages=(("sft", "sft"), ("dpo", "dpo")), state="running", upto=60)

    async def body(app, pilot):
        assert "dpo" in text_of(app, "#stats").split("\n")[0]
        await pilot.press("left")
        assert "sft" in text_of(app, "#stats").split("\n")[0]
        assert "step 100/100" in text_of(app, "#progress-label")
        await pilot.press("right")
        assert "dpo" in text_of(app, "#stats").split("\n")[0]

    drive(app_for(path), body)


def test_checkpoint_and_pause_keys_write_requests_to_the_run(tmp_path):
    path = make_run(tmp_path, "live", state="running", upto=20)

    async def body(app, pilot):
        await pilot.press("s")
        control = json.loads((path / "control.json").read_text())
        assert control["checkpoint"] > 0
        await pilot.press("p")
        assert json.loads((path / "control.json").read_text())["paused"] is True
        status = json.loads((path / "status.json").read_text())
        (path / "status.json").write_text(json.dumps({**status, "state": "paused"}))
        await pilot.press("p")
        assert json.loads((path / "control.json").read_text())["paused"] is False

    drive(app_for(path), body)


def test_detach_then_reattach_shows_the_same_run(tmp_path):
    path = make_run(tmp_path, "live", stages=(("sft", "sft"), ("dpo", "dpo")), state="running", upto=60)
    seen = []

    async def detach(app, pilot):
        seen.append(shown_text(app))
        await pilot.press("q")
        assert isinstance(app.screen, QuitScreen)
        await pilot.press("d")

    assert drive(app_for(path), detach) == "detached"
    assert json.loads((path / "status.json").read_text())["state"] == "running"  # nothing was stopped

    async def reattach(app, pilot):
        seen.append(shown_text(app))
        await pilot.press("q", "escape")  # cancel: still watching
        assert isinstance(app.screen, RunScreen)

    drive(app_for(path), reattach)
    assert seen[0] == seen[1]


STOPPABLE = """
import json, os, signal, sys, time
path = sys.argv[1]
def stop(*_):
    status = json.load(open(path))
    json.dump({**status, "state": "interrupted"}, open(path, "w"))
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
status = json.load(open(path))
json.dump({**status, "state": "running", "pid": os.getpid()}, open(path, "w"))
print("ready", flush=True)
time.sleep(60)
"""


def test_quit_and_stop_interrupts_the_trainer_and_waits_for_it(tmp_path):
    path = make_run(tmp_path, "live", state="running", upto=20)
    child = subprocess.Popen([sys.executable, "-c", STOPPABLE, str(path / "status.json")], stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"ready"

    async def body(app, pilot):
        await pilot.press("q")
        assert isinstance(app.screen, QuitScreen)
        await pilot.press("s")
        for _ in range(50):
            await pilot.pause(0.1)
            if app.return_value:
                break

    try:
        assert drive(app_for(path, poll_interval=0.05), body) == "stopped"
        assert child.wait(timeout=5) == 130
        assert json.loads((path / "status.json").read_text())["state"] == "interrupted"
    finally:
        child.kill()


def test_quitting_a_finished_run_asks_nothing(tmp_path):
    path = make_run(tmp_path, "done", state="done")

    async def body(app, pilot):
        await pilot.press("q")

    assert drive(app_for(path), body) == "closed"


def test_a_deleted_run_directory_keeps_the_view_alive(tmp_path):
    path = make_run(tmp_path, "gone", state="running", upto=20)

    async def body(app, pilot):
        shutil.rmtree(path)
        await pilot.pause(0.3)
        assert "deleted" in text_of(app, "#title")
        assert "step 20/100" in text_of(app, "#progress-label")  # what was read stays

    drive(app_for(path, poll_interval=0.05), body)


def test_a_narrow_terminal_keeps_chart_numbers_and_events(tmp_path):
    path = make_run(tmp_path, "narrow", stages=(("sft", "sft"), ("dpo", "dpo")), state="running", upto=60)

    async def body(app, pilot):
        screen = app.screen
        assert screen.has_class("narrow")
        for sel in ("#chart", "#stats", "#events-box", "#progress-label"):
            region = screen.query_one(sel).region
            assert region.width > 0 and region.height > 0, sel
        assert screen.query_one("#chart").region.width >= 40
        assert not screen.query_one("#samples-box").display
        await pilot.resize_terminal(140, 40)
        await pilot.pause()
        assert not screen.has_class("narrow") and screen.query_one("#samples-box").display

    drive(app_for(path), body, size=(80, 24))


# --- the runs list ---------------------------------------------------------------------------

def make_runs(root):
    make_run(root, "quickstart-20251129-070000", state="done")
    make_run(root, "dpo-20251129-080000", stages=(("sft", "sft"), ("dpo", "dpo")), state="running", upto=60)
    make_run(root, "old-20251128-070000", state="running", upto=40, pid=DEAD_PID)


def test_runs_list_filters_by_state_and_opens_a_run(tmp_path):
    make_runs(tmp_path)

    async def body(app, pilot):
        assert isinstance(app.screen, RunsScreen)
        table = app.screen.query_one("#runs")
        assert table.row_count == 3
        states = {str(table.get_row_at(i)[0]): str(table.get_row_at(i)[1]) for i in range(3)}
        assert states["old-20251128-070000"] == "crashed" and states["dpo-20251129-080000"] == "running"
        await pilot.click("#filter")
        await pilot.press(*"crashed")
        assert table.row_count == 1
        await pilot.press(*["backspace"] * len("crashed"))
        assert table.row_count == 3
        table.focus()
        await pilot.press("enter")
        assert isinstance(app.screen, RunScreen)

    drive(LocaltuneApp(None, runs_dir=tmp_path, clock=lambda: T0 + 3600, poll_interval=60), body)


def test_runs_command_lists_every_run(tmp_path):
    make_runs(tmp_path)
    result = CliRunner().invoke(cli, ["runs", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["name", "state", "stage", "step", "loss", "started", "duration", "trainer"]
    crashed = next(line for line in lines if line.startswith("old-"))
    assert "crashed" in crashed and "40/100" in crashed
    done = next(line for line in lines if line.startswith("quickstart-"))
    assert "done" in done and "100/100" in done and "0:00:50" in done  # 10 reports 5 s apart
    as_json = json.loads(CliRunner().invoke(cli, ["runs", "--runs-dir", str(tmp_path), "--json"]).output)
    assert {r["state"] for r in as_json} == {"done", "running", "crashed"}


@pytest.mark.parametrize("command", [["watch"], ["runs"]])
def test_watch_and_runs_with_no_runs_say_how_to_start_one(tmp_path, command):
    result = CliRunner().invoke(cli, [*command, "--runs-dir", str(tmp_path / "none")])
    assert "localtune run recipes/quickstart.toml" in result.output
    assert result.exit_code == (1 if command == ["watch"] else 0)


def test_the_stats_show_general_nll_next_to_the_loss(tmp_path):
    path = make_run(tmp_path, "guarded", state="running", upto=40)
    with open(path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"t": T0 + 60, "stage": "sft", "step": 40, "kind": "guard", "general_nll": 4.9,
                            "general_nll_increase": 0.063, "within_budget": False, "budget": 0.05,
                            "steps_total": 100}) + "\n")

    async def body(app, pilot):
        stats = text_of(app, "#stats")
        assert "loss" in stats and "general NLL 4.9000 (+6.3% / +5%)" in stats

    drive(app_for(path), body)
