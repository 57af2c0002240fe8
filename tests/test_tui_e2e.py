"""`localtune run` in a real pseudo-terminal: the TUI starts, training runs in its own process,
and quitting either stops it (checkpoint, clean exit, resumable) or detaches (it finishes alone)."""
import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
from test_cli import invoke, write_recipe

from localtune.run import lock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")


class Terminal:
    """`localtune ARGS` attached to a 100x30 pseudo-terminal; what it draws is read and kept."""

    def __init__(self, *args, cwd):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color"}
        self.proc = subprocess.Popen([sys.executable, "-m", "localtune.cli", *map(str, args)], stdin=slave,
                                     stdout=slave, stderr=slave, env=env, cwd=cwd, start_new_session=True)
        os.close(slave)
        self.screen = b""

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.screen += os.read(self.master, 1 << 16)
                except OSError:
                    return

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.pump(0.2)
            if predicate():
                return
        raise AssertionError(f"timed out waiting for {what}; the terminal showed:\n{self.screen[-2000:]!r}")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> int:
        self.pump(0.5)
        code = self.proc.wait(timeout=60)
        self.pump(0.2)
        os.close(self.master)
        return code


def status_of(runs):
    found = list(runs.glob("*/status.json"))
    return json.loads(found[0].read_text()) if found else {}


def training(runs) -> bool:
    st = status_of(runs)
    return st.get("state") == "running" and st.get("stage") == "sft" and st.get("step", 0) >= 2


@pytest.mark.parametrize("choice", ["stop", "detach"])
def test_quit_stops_with_a_checkpoint_or_detaches(tmp_path, small_model_path, choice):
    # 80 steps: enough that training is still running when the quit dialog answers (steps 2 to 80 take 8 s or more)
    recipe = write_recipe(tmp_path, small_model_path, steps=80, save_every=1000, report_every=1)
    runs = tmp_path / "runs"
    term = Terminal("run", recipe, "--runs-dir", runs, cwd=tmp_path)
    try:
        term.wait_for(lambda: training(runs), 120, "training to start")
        run = next(runs.iterdir())
        assert status_of(runs)["pid"] != term.proc.pid  # training is not in the TUI's process
        assert lock.holder(run)["pid"] == status_of(runs)["pid"]  # the child holds the lock the TUI took
        term.type("q")
        term.wait_for(lambda: b"Training is still running" in term.screen, 10, "the quit dialog")
        term.type(choice[0])  # s = stop, d = detach
        code = term.close()
        trainer = lock.holder(run)  # the TUI's process has exited
    finally:
        term.proc.kill()
    status = status_of(runs)
    if choice == "stop":
        assert code == 130 and status["state"] == "interrupted" and trainer is None  # the run is free
        step = status["step"]
        assert 2 <= step < 80 and (run / "sft/checkpoint/state.safetensors").exists()
        assert b"continue with: localtune run --resume" in term.screen
        result = invoke("run", "--resume", run, "--no-tui")  # and it resumes from there
        assert result.exit_code == 0, result.output
        assert f"resumed from checkpoint at step {step}" in (run / "metrics.jsonl").read_text()
    else:
        assert code == 0 and b"training continues in the background" in term.screen
        assert trainer["pid"] == status["pid"]  # the detached child still holds the run
        for _ in range(600):  # the detached trainer finishes on its own
            if status_of(runs).get("state") != "running":
                break
            time.sleep(0.2)
        assert status_of(runs)["state"] == "done"
        assert (run / "sft/adapters.safetensors").exists() and (run / "report.md").exists()
        assert generated_in_the_tui(run)


def generated_in_the_tui(run) -> str:
    """`g` on the finished run: the chat screen, and the tuned model's answer (a `localtune chat` subprocess)."""
    import asyncio

    from localtune.tui.app import LocaltuneApp
    from localtune.tui.chat import ChatScreen

    async def main():
        app = LocaltuneApp(run, runs_dir=run.parent, poll_interval=60)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("g")
            screen = app.screen
            assert isinstance(screen, ChatScreen)
            for _ in range(600):  # the subprocess loads the model
                await pilot.pause(0.1)
                if not screen.busy or screen.exit_code is not None:
                    break
            await pilot.press(*"Convert to ISO 8601: March 5, 2021", "enter")
            for _ in range(600):
                await pilot.pause(0.1)
                if not screen.busy or screen.exit_code is not None:
                    break
            return screen.turns["tuned"][-1][1] if screen.turns["tuned"] else str(
                screen.query_one("#chat-status").content)

    answer = asyncio.run(main())
    assert answer and "exit code" not in answer, answer
    return answer
