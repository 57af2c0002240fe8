import os
from pathlib import Path

import pytest

# Under xdist every worker shares the cores: left alone, each one's MKL runs a thread per core, and on 2 cores
# two workers' OpenMP threads spin against each other. One BLAS thread per worker (cores // workers; set before
# MKL loads, inherited by the CLI and mlx.launch subprocesses) measured, on tests/test_distributed.py with -n 0:
# 97 s of CPU instead of 125 s; a SmolLM2 QLoRA run: 51 s instead of 74 s. A variable already set is kept.
# A test that reproduces numbers measured with MKL's own threads says so with `blas_threads(N)` (below).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    for _var in ("MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import localtune  # noqa: E402  (preloads the fast BLAS before mlx)
import localtune.device  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def blas_threads(request):
    """`@pytest.mark.blas_threads(N)`: MKL runs N threads for this test, set at run time (MKL_Set_Num_Threads).
    RL recipes' sampled trajectories follow the BLAS reduction order: rlhf-rules.toml passes the ISO rule on 56%
    of answers after PPO with 2 threads (the README's number, reproduced this way), 28% with 1."""
    mark = request.node.get_closest_marker("blas_threads")
    path = localtune.device.blas_in_use()
    if mark is None or not path or "mkl" not in path:
        yield
        return
    import ctypes

    lib = ctypes.CDLL(path)
    before = lib.MKL_Get_Max_Threads()
    lib.MKL_Set_Num_Threads(mark.args[0])
    try:
        yield
    finally:
        lib.MKL_Set_Num_Threads(before)


@pytest.fixture(autouse=True)
def offline_home(request, tmp_path, tmp_path_factory, monkeypatch):
    """Tests never download and never touch the user's cache. The slow and release tests share one folder of
    imported models for the session (both workers; an import publishes by rename): each SmolLM2 or Gemma 3 import
    costs 10-25 s."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    home = tmp_path / "localtune-home"
    monkeypatch.setenv("LOCALTUNE_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    if request.node.get_closest_marker("slow") or request.node.get_closest_marker("release"):
        session = tmp_path_factory.getbasetemp()
        shared = (session.parent if os.environ.get("PYTEST_XDIST_WORKER") else session) / "imported-models"
        shared.mkdir(exist_ok=True)
        home.mkdir(exist_ok=True)
        (home / "models").symlink_to(shared, target_is_directory=True)


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


# Longest first, so that both workers finish together. The slow suite (`--dist loadgroup`: one test per unit,
# dealt out in this order, each worker holding the next one) orders by each test's `slow(minutes=N)` (or
# `release(minutes=N)`), N being its minutes on 2 cores; a test without N counts as UNKNOWN_MINUTES, so it starts
# early rather than running alone at the end. The default suite (`--dist loadfile --no-loadscope-reorder`: whole
# files) starts with its longest files, which xdist would otherwise order by their number of tests.
UNKNOWN_MINUTES = 10
LONGEST_FILES = ("test_export.py", "test_cli.py", "test_tui_e2e.py", "test_distill.py", "test_chat.py",
                 "test_distributed.py", "test_families.py", "test_forgetting.py", "test_grpo.py", "test_damage.py",
                 "test_dpo.py", "test_recipes_e2e.py", "test_device_policy.py")


def _minutes(item) -> float:
    mark = item.get_closest_marker("slow") or item.get_closest_marker("release")
    return mark.kwargs.get("minutes", UNKNOWN_MINUTES) if mark else 0


def _file_rank(item) -> int:
    name = item.path.name
    return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: (-_minutes(item), _file_rank(item)))  # stable: a file's tests keep their order
