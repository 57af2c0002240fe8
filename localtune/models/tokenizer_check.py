"""Does llama.cpp tokenize text the way the model saw it in training? Compared like with like.

llama.cpp parses special tokens only when asked (`special=True`), and then it parses every token it
holds as control: the file's control tokens, and some normal tokens it promotes by their text
(llama-vocab.cpp's end-of-generation list: `</s>`, `<eos>`, `[EOS]`...). Qwen2's vocabulary has a
normal `</s>`, so "</s>" in a text is one token to llama.cpp and several pieces to the model. Hence:

- plain text (TRICKY) is tokenized with special parsing off on both sides;
- text built from the model's own declared special tokens (its chat template, BOS/EOS) with it on;
- a normal token that llama.cpp promotes is a warning, or a failure when the chat template writes
  it or it is an EOS token (then training and inference see different tokens for the same text);
- when the base was imported from a GGUF, llama.cpp must tokenize the export as it does that file.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LocaltuneError

# Plain text, special parsing off: markers written in user text must stay text on both sides.
TRICKY = ["hello world", "  two  spaces and\ttab\n\nnewlines", "1234567890 3.14159 -42", "naïve café — 日本語 🙂",
          "<|im_start|>user\nhi<|im_end|>", "</s><s> <unk>", "UPPER lower MiXeD", "a" * 40]
# Conversations to render with the chat template; the first one the template accepts is used.
SAMPLE_CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "2+2?"}],
]


class LlamaVocab:
    """llama.cpp's tokenizer of one GGUF file, through its C API."""

    def __init__(self, vocab):
        self.vocab = vocab

    @classmethod
    def of(cls, llm) -> LlamaVocab:
        """The vocabulary of a loaded `llama_cpp.Llama`."""
        import llama_cpp

        return cls(llama_cpp.llama_model_get_vocab(llm.model))

    def tokenize(self, text: str, special: bool, add_bos: bool = True) -> list[int]:
        """As `Llama.tokenize(text.encode(), add_bos, special)`: BOS only if the file asks for it too."""
        import llama_cpp

        data = text.encode()
        size = len(data) + 8
        while True:
            out = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), out, size, add_bos, special)
            if n >= 0:
                return list(out[:n])
            size = -n  # too small: n is minus the number needed

    def special_ids(self) -> list[int]:
        """Every token llama.cpp parses as special: control or unknown (~0.1 s for 150k tokens)."""
        import llama_cpp

        mask = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        n = llama_cpp.llama_vocab_n_tokens(self.vocab)
        return [i for i in range(n) if llama_cpp.llama_vocab_get_attr(self.vocab, i) & mask]

    def text(self, token: int) -> str:
        import llama_cpp

        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))


@contextlib.contextmanager
def open_vocab(path: Path):
    """llama.cpp's vocabulary alone from a GGUF file (vocab_only: no weights are read)."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise LocaltuneError(f"{path}: llama.cpp cannot read the vocabulary of this GGUF file\n"
                             "  fix: check that the file is complete (re-download it)")
    try:
        yield LlamaVocab(llama_cpp.llama_model_get_vocab(model))
    finally:
        llama_cpp.llama_model_free(model)


# ---------------------------------------------------------------------------------------------
# Our side


def our_ids(tokenizer, text: str, special: bool, add_bos: bool = True) -> list[int]:
    """Our tokens for `text`: special tokens parsed only if `special`; BOS as the tokenizer adds it."""
    return list(tokenizer.encode(text, add_special_tokens=add_bos, split_special_tokens=not special))


def declared_specials(tokenizer) -> dict[int, str]:
    """The tokens our tokenizer parses as special: its special added tokens and BOS/EOS/UNK/PAD."""
    found = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids):
        found.setdefault(i, token)
    return dict(sorted(found.items()))


def chat_sample(tokenizer) -> str | None:
    """The chat template rendered on a short conversation, or None without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    for messages in SAMPLE_CHATS:
        with contextlib.suppress(Exception):  # a template may refuse a shape (no system role...): the next
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return None


def special_texts(tokenizer, specials: dict[int, str]) -> list[str]:
    """Texts made of the model's own special tokens: its chat template's output, and every
    declared special token, each followed by a word (no spaces: some strip them)."""
    texts = [chat] if (chat := chat_sample(tokenizer)) else []
    if specials:
        texts.append("".join(f"{text}hi" for text in specials.values()))
    return texts


def eos_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


# ---------------------------------------------------------------------------------------------
# The check


@dataclass
class TokenizerCheck:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (check, result, limit)
    problems: list[str] = field(default_factory=list)  # each one fails the verification
    warnings: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # check -> [identical, compared]

    def to_dict(self) -> dict:
        return {"counts": self.counts, "warnings": self.warnings, "problems": self.problems}


def compare(llama: LlamaVocab, tokenizer, original: Path | None = None) -> TokenizerCheck:
    """Our tokenizer against llama.cpp's (`llama`), and `llama` against the GGUF the base came from."""
    check = TokenizerCheck()
    specials = declared_specials(tokenizer)
    _promoted(check, llama, tokenizer, specials)  # first: its failure says why the texts below differ
    texts = [(t, False) for t in TRICKY] + [(t, True) for t in special_texts(tokenizer, specials)]
    for name, special in (("plain text, special parsing off", False),
                          ("the model's special tokens and chat template, parsing on", True)):
        group = [t for t, s in texts if s == special]
        same = 0
        for text in group:
            # plain text: with BOS as each side adds it; special texts: a template writes its own BOS
            ours, theirs = our_ids(tokenizer, text, special, not special), llama.tokenize(text, special, not special)
            same += ours == theirs
            if ours != theirs:
                check.problems.append(f"llama.cpp tokenizes {text!r} (special parsing {'on' if special else 'off'}) "
                                      f"as {theirs}, we as {ours}")
        check.counts[name] = [same, len(group)]
        check.rows.append((f"tokenizer: {name}", f"{same}/{len(group)} identical", "all") if group else
                          (f"tokenizer: {name}", "none: no chat template or special tokens", ""))
    check.rows += [("warning", w, "not a failure: the chat template and EOS do not use it") for w in check.warnings]
    if original is not None:
        _against_original(check, llama, original, texts)
    return check


def _promoted(check: TokenizerCheck, llama: LlamaVocab, tokenizer, specials: dict[int, str]) -> None:
    """Normal tokens of ours that llama.cpp parses as special: a warning row each, or a problem
    when the chat template writes the token or it is an EOS token."""
    template = getattr(tokenizer, "chat_template", None) or ""
    chat = chat_sample(tokenizer) or ""
    eos = eos_ids(tokenizer)
    for token in llama.special_ids():
        if token in specials:
            continue
        text = llama.text(token)
        what = "special and end-of-generation" if llama.is_eog(token) else "special"
        found = f"`{text}` (id {token}) is a normal token, but llama.cpp parses it as {what}"
        uses = [reason for reason, hit in (("the chat template writes it", text in template or text in chat),
                                           ("it is an EOS token of the model", token in eos)) if hit]
        if uses:
            seen = our_ids(tokenizer, text, True, add_bos=False)
            check.problems.append(
                f"{found}, and {' and '.join(uses)}: llama.cpp would read that text as token {token}, where "
                f"training saw {seen}\n  fix: declare {text!r} a special token of the base model (tokenizer.json "
                "added_tokens, \"special\": true) and train again, or use a chat template that does not write it")
        else:
            check.warnings.append(found)


def _against_original(check: TokenizerCheck, llama: LlamaVocab, original: Path, texts) -> None:
    """The export tokenizes in llama.cpp exactly as the GGUF file the base was imported from."""
    name = f"tokenizer vs the original {original.name}"
    if not original.is_file():
        check.rows.append((name, f"not compared: {original} is gone", ""))
        return
    same = 0
    try:
        with open_vocab(original) as theirs:
            for text, special in texts:
                a, b = llama.tokenize(text, special, not special), theirs.tokenize(text, special, not special)
                same += a == b
                if a != b:
                    check.problems.append(f"llama.cpp tokenizes {text!r} (special parsing "
                                          f"{'on' if special else 'off'}) as {a} in this file, but as {b} in the "
                                          f"original {original}")
    except LocaltuneError:  # damaged since the import: the export itself is not at fault
        check.rows.append((name, f"not compared: llama.cpp cannot read {original}", ""))
        return
    check.counts[name] = [same, len(texts)]
    check.rows.append((name, f"{same}/{len(texts)} identical", "all"))
