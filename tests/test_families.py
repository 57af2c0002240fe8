"""The support matrix, family by family, on tiny random-weight models built here.

Each family's model comes from mlx-lm's own ModelArgs with the family's quirks in the config
(Gemma 3's sliding-window layers and query scale, Qwen3's q/k norms, tied embeddings...), and its
tokenizer is built here the way a GGUF import builds one, with the family's pre-tokenizer,
special tokens and chat template. Every capability the registry claims is exercised: the whole
chain of methods (QLoRA: SFT, DPO, reward, PPO; a float base: DoRA SFT, then logits distillation),
fuse, GGUF export at q8_0 verified in llama.cpp, the GGUF LoRA adapter verified, and GGUF import
of the exported file back to the same logits. docs/models.md's matrix must be the registry's.
"""
import importlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFReader
from mlx.utils import tree_flatten
from test_cli import invoke
from test_gguf_import import bpe_vocab

from localtune import export
from localtune.models import families
from localtune.models.families.gemma import GEMMA_TEMPLATE
from localtune.models.families.gemma4 import GEMMA4_TEMPLATE
from localtune.models.gguf_tokenizer import build_tokenizer, sentencepiece_model

pytest.importorskip("llama_cpp")
ROOT = Path(__file__).resolve().parent.parent

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
          " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
PHI4 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
SMOLLM3 = ("{{ '<|im_start|>system\\n' }}"  # always a system turn (the real one adds a metadata block there)
           "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set turns = messages[1:] %}"
           "{% else %}{% set turns = messages %}{% endif %}{{ '<|im_end|>\\n' }}"
           "{% for m in turns %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MISTRAL3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                     "{{ '[SYSTEM_PROMPT]' + m['content'] + '[/SYSTEM_PROMPT]' }}{% elif m['role'] == 'user' %}"
                     "{{ '[INST]' + m['content'] + '[/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}"
                     "{% endfor %}")
BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256)

# model_type -> (mlx-lm module, config beyond BASE, tokenizer: (kind, pre-tokenizer, specials, template,
#                                                               bos, eos, add_bos, add_space_prefix))
CASES = {
    "llama": ("llama", {"tie_word_embeddings": False},
              ("gpt2", "llama-bpe", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                     "<|end_header_id|>", "<|eot_id|>"], LLAMA3, 0, 4, True, False)),
    "mistral": ("llama", {"tie_word_embeddings": False, "head_dim": 16},
                ("llama", "default", ["<unk>", "<s>", "</s>"], "{{ bos_token }}{% for m in messages %}"
                 "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                 "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}", 1, 2, True, True)),
    "qwen2": ("qwen2", {"tie_word_embeddings": True},
              ("gpt2", "qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, None, 2, False, False)),
    "qwen3": ("qwen3", {"tie_word_embeddings": False, "head_dim": 16},
              ("gpt2", "qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, None, 2, False, False)),
    "gemma3_text": ("gemma3_text", {"num_hidden_layers": 6, "num_key_value_heads": 1, "head_dim": 16,
                                    "query_pre_attn_scalar": 16, "sliding_window": 8, "sliding_window_pattern": 6,
                                    "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0},
                    ("llama", "default", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                     GEMMA_TEMPLATE, 2, 5, True, False)),
    # Phi-4-mini: a quarter of each head without rotary, tied embeddings, o200k byte-level BPE; sliding_window
    # is in its config but neither mlx-lm nor llama.cpp applies it (longrope: test_phi3_longrope_...)
    "phi3": ("phi3", {"partial_rotary_factor": 0.75, "tie_word_embeddings": True, "sliding_window": 262144,
                      "original_max_position_embeddings": 64},
             ("gpt2", "gpt-4o", ["<|endoftext|>", "<|system|>", "<|end|>", "<|user|>", "<|assistant|>"], PHI4,
              0, 0, False, False)),
    # SmolLM3-3B: layer 3 without RoPE (every 4th, as its no_rope_layers lists), rope theta 5e6, tied
    # embeddings, Llama 3's byte-level BPE with ChatML turns after an ever-present system turn
    "smollm3": ("smollm3", {"num_hidden_layers": 4, "rope_theta": 5000000.0, "tie_word_embeddings": True,
                            "no_rope_layer_interval": 4, "no_rope_layers": [1, 1, 1, 0]},
                ("gpt2", "llama-bpe", ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"],
                 SMOLLM3, 0, 3, False, False)),
    # YaRN rope (theta only in rope_parameters) and Llama 4's query temperature past 32 positions; Tekken BPE
    "ministral3": ("ministral3", {"tie_word_embeddings": True, "head_dim": 16, "rope_theta": None,
                                  "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 8.0,
                                                      "original_max_position_embeddings": 32, "beta_fast": 32.0,
                                                      "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                                      "llama_4_scaling_beta": 0.1}},
                   ("gpt2", "tekken", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                                       "[/SYSTEM_PROMPT]"], MISTRAL3_TEMPLATE, 1, 2, True, False)),
    # every layer MoE (llama.cpp's qwen3moe has no dense layer), 4 experts, top-2, renormalised
    "qwen3_moe": ("qwen3_moe", {"tie_word_embeddings": False, "head_dim": 16, "num_experts": 4,
                                "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
                                "mlp_only_layers": [], "norm_topk_prob": True},
                  ("gpt2", "qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, None, 2, False, False)),
    # per-layer embeddings, KV-shared last layers (double-wide MLP), a wider global head with proportional
    # partial RoPE, soft-capped logits. Its real tokenizer (llama.cpp's "gemma4" BPE) has no builder here:
    # SentencePiece with its specials stands in (the GGUF capabilities are in its limits).
    "gemma4_text": ("gemma4_text", {"num_hidden_layers": 6, "num_key_value_heads": 1, "head_dim": 16,
                                    "global_head_dim": 32, "sliding_window": 8, "sliding_window_pattern": 3,
                                    "num_kv_shared_layers": 2, "hidden_size_per_layer_input": 8,
                                    "final_logit_softcapping": 30.0, "use_double_wide_mlp": True,
                                    "rope_parameters": {
                                        "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                                                           "rope_type": "proportional"},
                                        "sliding_attention": {"partial_rotary_factor": 1.0, "rope_theta": 10000.0,
                                                              "rope_type": "default"}}},
                    ("llama", "default", ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"],
                     GEMMA4_TEMPLATE, 2, 5, True, False)),
    # gated-DeltaNet layers with twice as many value heads as key heads (llama.cpp reorders them), every
    # 2nd layer gated full attention rotating a quarter of its head (M-RoPE sections), (1 + w) norms
    "qwen3_5": ("qwen3_5", {"tie_word_embeddings": True, "head_dim": 32, "full_attention_interval": 2,
                            "rope_theta": 10000000.0,
                            "num_hidden_layers": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                            "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
                            "rope_parameters": {"type": "default", "rope_theta": 10000000.0,
                                                "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1]}},
                ("gpt2", "qwen35", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, None, 2, False, False)),
}


def spm_tokens(specials):
    """Specials, the 256 byte tokens, and scored pieces for the words of the test data."""
    pieces = ["▁", "▁the", "▁Date", "Date", ":", "▁of", "▁in", "▁this", "▁date", "▁digits", "20", "19", "0", "1",
              "2", "3", "4", "5", "6", "7", "8", "9", "-", "/", ".", ",", "e", "a", "t", "r", "i", "n", "s", "o"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2 if t == "<unk>" else 3 for t in specials] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def tokenizer_meta(spec) -> dict:
    kind, pre, specials, template, bos, eos, add_bos, space = spec
    if kind == "llama":
        tokens, types, scores = spm_tokens(specials)
        meta = {"tokenizer.ggml.scores": scores, "tokenizer.ggml.unknown_token_id": specials.index("<unk>"),
                "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_space_prefix": space}
    else:
        from test_gguf_import import BPE_MERGES

        tokens, types = bpe_vocab()
        tokens, types = specials + tokens[3:], [3] * len(specials) + types[3:]  # this family's specials
        meta = {"tokenizer.ggml.merges": BPE_MERGES}
    meta.update({"tokenizer.ggml.model": kind, "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
                 "tokenizer.ggml.token_type": types, "tokenizer.ggml.eos_token_id": eos,
                 "tokenizer.ggml.add_bos_token": add_bos, "tokenizer.chat_template": template})
    if bos is not None:
        meta["tokenizer.ggml.bos_token_id"] = bos
    return meta


def make_folder(root: Path, model_type: str, overrides: dict | None = None) -> Path:
    module_name, extra, spec = CASES[model_type]
    meta = tokenizer_meta(spec)
    vocab = len(meta["tokenizer.ggml.tokens"])
    config = {"model_type": model_type, **BASE, **extra, **(overrides or {}), "vocab_size": vocab}
    if model_type == "gemma4_text":
        config["vocab_size_per_layer_input"] = vocab
    module = importlib.import_module(f"mlx_lm.models.{module_name}")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    rng = np.random.default_rng(0)  # mlx-lm initialises norms and biases to constants: make them count
    params = {k: mx.array(rng.normal(0 if model_type == "gemma3_text" else 1, 0.2, v.shape), mx.float32)
              if k.endswith("bias") or "norm" in k else v for k, v in tree_flatten(model.parameters())}
    folder = root / model_type
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), params)
    tokenizer, tokenizer_config = build_tokenizer(meta, config)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if (spm := sentencepiece_model(meta)) is not None:
        (folder / "tokenizer.model").write_bytes(spm)
    eos = meta["tokenizer.ggml.eos_token_id"]
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return folder


def data(root: Path) -> None:
    sft = (ROOT / "data/date_prefs/sft.jsonl").read_text().splitlines()[:8]
    pairs = (ROOT / "data/date_prefs/train.jsonl").read_text().splitlines()[:8]
    (root / "sft.jsonl").write_text("\n".join(sft) + "\n")
    (root / "pairs.jsonl").write_text("\n".join(pairs) + "\n")


def recipe(root: Path, folder: Path, name: str, stages: list[dict], quantize: bool) -> Path:
    common = {"steps": 2, "batch_size": 2, "max_seq_len": 64, "learning_rate": 1e-3, "save_every": 2,
              "eval_every": 0, "report_every": 1}
    lines = [f'name = "{name}"', f'[model]\npath = "{folder}"']
    if quantize:
        lines.append("[model.quantize]\nbits = 8\ngroup_size = 32")  # 8 bits: the bases stay close, so the
        # adapter checks of `export --lora --verify` (limits scaled by the bases' gap) stay sharp
    for stage in stages:
        adapter = stage.pop("adapter", None)
        lines.append("[[stages]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in {**common, **stage}.items()]
        if adapter:
            lines.append("[stages.adapter]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in adapter.items()))
    lines.append('[eval]\ngeneral = "none"')  # the forgetting check's 130 texts: not what is tested here
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def only_run(runs: Path) -> Path:
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="module", params=list(CASES))
def family_folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    data(root)
    return request.param, root, make_folder(root, request.param)


def test_every_method_fuse_and_both_exports_verify_in_llama_cpp(family_folder, monkeypatch):
    model_type, root, folder = family_folder
    support = families.family(model_type).support()  # a capability in the family's limits is refused, not run
    monkeypatch.setenv("LOCALTUNE_HOME", str(root / "home"))
    lora = {"rank": 4, "alpha": 8}
    stages = [{"name": "sft", "kind": "sft", "data": "sft.jsonl", "adapter": lora},
              {"name": "dpo", "kind": "dpo", "data": "pairs.jsonl", "beta": 0.1, "adapter": lora}]
    if support["ppo"] is True:
        stages += [{"name": "reward", "kind": "reward", "data": "pairs.jsonl"},
                   {"name": "ppo", "kind": "ppo", "data": "pairs.jsonl", "reward_model": "reward", "minibatch_size": 2,
                    "ppo_epochs": 1, "max_new_tokens": 4, "heldout_prompts": 2}]
    names = [stage["name"] for stage in stages]
    chain = recipe(root, folder, "chain", stages, quantize=True)
    result = invoke("run", chain, "--no-tui", "--runs-dir", root / "runs")
    assert result.exit_code == 0, result.output
    run = only_run(root / "runs")
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    assert all((run / stage / "adapters.safetensors").exists() for stage in names)

    adapter = root / "sft-adapter.gguf"
    result = invoke("export", run / "sft", "--lora", "--out", adapter, "--verify")
    if support["gguf_lora"] is True:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0 and support["gguf_lora"] in result.output and not adapter.exists()
    fused = root / "fused"
    result = invoke("fuse", run, "--out", fused)
    assert result.exit_code == 0, result.output
    out = root / "fused-q8.gguf"
    result = invoke("export", fused, "--gguf", "--quant", "q8_0", "--out", out, "--verify")
    if support["gguf_export"] is True:
        assert result.exit_code == 0, result.output
        assert "tokenizer: the model's special tokens and chat template, parsing on" in result.output
    else:
        assert result.exit_code != 0 and support["gguf_export"] in result.output and not out.exists()
    if support["gguf_export"] is True and support["gguf_lora"] is True:
        import gguf  # the adapter adapts every block matrix llama.cpp has (MoE: the router and the stacked experts)

        matrices = {t.name for t in gguf.GGUFReader(out).tensors  # every block linear (not Qwen3.5's conv)
                    if t.name.startswith("blk.") and len(t.shape) >= 2 and "conv" not in t.name}
        assert {t.name.rpartition(".")[0] for t in gguf.GGUFReader(adapter).tensors} == matrices

    teacher = "dora" if families.family(model_type).support()["dora"] is True else "lora"
    distill = recipe(root, folder, "distill", [  # a float base: DoRA, then the student learns from it
        {"name": "dora", "kind": "sft", "data": "sft.jsonl", "adapter": {**lora, "type": teacher}},
        {"name": "distill", "kind": "distill", "teacher": "dora", "student": str(folder), "data": "sft.jsonl",
         "mode": "logits", "top_k": 16}], quantize=False)
    result = invoke("run", distill, "--no-tui", "--runs-dir", root / "distill-runs")
    assert result.exit_code == 0, result.output


def test_gguf_export_imports_back_to_the_same_logits(family_folder, tmp_path):
    """f16 export -> llama.cpp agrees with MLX; import of that file -> MLX agrees with llama.cpp."""
    from mlx_lm import load

    from localtune.models.gguf_import import import_gguf

    model_type, _, folder = family_folder
    support = families.family(model_type).support()
    if support["gguf_export"] is not True or support["gguf_import"] is not True:
        pytest.skip(f"{model_type}: {support['gguf_export']}")
    source = export.resolve(str(folder))
    model, tokenizer, config, _ = export.fused(source)
    out = tmp_path / "f16.gguf"
    export.write_gguf(model, config, folder, out, "f16", model_type)
    llm = export.open_llama(out)
    tokens = [tokenizer.encode("Date: the 1st of January, 2036 in digits 2036-01-01")[:24], [1, 2, 3, 200, 201, 40]]
    if "llama_4_scaling_beta" in (config.get("rope_parameters") or {}):  # Ministral 3's query temperature steps
        tokens.append(tokenizer.encode("Date: 5 March 2021. " * 30)[:100])  # at 32 positions: 3 steps
    theirs = [export.llama_logits(llm, t) for t in tokens]
    p = export.parity(export.mlx_logits(model, tokens), theirs)
    assert p.mean_kl < 1e-3 and p.top1 == 1.0, p

    imported = import_gguf(out, tmp_path / "imported")
    config_back = json.loads((imported / "config.json").read_text())
    assert config_back["model_type"] in families.family(model_type).model_types  # mistral reads back as llama
    for key, value in json.loads((folder / "config.json").read_text()).items():
        if key not in ("eos_token_id", "model_type"):
            assert config_back.get(key, value) == value, key
    back, _ = load(str(imported))
    p = export.parity(theirs, export.mlx_logits(back, tokens))
    assert p.mean_kl < 1e-3 and p.top1 == 1.0, p


def test_phi3_longrope_reproduced_by_llama_cpp_below_the_original_context(tmp_path):
    """Phi-4-mini's longrope: mlx-lm uses the long factors at every length; llama.cpp uses its
    short-factor tensor when its context (512) is below the original one (1024), so export must
    store the long factors there too. Import reads them back as the same model."""
    from mlx_lm import load

    from localtune.models.gguf_import import import_gguf

    long, short = [1.0, 1.5, 2.0, 4.0, 8.0, 16.0], [1.0, 1.0, 1.25, 1.5, 2.0, 2.5]  # 12 rotary dims / 2
    folder = make_folder(tmp_path, "phi3", {
        "max_position_embeddings": 4096, "original_max_position_embeddings": 1024,
        "rope_scaling": {"type": "longrope", "long_factor": long, "short_factor": short}})
    model, tokenizer, config, _ = export.fused(export.resolve(str(folder)))
    out = tmp_path / "f16.gguf"
    export.write_gguf(model, config, folder, out, "f16", "Phi3-tiny")  # see below
    tokens = [tokenizer.encode("Date: the 1st of January, 2036 in digits 2036-01-01")[:24], list(range(5, 60))]
    theirs = [export.llama_logits(export.open_llama(out), t) for t in tokens]
    p = export.parity(export.mlx_logits(model, tokens), theirs)
    assert p.mean_kl < 1e-3 and p.top1 == 1.0, p
    without = dict(config, rope_scaling={"type": "longrope", "long_factor": short, "short_factor": short})
    module = importlib.import_module("mlx_lm.models.phi3")
    other = module.Model(module.ModelArgs.from_dict(without))
    other.load_weights(list(tree_flatten(model.parameters())))
    assert export.parity(export.mlx_logits(other, tokens), theirs).mean_kl > 100 * p.mean_kl  # factors matter
    # llama.cpp strips whitespace after specials of a "phi3"-named model and needs </s>, <s>, <unk> (Phi-3's
    # vocabulary): this o200k one would not load under that name
    assert GGUFReader(out).fields["general.name"].contents() == "Phi_3-tiny"

    imported = import_gguf(out, tmp_path / "imported")
    scaling = json.loads((imported / "config.json").read_text())["rope_scaling"]
    assert scaling["type"] == "longrope" and scaling["long_factor"] == long
    back, _ = load(str(imported))
    p = export.parity(theirs, export.mlx_logits(back, tokens))
    assert p.mean_kl < 1e-3 and p.top1 == 1.0, p


def test_every_family_in_the_registry_is_tested_here():
    assert sorted(t for f in families.FAMILIES for t in f.model_types if f.support()["fuse"] is True) \
        == sorted(CASES)


def test_the_docs_matrix_is_the_registry():
    page = (ROOT / "docs" / "models.md").read_text()
    assert families.matrix_markdown() in page


def test_models_check_prints_a_models_row_from_its_config_alone(tmp_path):
    from gguf import GGUFWriter

    folder = tmp_path / "gemma"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))  # no weights: not read
    result = invoke("models", "check", folder)
    assert result.exit_code == 0, result.output
    assert f"{folder}: 'gemma3_text' from {folder / 'config.json'}: family Gemma 3" in result.output
    assert result.output.count(" yes\n") == len(families.CAPABILITIES)
    row = json.loads(invoke("models", "check", folder, "--json").output)["support"]
    assert row == families.family("gemma3_text").support()

    header = tmp_path / "m.gguf"
    writer = GGUFWriter(str(header), "qwen3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = invoke("models", "check", header)
    assert result.exit_code == 0 and "'qwen3' from" in result.output
    assert "(general.architecture = 'qwen3')" in result.output

    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3n"}))
    result = invoke("models", "check", folder)
    assert result.exit_code == 1 and "not supported; supported: llama" in result.output
    assert "did you mean" in result.output and "GGUF import" in result.output and "no: " in result.output


def test_a_gemma3_gguf_without_a_chat_template_gets_gemmas(tmp_path):
    """Google's Gemma 3 GGUFs may carry no template; llama.cpp then uses its built-in "gemma" one."""
    from localtune.models.gguf_import import import_gguf

    folder = make_folder(tmp_path, "gemma3_text")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model, _, cfg, _ = export.fused(export.resolve(str(folder)))
    export.write_gguf(model, cfg, folder, tmp_path / "g.gguf", "f16", "g")
    imported = import_gguf(tmp_path / "g.gguf", tmp_path / "imported")
    assert json.loads((imported / "tokenizer_config.json").read_text())["chat_template"] == GEMMA_TEMPLATE


@pytest.mark.parametrize("model_type, capability, stage", [
    ("gemma4_text", "ppo", {"name": "reward", "kind": "reward", "data": "pairs.jsonl"}),
    ("qwen3_moe", "dora", {"name": "sft", "kind": "sft", "data": "sft.jsonl",
                           "adapter": {"type": "dora", "rank": 4, "alpha": 8}}),
])
def test_a_stage_the_family_lacks_is_refused_with_the_reason_before_loading(tmp_path, model_type, capability, stage,
                                                                             monkeypatch):
    reason = families.family(model_type).support()[capability]
    assert reason is not True
    data(tmp_path)
    folder = make_folder(tmp_path, model_type)
    (folder / "model.safetensors").write_bytes(b"")  # never read: the refusal comes first
    result = invoke("run", recipe(tmp_path, folder, "refused", [stage], quantize=False), "--no-tui",
                    "--runs-dir", tmp_path / "runs")
    assert result.exit_code != 0 and reason in result.output, result.output
    assert f"[stages.{stage['name']}]" in result.output and not list(tmp_path.glob("runs/*/*/adapters.safetensors"))
