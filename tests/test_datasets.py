"""Data as users have it: every source (files of each type, folders, hf: datasets from the cache) and
every format (detected, or mapped with columns), with the errors bad input gets."""
import csv
import gzip
import hashlib
import json
from pathlib import Path

import pytest
from hf_cache import card, lay_out, parquet_bytes

from localtune import datasets
from localtune.datasets import Spec
from localtune.errors import DataError

ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(path, accept=None, **keys) -> datasets.Table:
    return datasets.read(Spec(str(path), **keys), accept)


# Sources -------------------------------------------------------------------------------------

def test_each_file_type_gives_the_same_rows(tmp_path):
    jsonl(tmp_path / "a.jsonl", ROWS)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "a.json").write_text(json.dumps(ROWS, indent=2))
    (tmp_path / "b.json").write_text(json.dumps({"version": 1, "data": ROWS}))
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "completion"])
        w.writeheader()
        w.writerows(ROWS)
    (tmp_path / "a.parquet").write_bytes(parquet_bytes(ROWS, row_group_size=4))
    for name in ("a.jsonl", "a.jsonl.gz", "a.json", "b.json", "a.csv", "a.parquet"):
        table = read(tmp_path / name)
        assert table.rows == ROWS and table.fmt == "completion", name
    assert read(tmp_path / "a.json").where[1] == f"{tmp_path / 'a.json'}:6"  # the line the object starts on
    assert read(tmp_path / "a.csv").where[1] == f"{tmp_path / 'a.csv'}:3"
    assert read(tmp_path / "a.parquet").where[5] == f"{tmp_path / 'a.parquet'}: row group 1, row 1"


def test_a_folder_reads_its_files_in_order_and_split_chooses(tmp_path):
    jsonl(tmp_path / "part-1.jsonl", ROWS[:3])
    jsonl(tmp_path / "part-2.jsonl", ROWS[3:])
    (tmp_path / "README.md").write_text(card())
    assert read(tmp_path).rows == ROWS
    split = tmp_path / "split"
    split.mkdir()
    jsonl(split / "train.jsonl", ROWS[:4])
    jsonl(split / "test.jsonl", ROWS[4:])
    assert read(split).rows == ROWS[:4]  # a folder whose files name splits reads train by default
    assert read(split, split="test").rows == ROWS[4:]
    with pytest.raises(DataError, match="no 'validation' split; its files name the splits test, train"):
        read(split, split="validation")


def test_limit_and_shuffle_seed_choose_rows(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", ROWS)
    assert read(path, limit=2).rows == ROWS[:2]
    shuffled = read(path, limit=3, shuffle_seed=7).rows
    assert shuffled == read(path, limit=3, shuffle_seed=7).rows and len(shuffled) == 3
    assert sorted(r["prompt"] for r in read(path, shuffle_seed=7).rows) == sorted(r["prompt"] for r in ROWS)
    assert [r["prompt"] for r in read(path, shuffle_seed=7).rows] != [r["prompt"] for r in ROWS]


# Formats -------------------------------------------------------------------------------------

SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello."}]}
ALPACA = {"instruction": "Add.", "input": "2 + 2", "output": "4"}
ULTRA = {"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
         "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


@pytest.mark.parametrize("row,accept,fmt,want", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, None, "messages",
     {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}),
    (SHAREGPT, None, "messages", {"messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello."}]}),
    (ALPACA, None, "completion", {"prompt": "Add.\n\n2 + 2", "completion": "4"}),
    ({"prompt": "a", "completion": "b"}, None, "completion", {"prompt": "a", "completion": "b"}),
    ({"text": "plain"}, None, "text", {"text": "plain"}),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, None, "preference",
     {"prompt": "p", "chosen": "c", "rejected": "r"}),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}, None,
     "preference", {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": "Hello!", "rejected": "Go away."}),
    ({"chosen": ULTRA["chosen"], "rejected": ULTRA["rejected"]}, None, "preference",
     {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
      "rejected": [{"role": "assistant", "content": "Go away."}]}),
    (ULTRA, ("messages", "completion", "text"), "messages", ULTRA),  # an sft stage reads UltraFeedback's messages
    ({"prompt": "p", "completion": "c", "label": True}, None, "labelled",
     {"prompt": "p", "completion": "c", "label": True}),
    ({"prompt": "p", "answer": "42"}, None, "prompt", {"prompt": "p", "answer": "42"}),
])
def test_each_format_is_detected_and_made_canonical(tmp_path, row, accept, fmt, want):
    table = datasets.read(Spec(str(jsonl(tmp_path / "a.jsonl", [row]))), accept)
    assert (table.fmt, table.rows[0]) == (fmt, want)


def test_ultrafeedback_conversations_for_dpo_find_the_shared_prompt(tmp_path):
    table = read(jsonl(tmp_path / "a.jsonl", [ULTRA]), accept=("preference",))
    row = table.rows[0]  # chosen and rejected hold the user's turn too: it becomes the prompt, once
    assert row["prompt"] == [{"role": "user", "content": "Hi"}]
    assert row["chosen"] == [{"role": "assistant", "content": "Hello!"}]
    assert row["rejected"] == [{"role": "assistant", "content": "Go away."}]
    assert "whole conversations" in table.detected and "also fits: OpenAI messages" in table.detected


def test_columns_keep_a_rows_tools(tmp_path):
    chat = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Sunny."}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    path = jsonl(tmp_path / "a.jsonl", [{"conversation": chat, "tools": tools}])
    assert read(path, columns={"messages": "conversation"}).rows[0]["tools"] == tools


def test_split_keys_on_one_file_are_refused(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(DataError, match="split, config choose among a dataset's files, and this is one file"):
        read(path, split="test", config="x")


def test_detection_is_reported_in_words(tmp_path):
    table = read(jsonl(tmp_path / "a.jsonl", [SHAREGPT] * 3))
    assert table.detected == "ShareGPT conversations (conversations: from/value), 3 rows from 1 file"


def test_columns_map_any_names(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a", "id": 3}])
    table = read(path, columns={"prompt": "question", "completion": "answer"})
    assert table.rows == [{"question": "q", "answer": "a", "id": 3, "prompt": "q", "completion": "a"}]
    assert "via columns" in table.detected  # other columns stay: python rewards read them


def test_ambiguous_rows_stop_with_the_choices(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"text": "t", "messages": ULTRA["messages"]}])
    with pytest.raises(DataError) as err:
        read(path, accept=("messages", "completion", "text"))
    assert f"{path}:1: the rows fit more than one format" in err.value.message
    assert 'columns = { messages = "messages" }' in err.value.message
    assert 'columns = { text = "text" }' in err.value.message
    assert read(path, accept=("messages", "completion", "text"), columns={"text": "text"}).fmt == "text"


# Bad input ------------------------------------------------------------------------------------

def test_a_missing_column_lists_the_columns_that_exist(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"question": "q", "reply": "a"}])
    with pytest.raises(DataError) as err:
        read(path, columns={"prompt": "question", "completion": "answer"})
    assert err.value.message.startswith(f'{path}:1: no column "answer"')
    assert "this row has question, reply" in err.value.message


def test_a_file_that_mixes_formats_names_the_first_line_that_differs(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [SHAREGPT, SHAREGPT, ALPACA, SHAREGPT])
    with pytest.raises(DataError) as err:
        read(path)
    assert err.value.message.startswith(f"{path}:3: this row is Alpaca instructions")
    assert "the rows before it are ShareGPT conversations" in err.value.message


@pytest.mark.parametrize("name,content,where,expected", [
    ("a.json", '[{"prompt": "a", "completion": "b"},\n {"prompt": "c" "completion": "d"}]', ":2", "not valid JSON"),
    ("a.jsonl.gz", b"\x1f\x8b\x08\x00garbage", "", "cannot be read"),
    ("a.json.gz", gzip.compress(b'[{"prompt": "a", "completion": "b"}]', mtime=0)[:-12], "", "cannot be read"),
    ("a.jsonl.gz", gzip.compress(b'{"text": "a"}\n', mtime=0)[:12] + b"\xff" * 20, "", "cannot be read"),
    ("a.csv", 'prompt,completion\na,b,c\n', ":2", "3 cells but the header names 2 columns"),
    ("a.csv", 'prompt,completion\na,b\nc\n', ":3", "1 cells but the header names 2 columns"),
    ("a.parquet", b"PAR1 not really parquet", "", "not a readable Parquet file"),
    ("a.jsonl", '{"conversations": [{"from": "alien", "value": "x"}]}\n', ":1", 'from = "alien"'),
    ("a.jsonl", '{"prompt": "p", "completion": "c", "label": "maybe"}\n', ":1", '"label" must be true or false'),
])
def test_a_file_that_does_not_parse_names_the_place(tmp_path, name, content, where, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as err:
        read(path)
    assert err.value.message.startswith(f"{path}{where}") and expected in err.value.message


def test_a_broken_parquet_row_group_is_named(tmp_path):
    path = tmp_path / "a.parquet"
    good = parquet_bytes(ROWS, row_group_size=3)
    path.write_bytes(good[:4] + bytes(60) + good[64:])  # the first row group's pages overwritten
    with pytest.raises(DataError) as err:
        read(path)
    assert err.value.message.startswith(f"{path}: row group 0 cannot be read")


# hf: datasets, from a cache laid out as huggingface-hub writes it -----------------------------

REPO = "someone/tiny-chat"
CONFIGS = ("configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
           "  - split: test\n    path: data/test-*\n- config_name: extra\n  data_files: extra/*.parquet\n")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    chat = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}],
             "topic": "greetings"} for i in range(8)]
    lay_out(cache, REPO, {"README.md": card(configs=CONFIGS), "data/train-00000-of-00001.parquet":
                          parquet_bytes(chat[:6]), "data/test-00000-of-00001.parquet": parquet_bytes(chat[6:]),
                          "extra/x.parquet": parquet_bytes([{"text": "extra"}])})
    return cache


def test_an_hf_dataset_reads_the_split_from_the_cache_offline(hub):
    table = datasets.read(Spec(f"hf:{REPO}"))
    assert len(table.rows) == 6 and table.fmt == "messages" and table.rows[0]["topic"] == "greetings"
    assert table.source.card.name == "README.md"
    assert "data/train-00000-of-00001.parquet: row group 0, row 0" in table.where[0]
    assert [r["messages"][0]["content"] for r in datasets.read(Spec(f"hf:{REPO}", split="test")).rows] == \
        ["hi 6", "hi 7"]
    assert datasets.read(Spec(f"hf:{REPO}", config="extra")).rows == [{"text": "extra"}]
    assert len(datasets.read(Spec(f"hf:{REPO}", files="data/*.parquet")).rows) == 8


@pytest.mark.parametrize("keys,expected", [
    ({"config": "extras"}, "no config 'extras'. Did you mean \"extra\"?"),
    ({"split": "validation"}, "config 'default' has no split 'validation'; it has train, test"),
])
def test_hf_configs_and_splits_are_checked_against_the_card(hub, keys, expected):
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        datasets.read(Spec(f"hf:{REPO}", **keys))


def test_a_config_by_data_dir_and_split_files_by_dict(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    configs = ("configs:\n- config_name: a\n  data_dir: a\n- config_name: b\n  data_files:\n"
               "    train: b/x.jsonl\n    test: [b/y.jsonl]\n- config_name: c\n")
    lay_out(tmp_path, "o/d", {"README.md": card(configs=configs), "a/train.jsonl": '{"text": "a train"}\n',
                              "a/test.jsonl": '{"text": "a test"}\n', "b/x.jsonl": '{"text": "b x"}\n',
                              "b/y.jsonl": '{"text": "b y"}\n'})
    assert datasets.read(Spec("hf:o/d", config="a", split="test")).rows == [{"text": "a test"}]
    assert datasets.read(Spec("hf:o/d", config="b", split="test")).rows == [{"text": "b y"}]
    with pytest.raises(DataError, match="config 'c' names no data_files and no data_dir"):
        datasets.read(Spec("hf:o/d", config="c"))


def test_golden_and_valid_sets_never_read_a_train_split_by_default(tmp_path):
    from localtune import recipe

    folder = tmp_path / "golden"
    folder.mkdir()
    jsonl(folder / "train.jsonl", ROWS[:3])
    jsonl(folder / "test.jsonl", ROWS[3:])
    text = ('[model]\npath = "m"\n[[stages]]\nkind = "sft"\ndata = "hf:o/d"\nvalid = "hf:o/d"\nsteps = 1\n'
            '[eval]\ndata = "golden"\n')
    r = recipe.parse(text, str(tmp_path / "r.toml"), str(tmp_path))
    assert datasets.read(datasets.eval_spec(r)).rows == ROWS[3:]
    with pytest.raises(DataError, match='names no split, so it would read the training split'):
        datasets.spec_of(r, r.stages[0], valid=True)


def test_offline_and_not_cached_names_the_download_command(hub):
    with pytest.raises(DataError) as err:
        datasets.read(Spec("hf:someone/elsewhere", split="train"))
    assert "not in the local Hugging Face cache, and HF_HUB_OFFLINE=1" in err.value.message
    assert ('`hf download someone/elsewhere --repo-type dataset --include "*train*" --include README.md`'
            in err.value.message)
    with pytest.raises(DataError) as err:
        datasets.read(Spec("hf:someone/elsewhere", config="chat", split="test"))
    assert '--include "*chat/*test*"' in err.value.message  # matches data/chat/test-00000-of-00001.parquet


def test_a_failed_download_caches_nothing(hub, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("network unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    with pytest.raises(DataError) as err:
        datasets.read(Spec("hf:someone/elsewhere"))
    assert "could not download from the Hugging Face hub (ConnectionError: network unreachable)" in err.value.message
    assert not list(hub.glob("datasets--someone--elsewhere*"))


def test_the_fingerprint_follows_content_and_selection(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", ROWS)
    plain = datasets.fingerprint(Spec(str(path)))
    assert plain == hashlib.sha256(path.read_bytes()).hexdigest()  # one plain file: its hash, as before
    assert datasets.fingerprint(Spec(str(path), limit=2)) != plain
    jsonl(path, ROWS[:5])
    assert datasets.fingerprint(Spec(str(path))) != plain


# The firewall's commands read every source --------------------------------------------------

def test_data_check_and_split_read_any_source(tmp_path, hub):
    from click.testing import CliRunner

    from localtune.cli import cli

    golden = tmp_path / "golden.parquet"
    golden.write_bytes(parquet_bytes([{"prompt": "hi 3", "completion": "yo 3"}, {"prompt": "far", "completion": "x"}]))
    result = CliRunner().invoke(cli, ["data", "check", f"hf:{REPO}", "--against", str(golden)])
    assert result.exit_code == 1, result.output  # "hi 3 yo 3" is in the dataset's train split
    assert "1 of 2 golden rows" in result.output and "train-00000-of-00001.parquet: row group 0, row 3" in result.output

    rows = [{"instruction": f"Say {w}.", "output": w} for w in ("one", "two", "three", "four", "five", "six")]
    with open(tmp_path / "alpaca.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["instruction", "output"])
        w.writeheader()
        w.writerows(rows)
    result = CliRunner().invoke(cli, ["data", "split", str(tmp_path / "alpaca.csv"), "--test", "0.34",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    train = [json.loads(x) for x in (tmp_path / "out/train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (tmp_path / "out/test.jsonl").read_text().splitlines()]
    assert len(train) + len(test) == 6 and len(test) == 2
    assert {"prompt", "completion"} <= set(train[0])  # written in the canonical format


def test_rows_with_an_unmapped_answer_column_suggest_the_mapping(tmp_path, small_model_path):
    from click.testing import CliRunner

    from localtune.cli import cli

    jsonl(tmp_path / "qa.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(8)])
    (tmp_path / "r.toml").write_text(f'[model]\npath = "{small_model_path}"\n[[stages]]\nkind = "sft"\n'
                                     'data = "qa.jsonl"\nsteps = 1\n')
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "r.toml"), "--no-tui", "--runs-dir",
                                      str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert 'columns = { completion = "response" } (the rows have prompt, response)' in result.output
