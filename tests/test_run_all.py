"""run_all.py without running a benchmark: its extractors on the results files, the fallback, the README writer."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))
import run_all  # noqa: E402
from run_all import BEGIN, BENCHES, END, Bench, first_ratio_table, parse, render, write_readme  # noqa: E402

WITH_EXTRACTOR = [name for name, b in BENCHES.items() if b.extract]


@pytest.mark.parametrize("name", WITH_EXTRACTOR)
def test_extractors_read_the_current_results(name):
    rows = BENCHES[name].rows()
    assert rows
    for r in rows:
        assert isinstance(r.value, float) and r.value > 0, r
        assert r.what and r.vs and r.target
        assert r.source.meta["date"][:2] == "20"
        assert r.source.meta["command"].startswith(f"`python tests/benchmarks/{BENCHES[name].script.name}")


def test_every_result_row_keeps_its_own_date_and_command():
    block = render([(b, r) for name in WITH_EXTRACTOR for b in [BENCHES[name]] for r in b.rows()])
    assert "`python tests/benchmarks/run_all.py`" in block
    table = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| benchmark")][1:]
    assert all(line.rstrip(" |").rsplit("| ", 1)[1][:2] == "20" for line in table)  # the date column
    for name in WITH_EXTRACTOR:
        assert f"[{name}](../tests/benchmarks/results/{name}.md)" in block  # docs/benchmarks.md's links
        for s in parse(BENCHES[name].results.read_text()):
            assert f"- {name}, {s.meta['date']}: {s.meta['command']}" in block


SYNTHETIC = """# Planner estimate vs measured

- date: 2026-12-01 10:00
- machine: test box, 2 cores; load average 0.1 at the end
- command: `python tests/benchmarks/bench_plan.py --repeats 1` (1.0 min)

| model | estimate GiB | measured GiB |
| --- | ---: | ---: |
| small | 0.12 | 0.13 |

| model | what | estimate | measured | Ratio |
|---|---|---:|---:|---:|
| small | peak memory | 0.12 | 0.13 | 0.92x |
| smollm2 | step time | 1.5 s | 1.2 s | 1.25x |
| tiny | step time | — | — | — |

| model | ratio |
| --- | ---: |
| later | 9.99x |
"""


def test_fallback_reads_the_first_table_with_a_ratio_column():
    rows = first_ratio_table(parse(SYNTHETIC), vs="measured", target="within 10%")
    assert [(r.what, r.vs, r.value, r.target) for r in rows] == [
        ("small", "measured", 0.92, "within 10%"), ("smollm2", "measured", 1.25, "within 10%")]
    assert rows[0].source.meta["date"] == "2026-12-01 10:00"
    with pytest.raises(ValueError, match="ratio"):
        first_ratio_table(parse(SYNTHETIC.split("| model | what")[0]))


@pytest.fixture
def bench_dir(tmp_path, monkeypatch):
    """A repository root in tmp_path, with tests/benchmarks/results/ for made-up results files."""
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    monkeypatch.setattr(run_all, "HERE", tmp_path / "tests" / "benchmarks")
    (tmp_path / "tests" / "benchmarks" / "results").mkdir(parents=True)
    return tmp_path / "tests" / "benchmarks" / "results"


def test_a_bench_without_an_extractor_gets_the_fallback(bench_dir):
    (bench_dir / "bench_plan.md").write_text(SYNTHETIC)
    assert [r.ratio for r in Bench("bench_plan", vs="measured").rows()] == ["0.92x", "1.25x"]


SFT_HEADER = """| model | data | localtune | tok/s | peak GiB | mlx-lm | tok/s | peak GiB | tok/s ratio | memory ratio |
| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"""
SFT_RERUN = f"""# localtune SFT vs mlx_lm.lora

- date: 2026-11-29 09:08
- command: `python tests/benchmarks/bench_sft.py --models small` (1.0 min)

{SFT_HEADER}
| small | equal, 64 tok/row | localtune | 10 | 0.1 | mlx_lm.lora | 10 | 0.1 | 1.00x (0.99-1.01) | 1.00x |
| small | variable, 16-256 tok/row | localtune, packing | 20 | 0.1 | mlx_lm.lora | 10 | 0.1 | 2.00x | 0.90x |

## The equal rows again, after a change

- date: 2026-11-29 09:15
- command: `python tests/benchmarks/bench_sft.py --models small --scenarios equal` (0.5 min)

{SFT_HEADER}
| small | equal, 64 tok/row | localtune | 70 | 0.05 | mlx_lm.lora | 10 | 0.1 | 7.00x | 0.50x |
"""


def test_a_later_run_of_a_row_replaces_it_in_place(bench_dir):
    (bench_dir / "bench_sft.md").write_text(SFT_RERUN)
    rows = Bench("bench_sft", extract=run_all.sft).rows()
    assert [(r.what, r.ratio, r.target, r.source.meta["date"][-5:]) for r in rows] == [
        ("small, equal, 64 tok/row: useful tok/s", "7.00x", "—", "09:15"),
        ("small, equal, 64 tok/row: peak memory", "0.50x", "≤ 1x", "09:15"),
        ("small, variable, 16-256 tok/row (packing): useful tok/s", "2.00x", "≥ 1.3x", "09:08"),
        ("small, variable, 16-256 tok/row (packing): peak memory", "0.90x", "—", "09:08")]


def test_a_missing_results_file_names_the_command(bench_dir):
    with pytest.raises(SystemExit, match=r"results/bench_x\.md is missing: produce it with "
                                         r"`python tests/benchmarks/bench_x\.py --repeats 2`"):
        Bench("bench_x", ("--repeats", "2")).rows()


def test_readme_writer_replaces_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# x\n\n## Benchmarks\n\nIntro.\n\n", "\n\nMore text.\n"
    readme.write_text(f"{before}{BEGIN}\nold table\n{END}{after}")
    write_readme(readme, "| a |\n| --- |\n| 1 |\n")
    write_readme(readme, "| a |\n| --- |\n| 2 |\n")  # a second run replaces the first
    assert readme.read_text() == f"{before}{BEGIN}\n| a |\n| --- |\n| 2 |\n{END}{after}"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="run_all:begin"):
        write_readme(readme, "| a |\n")
