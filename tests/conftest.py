from pathlib import Path

import pytest

import localtune  # noqa: F401  (preloads the fast BLAS before mlx)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def offline_home(tmp_path, monkeypatch):
    """Tests never download and never touch the user's cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LOCALTUNE_HOME", str(tmp_path / "localtune-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def make_tiny_model(seed=0, vocab=100, tie=False, hidden=64, layers=2):
    """A random Llama small enough for exact arithmetic checks."""
    import mlx.core as mx
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = llama.ModelArgs(model_type="llama", hidden_size=hidden, num_hidden_layers=layers,
                           intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2,
                           rms_norm_eps=1e-5, vocab_size=vocab, tie_word_embeddings=tie)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def small_model_path():
    path = ROOT / "models" / "small"
    if not (path / "config.json").exists():
        pytest.skip("models/small is not built (python models/build.py)")
    return path


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repo root, as the README's commands do."""
    monkeypatch.chdir(ROOT)
    return ROOT
