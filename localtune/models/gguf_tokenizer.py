"""Rebuild a Hugging Face `tokenizers` tokenizer and tokenizer_config.json from GGUF metadata.

The pipeline reproduces llama.cpp's tokenization: byte-level BPE split by the pre-tokenizer
regexes of tokenizer.ggml.pre ("gpt2"), or SentencePiece-style BPE with byte fallback ("llama").
"""
from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import ModelError

# tokenizer.ggml.pre -> the regex splits llama.cpp (src/llama-vocab.cpp) applies, in order.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# o200k (Phi-4-mini): tokenizer.json's regex, which llama.cpp's "gpt-4o" approximates with lookaheads
_GPT4O_WORD = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_SPLIT = (
    _GPT4O_WORD + "|" + r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Mistral's Tekken: the tokenizer.json regex (llama.cpp quotes it and runs an equivalent form)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# qwen35: Qwen2's split with combining marks (\p{M}) kept in words (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN35)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT_SPLITS = [r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"]
PRE_TOKENIZERS = {  # name -> (splits, ignore_merges, llama.cpp's add_bos default)
    **dict.fromkeys(["default"], (_DEFAULT_SPLITS, False, False)),
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo"], ([GPT2_SPLIT], False, False)),
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"], ([r"\p{N}", GPT2_SPLIT], False, False)
    ),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"], ([_LLAMA3_SPLIT], True, True)),
    **dict.fromkeys(["dbrx", "smaug-bpe"], ([_LLAMA3_SPLIT], False, False)),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"], ([_QWEN2_SPLIT], False, False)),
    **dict.fromkeys(["gpt-4o"], ([_GPT4O_SPLIT], False, False)),
    "tekken": ([_TEKKEN_SPLIT], True, True),
    "qwen35": ([_QWEN35_SPLIT], False, False),
}
_CONTROL, _UNKNOWN, _USER_DEFINED = 3, 2, 4  # llama.cpp token types
_END_OF_TURN_TEXTS = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>"}
# Texts llama.cpp's vocabulary loader turns into control tokens whatever their GGUF type (its
# end-of-generation and fill-in-the-middle markers): matched only with special parsing on.
_FORCED_CONTROL = _END_OF_TURN_TEXTS | {
    "</s>", "<|end_of_text|>", "<end_of_utterance>", "<EOT>", "_<EOT>", "<|return|>", "<|call|>",
    "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|fim_repo|>", "<|file_sep|>",
    "<fim-prefix>", "<fim-suffix>", "<fim-middle>", "<fim-pad>", "<fim-repo>",
    "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>",
}


def check_tokenizer(meta: dict) -> None:
    """Raise ModelError (message without the file name) for a tokenizer we cannot rebuild."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ModelError(f"tokenizer.ggml.model {kind!r} is not supported; supported: gpt2, llama.")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if kind == "gpt2" and pre not in PRE_TOKENIZERS:
        raise ModelError(
            f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
            f"supported: {', '.join(sorted(PRE_TOKENIZERS))}."
        )


def build_tokenizer(meta: dict, config: dict) -> tuple[Tokenizer, dict]:
    """A `tokenizers` pipeline that reproduces llama.cpp's tokenization, and tokenizer_config.json."""
    tokens, types = meta["tokenizer.ggml.tokens"], _token_types(meta)
    byte_level = meta["tokenizer.ggml.model"] == "gpt2"
    tokenizer = _byte_level_bpe(meta) if byte_level else _sentencepiece_bpe(meta)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN)]
    )
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED]  # llama.cpp makes some control
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in user if t in _FORCED_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user if t not in _FORCED_CONTROL])

    pre_default = PRE_TOKENIZERS[meta.get("tokenizer.ggml.pre", "default")][2] if byte_level else True
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pre_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    names = {
        f"{role}_token": tokens[meta[f"tokenizer.ggml.{key}_token_id"]]
        for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
        if meta.get(f"tokenizer.ggml.{key}_token_id") is not None
    }
    tokenizer.post_processor = _post_processor(tokenizer, names, add_bos, add_eos, byte_level)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, tokenizer_config


def sentencepiece_model(meta: dict) -> bytes | None:
    """tokenizer.model for a SentencePiece ("llama") vocabulary: the pieces, scores and kinds that
    llama.cpp's converter read from one, so the folder exports back to the same GGUF vocabulary.
    GGUF token types and SentencePiece piece types share their numbering (NORMAL 1 ... BYTE 6)."""
    if meta.get("tokenizer.ggml.model") != "llama":
        return None
    from sentencepiece import sentencepiece_model_pb2

    tokens, types = meta["tokenizer.ggml.tokens"], _token_types(meta)
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    for key, field in (("unknown", "unk_id"), ("bos", "bos_id"), ("eos", "eos_id"), ("padding", "pad_id")):
        setattr(proto.trainer_spec, field, meta.get(f"tokenizer.ggml.{key}_token_id", -1))
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=float(score), type=int(kind))
    return proto.SerializeToString()


def special_token_ids(meta: dict) -> dict:
    """bos/eos ids; eos lists every end-of-turn token so generation stops where llama.cpp's does."""
    tokens, types = meta["tokenizer.ggml.tokens"], _token_types(meta)
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    eos += [i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == _CONTROL and t in _END_OF_TURN_TEXTS]
    eos = list(dict.fromkeys(eos))
    ids = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id")}
    ids["eos_token_id"] = eos[0] if len(eos) == 1 else eos or None
    return ids


def _token_types(meta: dict) -> list[int]:
    return meta.get("tokenizer.ggml.token_type") or [1] * len(meta["tokenizer.ggml.tokens"])


def _byte_level_bpe(meta: dict) -> Tokenizer:
    """GPT-2 style: tokens are already in the byte-to-unicode alphabet; split text like llama.cpp."""
    splits, ignore_merges, _ = PRE_TOKENIZERS[meta.get("tokenizer.ggml.pre", "default")]
    vocab = {token: i for i, token in reversed(list(enumerate(meta["tokenizer.ggml.tokens"])))}
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict) -> Tokenizer:
    """llama.cpp's SPM: merge the highest-scoring adjacent pair first, bytes as <0xXX> fallback."""
    tokens, types = meta["tokenizer.ggml.tokens"], _token_types(meta)
    vocab = {token: i for i, token in reversed(list(enumerate(tokens)))}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    else:
        normal = {t for t, k in zip(tokens, types) if k == 1}
        merges = _merges_from_scores(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens), normal)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp prefixes "▁" to every text run (also after special tokens and before a leading
    # space), which per-segment normalizers reproduce; Metaspace skips text starting with a space.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁")] * add_prefix + [normalizers.Replace(" ", "▁")]
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * add_prefix)
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float], normal: set[str]) -> list[tuple[str, str]]:
    """Every split of a normal token into two normal tokens, best merged-token score first."""
    ranked = []
    for token, score in zip(tokens, scores):
        if token in normal:
            ranked += [(-score, i, token[:i], token[i:]) for i in range(1, len(token))
                       if token[:i] in normal and token[i:] in normal]
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _post_processor(tokenizer: Tokenizer, names: dict, add_bos: bool, add_eos: bool, byte_level: bool):
    """BOS/EOS template in the same form transformers rebuilds from add_bos_token/add_eos_token."""
    bos, eos = names.get("bos_token") if add_bos else None, names.get("eos_token") if add_eos else None
    if not (bos or eos):
        return processors.ByteLevel(trim_offsets=False) if byte_level else None
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [(t, tokenizer.token_to_id(t)) for t in dict.fromkeys([bos, eos]) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

