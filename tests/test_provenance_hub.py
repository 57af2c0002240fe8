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


