"""JSONL reading, chat templating with loss masks, truncation and resumable batching."""
from pathlib import Path

import numpy as np
import pytest

from localtune.errors import DataError
from localtune.train import data

BAD = Path(__file__).parent / "bad_data"


@pytest.mark.parametrize("name,where,expected", [
    ("bad_json", ":2", "not valid JSON"),
    ("unknown_format", ":3", "no known format in columns ['answer', 'question']"),
    ("mixed_formats", ":2", "one dataset holds one format"),
    ("bad_role", ":1", "messages[1] must be"),
    ("no_assistant", ":1", 'no "assistant" message'),
    ("completion_not_string", ":1", '"completion" must be a string'),
    ("not_object", ":1", "expected a JSON object"),
    ("empty", "", "the dataset is empty"),
    ("empty_messages", ":1", "non-empty list"),
    ("pref_missing_chosen", ":2", 'preference row is missing "chosen"'),
    ("pref_chosen_not_text", ":1", '"chosen" must be a non-empty string or a list of messages'),
    ("pref_bad_message", ':1: "chosen"', "messages[0] must be"),
])
def test_bad_rows_name_file_and_line(name, where, expected):
    path = BAD / f"{name}.jsonl"
    with pytest.raises(DataError) as err:
        data.read_jsonl(path)
    assert err.value.message.startswith(f"{path}{where}")
    assert expected in err.value.message


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        data.read_jsonl(tmp_path / "x.jsonl")


@pytest.fixture(scope="module")
def tokenizer():
    from mlx_lm.utils import load_tokenizer

    path = Path(__file__).resolve().parent.parent / "models" / "small"
    if not (path / "tokenizer.json").exists():
        pytest.skip("models/small is not built")
    return load_tokenizer(path)


def learned_text(tokenizer, ex):
    return tokenizer.decode([int(t) for t, m in zip(ex.tokens, ex.loss_mask) if m])


def test_only_assistant_turns_are_learned(tokenizer):
    enc = data.Encoder(tokenizer)
    ex = enc.messages([{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
                       {"role": "assistant", "content": "one"}, {"role": "user", "content": "second"},
                       {"role": "assistant", "content": "two"}])
    learned = learned_text(tokenizer, ex)
    assert "one" in learned and "two" in learned
    assert "first" not in learned and "second" not in learned and "brief" not in learned
    assert "<|im_end|>" in learned  # the model must learn to stop


def test_prompt_completion_uses_the_chat_template(tokenizer):
    enc = data.Encoder(tokenizer)
    ex = enc.completion("Convert to ISO 8601: March 5, 2021", "2021-03-05")
    full = tokenizer.decode(ex.tokens.tolist())
    assert "<|im_start|>user" in full and "<|im_start|>assistant" in full
    assert learned_text(tokenizer, ex).startswith("2021-03-05")


def test_mask_prompt_false_learns_everything_but_the_first_token(tokenizer):
    ex = data.Encoder(tokenizer, mask_prompt=False).completion("a", "b")
    assert not ex.loss_mask[0] and ex.loss_mask[1:].all()


def test_truncation_is_counted_and_empty_targets_are_dropped(tokenizer):
    rows = [{"prompt": "x " * 50, "completion": "y"}, {"prompt": "short", "completion": "answer " * 20},
            {"prompt": "a", "completion": "b"}]
    ds = data.encode(rows, "completion", tokenizer, max_seq_len=24)
    assert ds.truncated == 2 and ds.dropped == 1 and len(ds) == 2
    assert max(len(e.tokens) for e in ds.examples) == 24


def test_chat_data_without_a_chat_template_is_refused(tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(DataError, match="needs a chat template"):
        data.encode([{"messages": []}], "messages", NoTemplate(), 64, source="train.jsonl")


def toy_dataset(n=20):
    rng = np.random.default_rng(0)
    exs = [data.Example(np.arange(int(k), dtype=np.int32), np.ones(int(k), bool)) for k in rng.integers(4, 40, n)]
    return data.Dataset(exs, source="toy")


def test_batches_resume_from_their_cursor():
    a = data.Batches(toy_dataset(), 4, seed=3)
    seen = [next(a).inputs for _ in range(7)]  # crosses an epoch (5 batches each)
    b = data.Batches(toy_dataset(), 4, seed=3)
    for _ in range(3):
        next(b)
    c = data.Batches(toy_dataset(), 4, seed=3)
    c.restore(b.state())
    for expected in seen[3:]:
        np.testing.assert_array_equal(next(c).inputs, expected)


def test_length_grouping_pads_less_than_random_batches():
    ds = toy_dataset(200)
    def padding(grouped):
        b = data.Batches(ds, 8, seed=0, group_by_length=grouped)
        batches = [next(b) for _ in range(b.batches_per_epoch)]
        return sum(x.inputs.size - x.n_real_tokens for x in batches)
    assert padding(True) < 0.5 * padding(False)


def test_packing_keeps_every_example_whole_and_fills_rows():
    ds = toy_dataset(50)
    bins = data._pack(ds.examples, 64)
    assert sorted(id(e) for group in bins for e in group) == sorted(id(e) for e in ds.examples)
    assert all(sum(len(e.tokens) for e in group) <= 64 for group in bins)
    b = data.Batches(ds, 2, seed=0, packing=True, max_seq_len=64)
    batches = [next(b) for _ in range(b.batches_per_epoch)]
    fill = sum(x.n_real_tokens for x in batches) / sum(x.inputs.size for x in batches)
    assert fill > 0.9


def test_too_few_examples_for_the_batch_size():
    with pytest.raises(DataError, match="20 examples is fewer than batch_size=32"):
        data.Batches(toy_dataset(), 32, seed=0)
