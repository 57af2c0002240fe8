"""`localtune chat`: scripted stdin on a model and on a run (--compare), its commands and formats, bad input,
the terminal view, and the TUI's chat screen (a `localtune chat` subprocess streamed into two columns)."""
import asyncio
import contextlib
import copy
import json
import signal
import sys
import time

import pytest
from click.testing import CliRunner
from rich.console import Console
from run_fixtures import make_run
from test_cli import ROOT, invoke, only_run, write_recipe

from localtune.cli import cli
from localtune.cli.chat import Conversation, chat_session, command_of, read_prompts
from localtune.tui.app import LocaltuneApp
from localtune.tui.chat import ChatScreen

PROMPT = "Convert to ISO 8601: 11.11.1950"


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, small_model_path):
    """A tiny SFT run on the dates task, trained enough that its answers differ from the base's."""
    tmp = tmp_path_factory.mktemp("chat")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("LOCALTUNE_HOME", str(tmp / "home"))
        recipe = write_recipe(tmp, small_model_path, steps=20, save_every=20, report_every=10)
        result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp / "runs")
        assert result.exit_code == 0, result.output
    return only_run(tmp / "runs")


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory, small_model_path):
    """A tiny sft -> dpo run (a few steps each): its base side is the model before dpo (the SFT adapters fused)."""
    tmp = tmp_path_factory.mktemp("chat2")
    (tmp / "prefs.jsonl").write_text("".join((ROOT / "data/date_prefs/train.jsonl").read_text().splitlines(True)[:16]))
    dpo = ('[[stages]]\nkind = "dpo"\ndata = "prefs.jsonl"\nbeta = 0.1\nsteps = 2\nbatch_size = 4\n'
           "max_seq_len = 64\nlearning_rate = 1e-4\nsave_every = 2\nreport_every = 1\neval_every = 0\n"
           "[stages.adapter]\nrank = 4\nalpha = 8\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("LOCALTUNE_HOME", str(tmp / "home"))
        recipe = write_recipe(tmp, small_model_path, steps=2, save_every=2, report_every=1)
        recipe.write_text(recipe.read_text().replace("[eval]", dpo + "\n[eval]", 1))
        result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp / "runs")
        assert result.exit_code == 0, result.output
    return only_run(tmp / "runs")


def chat(*args, stdin: str):
    return CliRunner().invoke(cli, ["chat", *map(str, args)], input=stdin, catch_exceptions=False)


def test_compare_prints_base_and_tuned_answers_and_they_differ(tuned_run):
    result = chat(tuned_run, "--compare", "--max-tokens", "12", stdin=f"{PROMPT}\n")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line[:7] for line in lines] == ["base:  ", "tuned: "], result.output
    base, tuned = lines[0][7:], lines[1][7:]
    assert base and tuned and base != tuned  # the run learned something: its adapters change the answer


def test_compare_json_keeps_each_sides_history_and_reset_clears_it(tuned_run):
    stdin = f"{PROMPT}\n{PROMPT}\n/reset\n{PROMPT}\n/system Answer in French.\n{PROMPT}\n/quit\nnever answered\n"
    result = chat(tuned_run, "--compare", "--json", "--max-tokens", "8", stdin=stdin)
    assert result.exit_code == 0, result.output
    turns = [json.loads(line) for line in result.output.splitlines()]
    assert [t["prompt"] for t in turns] == [PROMPT] * 4  # /quit ended it: the last prompt went unanswered
    assert all(set(t) == {"prompt", "base", "tuned", "labels"} and t["labels"] == ["base", "tuned"] for t in turns)
    assert "never answered" not in result.output
    assert turns[2] == turns[0]  # greedy, and /reset forgot the first two turns
    assert turns[0]["base"] != turns[0]["tuned"]


class RecordingChatter:
    """Stands in for Chatter: records each message list it answers; answers "<side> <call number>" over two
    lines, in pieces that split a line break from its text, as a tokenizer does."""

    def __init__(self):
        self.calls = []

    @contextlib.contextmanager
    def inference(self):
        yield self

    def stream(self, messages, adapters_enabled=True):
        side = "tuned" if adapters_enabled else "base"
        self.calls.append((side, copy.deepcopy(messages)))
        yield from [f"{side} ", f"{len(self.calls)}\nli", "ne 2", "\n"]


def scripted(prompts, compare=True, fmt="json", system=None, labels=("base", "tuned")):
    chatter, out = RecordingChatter(), []
    chat_session(chatter, prompts, compare, system, fmt, lambda text, nl=True, err=False: out.append(
        ("err: " if err else "") + text + ("\n" if nl else "")), labels)
    return chatter.calls, "".join(out)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_each_side_keeps_its_own_history_and_reset_and_system_change_exactly_what_they_should():
    calls, out = scripted(["hi", "again", "/reset", "fresh", "/system Be brief.", "short?", "/quit", "unanswered"],
                          system="Old.")
    old, brief = {"role": "system", "content": "Old."}, {"role": "system", "content": "Be brief."}
    assert calls == [
        ("base", [old, user("hi")]), ("tuned", [old, user("hi")]),
        ("base", [old, user("hi"), assistant("base 1\nline 2\n"), user("again")]),  # its own answer, not tuned's
        ("tuned", [old, user("hi"), assistant("tuned 2\nline 2\n"), user("again")]),
        ("base", [old, user("fresh")]), ("tuned", [old, user("fresh")]),  # /reset keeps the system prompt
        ("base", [brief, user("short?")]), ("tuned", [brief, user("short?")]),  # /system replaces it, and resets
    ]  # /quit: "unanswered" never reached the model
    turns = [json.loads(line) for line in out.splitlines()]
    assert [(t["prompt"], t["base"], t["tuned"]) for t in turns] == [
        ("hi", "base 1\nline 2\n", "tuned 2\nline 2\n"), ("again", "base 3\nline 2\n", "tuned 4\nline 2\n"),
        ("fresh", "base 5\nline 2\n", "tuned 6\nline 2\n"), ("short?", "base 7\nline 2\n", "tuned 8\nline 2\n")]


def test_scripted_text_indents_continuation_lines_so_each_answer_is_one_block():
    _, out = scripted(["a", "/help", "b"], compare=False, fmt="text")
    assert out.startswith("tuned 1\n  line 2\nerr: commands:") and out.endswith("\ntuned 2\n  line 2\n")
    _, out = scripted(["a"], fmt="text")
    assert out == "base:  base 1\n       line 2\ntuned: tuned 2\n       line 2\n"
    _, out = scripted(["a"], fmt="text", labels=("before dpo", "tuned"))
    assert out == "before dpo: base 1\n            line 2\ntuned:      tuned 2\n            line 2\n"


def test_a_two_stage_run_labels_its_base_as_the_model_before_the_last_stage(two_stage_run):
    stdin = f"{PROMPT}\n"
    text = chat(two_stage_run, "--compare", "--max-tokens", "4", stdin=stdin)
    assert text.exit_code == 0, text.output
    assert [line[:12] for line in text.output.splitlines()] == ["before dpo: ", "tuned:      "], text.output
    turn = json.loads(chat(two_stage_run, "--compare", "--json", "--max-tokens", "4", stdin=stdin).output)
    assert turn["labels"] == ["before dpo", "tuned"]
    assert text.output.splitlines() == [f"before dpo: {turn['base']}", f"tuned:      {turn['tuned']}"]
    ready = json.loads(chat(two_stage_run, "--compare", "--json-tokens", "--max-tokens", "4",
                            stdin=stdin).output.splitlines()[0])
    assert ready["labels"] == ["before dpo", "tuned"]


def test_json_tokens_stream_pieces_that_make_the_answer(tuned_run):
    result = chat(tuned_run, "--compare", "--json-tokens", "--max-tokens", "6", stdin=f"{PROMPT}\n")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines()]
    assert "ready" in events[0] and events[0]["labels"] == ["base", "tuned"]
    turn = events[-1]
    for side in ("base", "tuned"):
        assert "".join(e["token"] for e in events if e.get("side") == side) == turn[side]


def test_a_runs_own_chat_template_is_used(tmp_path, small_model_path):
    """[model] chat_template (the run's chat_template.jinja copy) writes the prompt, not the tokenizer's."""
    from localtune.cli.chat import Chatter, load_chat

    template = ("{% for m in messages %}{{ m['role'] | upper }}>> {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT>> {% endif %}")
    (tmp_path / "t.jinja").write_text(template)
    recipe = write_recipe(tmp_path, small_model_path, steps=2, save_every=2)
    recipe.write_text(recipe.read_text().replace("[model]\n", '[model]\nchat_template = "t.jinja"\n', 1))
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = only_run(tmp_path / "runs")
    model, tokenizer, _, _ = load_chat(str(run), True, False)
    prompt = Chatter(model, tokenizer, 8, 0.0).encoder.prompt_tokens([{"role": "user", "content": "hi"}])
    assert tokenizer.decode(prompt) == "USER>> hi\nASSISTANT>> "
    answer = json.loads(chat(run, "--json", "--max-tokens", "8", stdin=f"{PROMPT}\n").output)["answer"]
    assert answer == invoke("generate", run, "--prompt", PROMPT, "--max-tokens", "8").output.rstrip("\n")


def test_chat_with_a_plain_model_answers_like_generate(small_model_path):
    result = chat(small_model_path, "--max-tokens", "8", stdin=f"{PROMPT}\n")
    assert result.exit_code == 0, result.output
    generated = invoke("generate", small_model_path, "--prompt", PROMPT, "--max-tokens", "8")
    assert result.output == generated.output  # the same chat template and greedy decoding


def test_multi_line_prompts_commands_and_system_prompt():
    assert list(read_prompts(["a \\\n", "b\n", "\n", "c\\"])) == ["a \nb", "c"]
    talks = {"base": Conversation("old"), "tuned": Conversation("old")}
    for talk in talks.values():
        talk.add("hi", "hello")
    assert command_of("/system Be brief.", talks) == "done"
    assert talks["tuned"].messages("x") == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "x"}]
    assert command_of("/quit", talks) == "quit" and command_of("plain", talks) is None
    assert "unknown command '/frobnicate'" in command_of("/frobnicate", talks)


@pytest.mark.parametrize("args, words", [
    (["no/such/run", "--compare"], ["no such run directory", "fix:"]),
    (["models/small", "--compare"], ["--compare needs a run directory", "fix:"]),
    (["no/such/model"], ["no/such/model", "fix:"]),
])
def test_bad_targets_say_what_to_do(in_repo, args, words):
    result = chat(*args, stdin="hi\n")
    assert result.exit_code == 1, result.output
    for word in words:
        assert word in result.output, result.output


def test_compare_on_a_full_fine_tune_loads_its_base_beside_it(tmp_path, small_model_path, monkeypatch):
    """A full fine-tune has no adapters to switch off: its base side is the model it started from, loaded beside it,
    and answers as that model alone does; the tuned side answers as the run does."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LOCALTUNE_HOME", str(tmp_path / "home"))
    recipe = write_recipe(tmp_path, small_model_path, steps=6, save_every=6, learning_rate=1e-4)
    recipe.write_text(recipe.read_text().replace("rank = 4\nalpha = 8", 'type = "full"'))
    assert invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs").exit_code == 0
    run = only_run(tmp_path / "runs")
    assert json.loads((run / "sft" / "adapter_config.json").read_text())["fine_tune_type"] == "full"
    ready = json.loads(chat(run, "--compare", "--json-tokens", "--max-tokens", "2", stdin="").output.splitlines()[0])
    assert ready["base_is"] == "loaded beside it"  # the TUI's chat title says so
    turn = json.loads(chat(run, "--compare", "--json", "--max-tokens", "12", stdin=f"{PROMPT}\n").output)
    alone = {side: json.loads(chat(target, "--json", "--max-tokens", "12", stdin=f"{PROMPT}\n").output)["answer"]
             for side, target in (("base", small_model_path), ("tuned", run))}
    assert turn["base"] == alone["base"] and turn["tuned"] == alone["tuned"], (turn, alone)
    assert turn["base"] != turn["tuned"]


def test_compare_on_a_run_with_no_saved_stage_is_refused(tmp_path):
    run = make_run(tmp_path, "early", state="running", upto=20)  # nothing saved, and not finished
    result = chat(run, "--compare", "--in-progress", stdin="hi\n")
    assert result.exit_code == 1
    assert "no stage has saved weights yet" in result.output and "fix:" in result.output, result.output


def test_the_terminal_view_streams_both_answers_into_two_columns(tuned_run):
    from localtune.cli.chat import Chatter, load_chat
    from localtune.cli.chat_view import interactive_session

    model, tokenizer, labels, _ = load_chat(str(tuned_run), True, False)
    console = Console(record=True, width=80, force_terminal=False)
    interactive_session(Chatter(model, tokenizer, 8, 0.0), str(tuned_run), True, labels, None, console,
                        lines=[PROMPT, "/reset", "/quit", PROMPT])
    shown = console.export_text()
    assert "end a line with \\ to continue" in shown and "(conversation reset)" in shown
    header = next(line for line in shown.splitlines() if line.startswith("┃"))
    assert header.index("base") < 40 < header.index("tuned")  # side by side, base on the left


def test_the_tui_chat_screen_streams_a_chat_subprocess_side_by_side(tuned_run):
    expected = json.loads(chat(tuned_run, "--compare", "--json", "--max-tokens", "64", stdin=f"{PROMPT}\n").output)
    app = LocaltuneApp(tuned_run, runs_dir=tuned_run.parent, poll_interval=60)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("g")
            screen = app.screen
            assert isinstance(screen, ChatScreen) and screen.command[2:5] == ["localtune.cli", "chat", str(tuned_run)]
            await wait_for(pilot, lambda: not screen.busy, "the model to load")
            await pilot.press(*"/help", "enter")  # not sent: nothing would answer it
            assert not screen.busy and screen.turns["base"] == []
            await pilot.press(*PROMPT, "enter")
            (asked, so_far), = screen.turns["base"]  # streaming: the answer so far (the tiny model may be quick)
            assert asked == PROMPT and expected["base"].startswith(so_far), so_far
            await wait_for(pilot, lambda: not screen.busy, "both answers")
            shown = {side: str(screen.query_one(f"#{side}-answers").content) for side in ("base", "tuned")}
            await pilot.press("ctrl+r")
            assert screen.turns == {"base": [], "tuned": []}
            await pilot.press("escape")
            assert not isinstance(app.screen, ChatScreen)
            return screen, shown

    screen, shown = asyncio.run(main())
    assert screen.turns == {"base": [], "tuned": []}
    for side in ("base", "tuned"):
        assert shown[side].strip() == f"you: {PROMPT}\n{expected[side]}".strip()
    assert screen.proc.wait(timeout=10) == 0  # closing the screen ends the subprocess


def test_the_tui_chat_screen_shows_why_the_chat_process_failed(tmp_path):
    run = make_run(tmp_path, "full")  # finished, but no stage saved any weights

    async def main():
        app = LocaltuneApp(run, runs_dir=tmp_path, poll_interval=60)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = ChatScreen(run)
            await app.push_screen(screen)
            await wait_for(pilot, lambda: screen.exit_code is not None, "the chat process to fail")
            await pilot.press(*"hi", "enter")  # refused: nothing answers
            return screen, str(screen.query_one("#chat-status").content)

    screen, status = asyncio.run(main())
    assert screen.exit_code == 1 and "no stage has saved weights yet" in status and "exit code 1" in status
    assert screen.turns == {"base": [], "tuned": []}


async def wait_for(pilot, predicate, what: str, seconds: float = 60) -> None:
    for _ in range(int(seconds * 10)):
        if predicate():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_command_runs_this_python():
    from localtune.tui.chat import chat_command

    assert chat_command("runs/x")[:6] == [sys.executable, "-m", "localtune.cli", "chat", "runs/x", "--compare"]


# Stands in for `localtune chat --json-tokens` in the snapshot: fixed answers, streamed a character at a time.
FAKE_CHAT = """import json, sys
print(json.dumps({"ready": "demo", "labels": ["base", "tuned"]}), flush=True)
for line in sys.stdin:
    answers = {"base": "199 19 19", "tuned": "1950-11-11"}
    for side, answer in answers.items():
        for piece in answer:
            print(json.dumps({"side": side, "token": piece}), flush=True)
    print(json.dumps({"prompt": line.strip(), **answers}), flush=True)
"""


# Answers without end, and first writes more warnings to stderr than a pipe holds (64 KiB): a stderr pipe read
# only at the end would stall it before it says it is ready.
SLOW_CHAT = """import json, sys, time
sys.stderr.write("a warning\\n" * 20000); sys.stderr.flush()
print(json.dumps({"ready": "demo", "labels": ["before dpo", "tuned"]}), flush=True)
for line in sys.stdin:
    while True:
        print(json.dumps({"side": "base", "token": "x"}), flush=True)
        time.sleep(0.05)
"""


def test_closing_the_chat_screen_while_it_answers_ends_the_subprocess_at_once(tmp_path):
    make_run(tmp_path, "demo")
    app = LocaltuneApp(tmp_path / "demo", runs_dir=tmp_path, poll_interval=60)

    async def main():
        async with app.run_test(size=(100, 30)) as pilot:
            screen = ChatScreen("runs/demo", command=[sys.executable, "-c", SLOW_CHAT])
            await app.push_screen(screen)
            await wait_for(pilot, lambda: not screen.busy, "the fake chat to start", seconds=20)
            shown = (str(screen.query_one("#chat-title").content),
                     [screen.query_one(f"#{side}-box").border_title for side in ("base", "tuned")])
            await pilot.press(*"hi", "enter")
            await wait_for(pilot, lambda: "xxx" in screen.turns["base"][-1][1], "the answer to stream")
            started = time.monotonic()
            await pilot.press("escape")  # busy: the subprocess is terminated, not waited for
            closing = time.monotonic() - started
            assert not isinstance(app.screen, ChatScreen)
            await wait_for(pilot, lambda: screen.proc.returncode is not None, "the subprocess to be reaped", 10)
            await pilot.pause(0.3)  # a late callback on the closed screen would raise here, and run_test re-raise
            return screen, shown, closing

    screen, (title, borders), closing = asyncio.run(main())
    assert screen.proc.returncode == -signal.SIGTERM and closing < 1.0, (screen.proc.returncode, closing)
    assert "before dpo (adapters off) | tuned" in title and borders == ["before dpo", "tuned"]
    assert screen.exit_code is None  # `ended` did nothing on the closed screen


def test_the_chat_screen_says_when_the_base_is_a_second_model(tmp_path):
    make_run(tmp_path, "demo")
    fake = ('import json, sys\nprint(json.dumps({"ready": "demo", "labels": ["base", "tuned"], '
            '"base_is": "loaded beside it"}), flush=True)\nsys.stdin.read()\n')

    async def main():
        app = LocaltuneApp(tmp_path / "demo", runs_dir=tmp_path, poll_interval=60)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = ChatScreen("runs/demo", command=[sys.executable, "-c", fake])
            await app.push_screen(screen)
            await wait_for(pilot, lambda: not screen.busy, "the fake chat to start", seconds=20)
            title = str(screen.query_one("#chat-title").content)
            await pilot.press("escape")
            return title

    assert "base (loaded beside it) | tuned" in asyncio.run(main())


def test_chat_screen_snapshot(tmp_path, monkeypatch, snap_compare):
    make_run(tmp_path / "runs", "demo")
    monkeypatch.chdir(tmp_path)  # the run's path is shown: the same on every machine
    app = LocaltuneApp("runs/demo", runs_dir="runs", poll_interval=60)

    async def chat_once(pilot):
        screen = ChatScreen("runs/demo", command=[sys.executable, "-c", FAKE_CHAT])
        await app.push_screen(screen)
        await wait_for(pilot, lambda: not screen.busy, "the fake chat to start")
        await pilot.press(*PROMPT, "enter")
        await wait_for(pilot, lambda: not screen.busy, "the fake answers")
        assert screen.turns == {"base": [[PROMPT, "199 19 19"]], "tuned": [[PROMPT, "1950-11-11"]]}

    assert snap_compare(app, terminal_size=(100, 24), run_before=chat_once)
