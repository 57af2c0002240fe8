"""The license and provenance gate: teachers, cards, records, the CLI, and the gate in `run`."""
import json

import pytest
from test_cli import invoke, only_run, write_recipe

from localtune.integrity import provenance


@pytest.mark.parametrize("name, verdict, rule", [
    ("gpt-4o", "block", "closed-api:openai"),
    ("openai/gpt-4o-mini", "block", "closed-api:openai"),
    ("gpt-3.5-turbo-0613", "block", "closed-api:openai"),
    ("gpt-35-turbo", "block", "closed-api:openai"),  # Azure's spelling
    ("text-davinci-003", "block", "closed-api:openai"),
    ("o1-mini", "block", "closed-api:openai"),
    ("GPT-4", "block", "closed-api:openai"),
    ("claude-3-5-sonnet-20240620", "block", "closed-api:anthropic"),
    ("anthropic/claude-3-opus", "block", "closed-api:anthropic"),
    ("anthropic.claude-v2", "block", "closed-api:anthropic"),  # a Bedrock id
    ("claude-opus-4-1", "block", "closed-api:anthropic"),
    ("gemini-1.5-pro", "block", "closed-api:google"),
    ("models/gemini-2.0-flash", "block", "closed-api:google"),
    ("grok-3", "block", "closed-api:xai"),
    ("amazon.nova-pro-v1", "block", "closed-api:amazon"),
    # open weights whose names look closed: judged by their license, never blocked as an API
    ("gpt2", "warn", "license:mit"),
    ("openai/gpt-oss-20b", "warn", "license:apache-2.0"),
    ("EleutherAI/gpt-j-6b", "warn", "license:apache-2.0"),
    ("chavinlo/gpt4-x-alpaca", "warn", "provenance:unknown"),
    ("nomic-ai/gpt4all-j", "warn", "provenance:unknown"),
    ("google/gemma-2-2b-it", "warn", "license:gemma"),
    ("grok-1", "warn", "license:apache-2.0"),
    ("openchat/openchat-3.5-0106", "warn", "license:apache-2.0"),
    ("deepseek-chat", "warn", "license:deepseek-api"),  # DeepSeek's API terms allow distillation
    # open-weight licenses that forbid it, or allow it with conditions
    ("meta-llama/Llama-2-7b-chat-hf", "block", "license:llama2"),
    ("meta-llama/Meta-Llama-3-8B-Instruct", "block", "license:llama3"),
    ("meta-llama/Llama-3.1-8B-Instruct", "warn", "license:llama3.1"),
    ("Qwen/Qwen-7B-Chat", "block", "license:tongyi-qianwen"),
    ("my-private-model", "warn", "provenance:unknown"),
])
def test_teacher_names(name, verdict, rule):
    source = provenance.check_teacher(name)
    assert source.verdict == verdict, source.to_dict()
    assert [f.rule for f in source.findings] == [rule]
    if verdict == "block":
        assert source.findings[0].citation  # every block cites its clause


def test_a_llama_31_teacher_carries_its_conditions():
    source = provenance.check_teacher("meta-llama/Llama-3.1-8B-Instruct")
    assert 'name must begin with "Llama" (applied at export)' in source.conditions
    assert "§1.b.i" in source.findings[0].citation


def _card(folder, front: str, body: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(f"---\n{front}---\n{body}")


@pytest.mark.parametrize("front, verdict, rule", [
    ("license: apache-2.0\n", "allow", "license:apache-2.0"),
    ("license: llama2\n", "block", "license:llama2"),
    ("license: other\nlicense_name: qwen\n", "warn", "license:qwen"),
    ("license: other\nlicense_name: mrl\n", "warn", "license:mrl"),
    ("license: cc-by-nc-4.0\n", "warn", "license:cc-by-nc-4.0"),
    ("license: bigscience-openrail-m\n", "warn", "license:bigscience-openrail-m"),
    ("license: some-custom-license\n", "warn", "license:some-custom-license"),
    ("language: en\n", "warn", "license:unknown"),
])
def test_teacher_model_cards(tmp_path, front, verdict, rule):
    _card(tmp_path / "teacher", front)
    source = provenance.check_teacher(str(tmp_path / "teacher"))
    assert source.verdict == verdict and [f.rule for f in source.findings] == [rule]
    if "license" in front:
        assert source.findings[0].evidence == [f"{tmp_path / 'teacher/README.md'}:2: license: {source.license}"]


def test_a_card_naming_a_closed_base_model_is_blocked(tmp_path):
    _card(tmp_path / "t", "license: apache-2.0\nbase_model: openai/gpt-4o\n")
    source = provenance.check_teacher(str(tmp_path / "t"))
    assert source.verdict == "block"
    assert source.findings[1].evidence == [f"{tmp_path / 't/README.md'}:3: base_model: openai/gpt-4o"]


def test_a_config_name_decides_when_there_is_no_card(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t/config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-2-13b-hf"}))
    source = provenance.check_teacher(str(tmp_path / "t"))
    assert source.verdict == "block" and source.findings[0].rule == "license:llama2"


def test_a_malformed_front_matter_names_the_line(tmp_path):
    _card(tmp_path / "t", "license: apache-2.0\ntags: [a, b\nlanguage: en\n")
    with pytest.raises(provenance.LocaltuneError, match=r"README.md:4: malformed YAML front matter"):
        provenance.check_teacher(str(tmp_path / "t"))
    (tmp_path / "u").mkdir()
    (tmp_path / "u/README.md").write_text("---\nlicense: mit\n")
    with pytest.raises(provenance.LocaltuneError, match=r"README.md:1: the front matter opened with '---' is never"):
        provenance.check_teacher(str(tmp_path / "u"))


def test_a_gguf_teacher_is_judged_by_its_general_license(tmp_path):
    import gguf

    path = tmp_path / "teacher.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("Some Llama 2 fine-tune")
    w.add_license("llama2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    source = provenance.check_teacher(str(path))
    assert source.verdict == "block" and source.findings[0].evidence == [f"{path} general.license = 'llama2'"]


def _dataset(folder, records, front=None, body=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if front is not None:
        _card(folder, front, body)
    return folder / "train.jsonl"


PLAIN = [{"prompt": "2+2?", "completion": "4"}] * 3
SHAREGPT = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]


@pytest.mark.parametrize("records, front, body, verdict, rules", [
    (PLAIN, "license: apache-2.0\n", "", "allow", ["license:apache-2.0"]),
    (PLAIN, None, "", "warn", ["provenance:unknown"]),
    (PLAIN + [{"prompt": "x", "completion": "y", "model": "gpt-4"}], "license: mit\n", "", "block",
     ["closed-api:openai", "license:mit"]),
    ([{"prompt": "x", "completions": [{"model": "llama-2-7b"}, {"model": "gpt-3.5-turbo"}]}], None, "", "block",
     ["license:llama2", "closed-api:openai"]),
    (SHAREGPT, "license: apache-2.0\n", "", "allow", ["license:apache-2.0"]),  # "from": "gpt" is a role label
    (PLAIN, "license: apache-2.0\n", "The answers were generated with GPT-4 by the authors.\n", "block",
     ["license:apache-2.0", "closed-api:openai"]),
    (PLAIN, "license: apache-2.0\n", "No OpenAI or Anthropic models were used to write this data.\n", "allow",
     ["license:apache-2.0"]),  # a card that names a provider only to deny it
    (PLAIN, "license: apache-2.0\n", "Our model beats Claude on this benchmark.\n", "allow", ["license:apache-2.0"]),
    (PLAIN, "license: apache-2.0\ntags: [synthetic, gpt-4]\n", "", "block",
     ["license:apache-2.0", "closed-api:openai"]),
    (PLAIN, "license: cc-by-nc-4.0\nsource_datasets: [tatsu-lab/alpaca]\n", "", "block",
     ["license:cc-by-nc-4.0", "closed-api:openai", "license:cc-by-nc-4.0"]),  # the upstream's own license too
    ([{"prompt": "x", "completion": "y", "source": "wikipedia"}], "license: cc-by-sa-4.0\n", "", "warn",
     ["license:cc-by-sa-4.0"]),  # a `source` naming a corpus, not a model
    ([{"prompt": "x", "completion": "y", "generator": "acme-internal-7b"}], "license: apache-2.0\n", "", "warn",
     ["provenance:unknown-generator", "license:apache-2.0"]),
])
def test_datasets(tmp_path, records, front, body, verdict, rules):
    source = provenance.check_data(_dataset(tmp_path / "d", records, front, body))
    assert source.verdict == verdict, source.to_dict()
    assert [f.rule for f in source.findings] == rules


def test_record_evidence_names_the_file_line_and_field(tmp_path):
    path = _dataset(tmp_path / "d", PLAIN + [{"prompt": "x", "completions": [{"model": "a"}, {"model": "claude-2"}]}])
    finding = next(f for f in provenance.check_data(path).findings if f.verdict == "block")
    assert finding.evidence == [f"{path}:4: completions[1].model = 'claude-2'"]
    assert "Commercial Terms of Service" in finding.citation


def test_card_text_evidence_names_the_line(tmp_path):
    path = _dataset(tmp_path / "d", PLAIN, "license: apache-2.0\n", "# Data\n\nAll responses were generated by "
                                                                    "ChatGPT. Then we filtered them.\n")
    finding = provenance.check_data(path).findings[1]
    assert finding.evidence == [f"{tmp_path / 'd/README.md'}:6: All responses were generated by ChatGPT."]


def test_license_check_cli_blocks_with_exit_3_and_json(tmp_path):
    result = invoke("license", "check", "--teacher", "gpt-4o", "--teacher", "openai/gpt-oss-20b", "--json")
    assert result.exit_code == 3
    data = json.loads(result.output)
    assert data["verdict"] == "block"
    assert [(s["source"], s["verdict"]) for s in data["findings"]] == [("gpt-4o", "block"),
                                                                       ("openai/gpt-oss-20b", "warn")]
    assert "Use Output to develop models that compete with OpenAI" in data["findings"][0]["findings"][0]["citation"]


def test_license_check_cli_allows_clean_data_and_warns_on_unknown(tmp_path):
    clean = _dataset(tmp_path / "clean", PLAIN, "license: apache-2.0\n")
    result = invoke("license", "check", "--data", clean)
    assert result.exit_code == 0 and result.output.strip().endswith("verdict: allow")
    unknown = _dataset(tmp_path / "unknown", PLAIN)
    result = invoke("license", "check", "--data", unknown)
    assert result.exit_code == 0 and "verdict: warn" in result.output and "no dataset card" in result.output


@pytest.mark.parametrize("args, message", [([], "give at least one --teacher REF or --data PATH"),
                                           (["--data", "missing.jsonl"], "missing.jsonl: no such data file or folder")])
def test_license_check_usage_errors(args, message):
    result = invoke("license", "check", *args)
    assert result.exit_code in (1, 2) and message in result.output


def _distill_recipe(tmp_path, small_model_path, teacher):
    recipe = write_recipe(tmp_path, small_model_path, kind="distill", teacher=teacher)
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n")  # the data itself is clean
    return recipe


def test_a_distill_recipe_with_a_closed_api_teacher_exits_3_and_trains_nothing(tmp_path, small_model_path):
    recipe = _distill_recipe(tmp_path, small_model_path, "gpt-4o")
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 3, result.output
    assert "blocked by the license and provenance gate; nothing was trained" in result.output
    assert "teacher gpt-4o: the teacher is OpenAI's closed API" in result.output
    assert "clause: OpenAI Terms of Use" in result.output and "[[provenance.attest]]" in result.output
    run = only_run(tmp_path / "runs")
    assert json.loads((run / "status.json").read_text())["state"] == "blocked"
    assert json.loads((run / "manifest.json").read_text())["provenance"]["verdict"] == "block"
    assert not list(run.rglob("*.safetensors")) and not (run / "distill").exists()


def test_sft_on_gpt4_answers_is_distillation_too_and_an_attestation_lifts_it(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({**json.loads(line), "model": "gpt-4-0613"}) + "\n"
                            for line in data.read_text().splitlines()))
    blocked = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "blocked")
    assert blocked.exit_code == 3 and f"data {data}: records name 'gpt-4-0613'" in blocked.output
    assert f"evidence: {data}:1: model = 'gpt-4-0613'" in blocked.output

    reason = "Enterprise agreement with OpenAI, ref. 2026-114, allows training on these outputs"
    recipe.write_text(recipe.read_text() + f'\n[[provenance.attest]]\nsource = "train.jsonl"\nreason = "{reason}"\n')
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = only_run(tmp_path / "runs")
    bom = json.loads((run / "manifest.json").read_text())["provenance"]
    assert bom["verdict"] == "allow"  # the one block is attested
    assert bom["findings"][0]["verdict"] == "allow" and bom["findings"][0]["attested"] == reason
    adapter_config = json.loads((run / "sft/adapter_config.json").read_text())
    assert adapter_config["provenance"]["sources"][0]["attested"] == reason
    assert f"attested: {reason}" in (run / "report.md").read_text()


def test_the_bill_of_materials_and_a_required_name_prefix_reach_the_gguf(tmp_path, small_model_path):
    import gguf

    recipe = write_recipe(tmp_path, small_model_path, steps=1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({**json.loads(line), "generator": "meta-llama/Llama-3.1-8B-Instruct"}) + "\n"
                            for line in data.read_text().splitlines()))
    assert invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs").exit_code == 0
    out = tmp_path / "m.gguf"
    result = invoke("export", only_run(tmp_path / "runs"), "--gguf", "--out", out)
    assert result.exit_code == 0, result.output
    assert "a teacher's or dataset's license requires the prefix 'Llama'" in result.output
    fields = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items()}
    assert fields["general.name"].startswith("Llama-recipe-")
    bom = json.loads(fields["localtune.provenance"])
    assert bom["sources"][0]["license"] == "llama3.1" and bom["sources"][0]["verdict"] == "warn"
    assert 'name must begin with "Llama" (applied at export)' in bom["sources"][0]["conditions"]


@pytest.mark.parametrize("extra, message", [
    ('[[provenance.attest]]\nsource = "gpt-4o"\n', "has no reason"),
    ('[[provenance.attest]]\nsource = "gpt-4o"\nreason = "x"\nscope = "all"\n', 'unknown key "scope"'),
    ("[provenance]\nenabled = false\n", 'unknown key "enabled" in [provenance]'),  # no global off switch
])
def test_attestation_mistakes_are_recipe_errors(tmp_path, small_model_path, extra, message):
    recipe = write_recipe(tmp_path, small_model_path)
    recipe.write_text(recipe.read_text() + "\n" + extra)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "runs").exists()


def test_a_run_as_teacher_carries_its_base_and_its_own_gate(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path, steps=1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({**json.loads(line), "model": "gpt-4"}) + "\n"
                            for line in data.read_text().splitlines()))
    recipe.write_text(recipe.read_text() + '\n[[provenance.attest]]\nsource = "train.jsonl"\nreason = "agreement"\n')
    assert invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs").exit_code == 0
    source = provenance.check_teacher(str(only_run(tmp_path / "runs")))
    assert source.license == "apache-2.0"  # the bundled base's card
    carried = source.findings[-1]
    assert carried.rule == "provenance:teacher-run" and "(attested there: agreement)" in carried.reason
    assert source.verdict == "warn"
