"""Build the bundled tiny models: one tokenizer, models/small and models/smaller, and their cards.

`python models/build.py` rebuilds everything from models/corpus/ in about 20 minutes on 2 CPU cores.
Deterministic: fixed seeds and step counts, single-threaded tokenizer training; float32 training,
float16 weights on disk.
"""
import argparse
import ctypes
import glob
import gzip
import json
import math
import random
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

for _lib in sorted(glob.glob(f"{sys.prefix}/lib/libmkl_rt.so*"))[:1]:
    ctypes.CDLL(_lib, mode=ctypes.RTLD_GLOBAL)  # before mlx: its CPU matmuls then run on MKL (~20x faster)

import jinja2
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.models import llama

HERE = Path(__file__).resolve().parent
SEED = 0
VOCAB_SIZE = 3072
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]  # ids 0..5
UNK, BOS, EOS, PAD, IM_START, IM_END = range(6)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SEQ_LEN = 128
CHAT_SHARE = 0.4  # of pretraining documents (about 20% of tokens): generic ChatML, see chat_conversations
VAL_SHARE = 0.02

MODELS = {
    "small": dict(
        config=dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                    intermediate_size=704, tie_word_embeddings=False),
        steps=300, batch_size=16, learning_rate=3e-3,
    ),
    "smaller": dict(
        config=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=384, tie_word_embeddings=True),
        steps=500, batch_size=16, learning_rate=4e-3,
    ),
}


# ---------------------------------------------------------------- corpus


def corpus_documents() -> dict[str, list[str]]:
    """{corpus file stem: one document per line}."""
    return {Path(p).name.split(".")[0]: gzip.open(p, "rt", encoding="utf-8").read().splitlines()
            for p in sorted(glob.glob(str(HERE / "corpus" / "*.txt.gz")))}


def sentences(text: str) -> list[str]:
    parts, start = [], 0
    for i, ch in enumerate(text):
        if ch in ".!?" and (i + 1 == len(text) or text[i + 1] == " "):
            parts.append(text[start:i + 1].strip())
            start = i + 1
    return [p for p in parts if p]


def chat_conversations(corpus: dict[str, list[str]], count: int, rng: random.Random) -> list[list[dict]]:
    """Generic chats from the corpus, numbers and the calendar (never the bundled task).

    Half of them copy or reorder parts of the prompt, to start the models on copying; within the
    pretraining budget they do not yet learn it (see the model cards).
    """
    entries = [e for e in corpus["devils_dictionary"] if ", n." in e[:40] or ", v." in e[:40]]
    passages = [s for s in (sentences(p) for p in corpus["web_excerpts"]) if len(s) >= 3]
    words = sorted({w for p in passages[:500] for w in " ".join(p).split() if w.isalpha()})
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]

    def number() -> str:
        return str(rng.randint(0, 10 ** rng.randint(1, 4) - 1))

    def items() -> list[str]:
        return [number() if rng.random() < 0.5 else rng.choice(words) for _ in range(rng.randint(2, 6))]

    def define():
        word, _, meaning = rng.choice(entries).partition(",")
        meaning = meaning.split(".", 1)[-1].strip()[:400]
        return f'What does "{word.strip().lower()}" mean?', meaning or word

    def continue_passage():
        s = rng.choice(passages)
        return f"Continue this passage: {s[0]}", " ".join(s[1:3])

    def repeat_sentence():
        s = rng.choice(rng.choice(passages))
        return f"Repeat after me: {s}", s

    def repeat_items():
        text = " ".join(items())
        return f"Repeat exactly: {text}", text

    def reverse_items():
        xs = items()
        return f"Reverse the order of these items: {' '.join(xs)}", " ".join(reversed(xs))

    def count_up():
        a = rng.randint(0, 2100)
        return f"Count from {a} to {a + 5}.", ", ".join(str(n) for n in range(a, a + 6))

    def add():
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."

    def month():
        n = rng.randint(1, 12)
        if rng.random() < 0.5:
            return f"Which month is month number {n}?", f"Month {n} is {months[n - 1]}."
        return f"What number is the month of {months[n - 1]}?", f"{months[n - 1]} is month {n}."

    kinds = [define, continue_passage, repeat_sentence, repeat_sentence, repeat_items, repeat_items,
             reverse_items, reverse_items, count_up, add, month]
    chats = []
    for _ in range(count):
        user, assistant = rng.choice(kinds)()
        system = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
        chats.append(system + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])
    return chats


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders it
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, bos_token=SPECIAL_TOKENS[BOS],
                                                 add_generation_prompt=add_generation_prompt)


# ---------------------------------------------------------------- tokenizer


def train_sentencepiece(lines: list[str], prefix: Path) -> Path:
    spm.set_random_generator_seed(SEED)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=VOCAB_SIZE,
        byte_fallback=True, split_digits=True, character_coverage=0.9999, num_threads=1,
        unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=PAD, unk_piece="<unk>", bos_piece="<s>",
        eos_piece="</s>", pad_piece="<pad>", user_defined_symbols=SPECIAL_TOKENS[IM_START:],
        # identity normalisation, no dummy prefix, spaces kept: the HF fast tokenizer then matches exactly
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, max_sentence_length=16384, minloglevel=2,
    )
    model = prefix.with_suffix(".model")
    proto = sp_pb2.ModelProto.FromString(model.read_bytes())
    proto.trainer_spec.model_prefix = "tokenizer"  # not the temporary path: keeps the file reproducible
    model.write_bytes(proto.SerializeToString())
    return model


def tokenizer_config() -> dict:
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1024, "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(sp_model: Path, out: Path) -> None:
    """tokenizer.model, a fast tokenizer.json converted by transformers, and the configs."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "src"), Path(tmp, "dst")
        src.mkdir()
        shutil.copy(sp_model, src / "tokenizer.model")
        slow = {**tokenizer_config(), "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_prefix_space": False}
        (src / "tokenizer_config.json").write_text(json.dumps(slow))
        AutoTokenizer.from_pretrained(src).save_pretrained(dst)
        shutil.copy(dst / "tokenizer.json", out / "tokenizer.json")
    shutil.copy(sp_model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                   "additional_special_tokens": SPECIAL_TOKENS[IM_START:]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


TOKENIZER_PROBES = [
    "In 2021-03-05, God said “hi”  there.", " leading space", "trailing  ", "a\nb\n\nc\r\n", "tabs\there",
    "héllo wörld 日本語 🙂", "<|im_start|>user\nhi<|im_end|>\n", "   ", "", "12345 67.89 -0.5e10",
    "Hello<|im_end|>x", "ÀÉÎõü ß Ω ∑ → 𝔘", "MiXeD CaSe, punctuation!?;:'\"()[]{}",
]


def check_tokenizer(folder: Path, chats: list[list[dict]]) -> None:
    """The HF tokenizer must give sentencepiece's ids, and render the chat template as we do."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in TOKENIZER_PROBES + [render_chat(c) for c in chats[:50]]:
        ids = encode(sp, text)
        assert hf.encode(text, add_special_tokens=False) == ids, f"tokenizers disagree on {text!r}"
        assert hf.decode(ids) == text, f"round trip fails on {text!r}"
    assert hf.encode("hi")[0] == BOS and hf.encode("<s></s>", add_special_tokens=False) == [BOS, EOS]
    assert hf.apply_chat_template(chats[0], tokenize=False) == render_chat(chats[0])


# ---------------------------------------------------------------- model


def model_config(arch: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **arch,
        "head_dim": arch["hidden_size"] // arch["num_attention_heads"], "hidden_act": "silu",
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02, "vocab_size": VOCAB_SIZE,
        # chat replies end with <|im_end|>; mlx-lm and transformers stop on every id listed here
        "bos_token_id": BOS, "eos_token_id": [EOS, IM_END], "pad_token_id": PAD, "torch_dtype": "float16",
    }


def init_model(config: dict) -> llama.Model:
    """Normal(0, 0.02) weights; residual output projections scaled by 1/sqrt(2 * layers) (GPT-2)."""
    model = llama.Model(llama.ModelArgs.from_dict(config))
    residual_std = 0.02 / math.sqrt(2 * config["num_hidden_layers"])

    def init(path, w):
        if "norm" in path:
            return w
        std = residual_std if path.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        return mx.random.normal(w.shape) * std

    model.update(tree_map_with_path(init, model.parameters()))
    return model


def encode(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """As the HF tokenizer reads a rendered chat: its leading "<s>" is the BOS token."""
    return [BOS] + sp.encode(text[3:]) if text.startswith("<s>") else sp.encode(text)


def token_stream(docs: list[str], sp: spm.SentencePieceProcessor) -> np.ndarray:
    """Chat documents carry <s> in their template; text documents get <s> ... </s>."""
    return np.concatenate([np.array(encode(sp, d) if d.startswith("<s>") else [BOS] + encode(sp, d) + [EOS],
                                    dtype=np.int32) for d in docs])


def pretrain(model: llama.Model, train: np.ndarray, val: np.ndarray, steps: int, batch_size: int,
             learning_rate: float) -> dict:
    """Next-token cross-entropy on random windows of the stream; AdamW, warmup + cosine decay."""
    rng = np.random.default_rng(SEED)
    warmup = max(1, steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(0.0, learning_rate, warmup),
         optim.cosine_decay(learning_rate, steps - warmup, learning_rate / 10)],
        [warmup])
    optimizer = optim.AdamW(schedule, betas=[0.9, 0.95], weight_decay=0.1)

    def windows(stream, n):  # (n, SEQ_LEN + 1)
        starts = rng.integers(0, len(stream) - SEQ_LEN - 1, n)
        return mx.array(stream[starts[:, None] + np.arange(SEQ_LEN + 1)])

    def loss_fn(model, batch):
        return nn.losses.cross_entropy(model(batch[:, :-1]), batch[:, 1:]).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=[model.state, optimizer.state], outputs=[model.state, optimizer.state])
    def step(batch):
        loss, grads = loss_and_grad(model, batch)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss
    val_batches = [windows(val, batch_size) for _ in range(8)]
    start, recent = time.time(), []
    for i in range(1, steps + 1):
        recent.append(step(windows(train, batch_size)).item())
        if i % 25 == 0 or i == steps:
            print(f"  step {i}/{steps}  loss {np.mean(recent[-25:]):.3f}  {time.time() - start:.0f}s", flush=True)
    val_loss = float(np.mean([loss_fn(model, b).item() for b in val_batches]))
    return {"steps": steps, "batch_size": batch_size, "train_loss": round(float(np.mean(recent[-25:])), 3),
            "val_loss": round(val_loss, 3), "seconds": round(time.time() - start)}


def greedy_continuation(model: llama.Model, sp: spm.SentencePieceProcessor, prompt: str, tokens: int = 40) -> str:
    """`prompt` is raw text; chat prompts carry their own <s>."""
    ids = encode(sp, prompt) if prompt.startswith("<s>") else [BOS] + encode(sp, prompt)
    out = []
    for _ in range(tokens):
        nxt = model(mx.array([ids + out]))[0, -1].argmax().item()
        if nxt in (EOS, IM_END):
            break
        out.append(nxt)
    return sp.decode(out)


def save_model(model: llama.Model, config: dict, out: Path) -> int:
    params = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), {k: v.astype(mx.float16) for k, v in params.items()},
                        metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": BOS, "eos_token_id": [EOS, IM_END], "pad_token_id": PAD}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return sum(v.size for v in params.values())


def model_card(name: str, config: dict, n_params: int, stats: dict, samples: dict) -> str:
    c = config
    tied = "tied" if c["tie_word_embeddings"] else "untied"
    lines = [
        "---", "license: apache-2.0", "language: en", "library_name: mlx", "pipeline_tag: text-generation",
        "tags: [llama, tiny, test-model, localtune]", "---", "",
        f"# localtune {name}", "",
        f"A tiny Llama-architecture language model ({n_params / 1e6:.2f}M parameters) bundled with localtune for",
        "tests and the quickstart. It writes English-like text in the style of its corpus and knows the ChatML",
        "turn markers, but it knows little else: fine-tune it, don't deploy it.", "",
        "## Architecture", "",
        f"- Llama: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
        f"{c['num_attention_heads']} attention heads,",
        f"  {c['num_key_value_heads']} key/value heads (GQA), head dim {c['head_dim']}, "
        f"MLP {c['intermediate_size']} (SiLU),",
        f"  RoPE θ={c['rope_theta']:g}, {tied} input/output embeddings, vocabulary {c['vocab_size']}.",
        "- Weights stored as float16 in `model.safetensors`; every linear width is a multiple of 64,",
        "  so 4-bit quantization with group size 64 covers all layers.",
        "- Tokenizer: SentencePiece BPE (byte fallback, digits split) shared with the other bundled model;",
        "  `<s>`=1, `</s>`=2, `<unk>`=0, `<pad>`=3, `<|im_start|>`=4, `<|im_end|>`=5. ChatML chat template;",
        "  generation stops at `</s>` or `<|im_end|>` (`eos_token_id: [2, 5]`).", "",
        "## Training", "",
        "Pretrained from random initialisation by `models/build.py` (seeded, deterministic) with MLX on CPU:",
        f"{stats['steps'] * stats['batch_size'] * SEQ_LEN:,} tokens "
        f"({stats['steps']} steps × {stats['batch_size']} × {SEQ_LEN}) in "
        f"{stats['seconds']} s, AdamW with warmup and cosine decay.",
        f"Final training loss {stats['train_loss']}, held-out loss {stats['val_loss']} "
        f"(perplexity {math.exp(stats['val_loss']):.0f}).", "",
        "The corpus (`models/corpus/`, see its README) is public-domain English: excerpts from the",
        "World English Bible translation and Ambrose Bierce's *The Devil's Dictionary* (1911). Mixed in",
        f"({CHAT_SHARE:.0%} of documents) are generic ChatML conversations generated by the script: definitions and",
        "continuations from the corpus, repeating or reversing words and numbers, counting, addition, month",
        "numbers. They train the chat markers. Within this budget the models do not learn to copy from",
        "their prompt, so tasks that rewrite the input (such as `data/dates`) need long fine-tuning.", "",
        "## Greedy samples", "",
    ]
    lines += [f"- {prompt!r} → {reply!r}" for prompt, reply in samples.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(MODELS), action="append", help="build only these models")
    parser.add_argument("--steps", type=int, help="override the pretraining steps (quick smoke builds)")
    args = parser.parse_args()
    rng = random.Random(SEED)
    mx.random.seed(SEED)

    corpus = corpus_documents()
    text_docs = [d for docs in corpus.values() for d in docs]
    chats = chat_conversations(corpus, int(len(text_docs) * CHAT_SHARE / (1 - CHAT_SHARE)), rng)
    docs = text_docs + [render_chat(c) for c in chats]
    rng.shuffle(docs)
    n_val = int(len(docs) * VAL_SHARE)

    with tempfile.TemporaryDirectory() as tmp:
        sp_model = train_sentencepiece(text_docs + [render_chat(c) for c in chats], Path(tmp, "sp"))
        sp = spm.SentencePieceProcessor(model_file=str(sp_model))
        train, val = token_stream(docs[n_val:], sp), token_stream(docs[:n_val], sp)
        print(f"corpus: {len(docs)} documents, {len(train):,} train / {len(val):,} val tokens")
        for name in args.only or list(MODELS):
            spec, out = MODELS[name], HERE / name
            write_tokenizer(sp_model, out)
            check_tokenizer(out, chats)
            config = model_config(spec["config"])
            mx.random.seed(SEED)
            model = init_model(config)
            steps = args.steps or spec["steps"]
            print(f"{name}: pretraining {steps} steps")
            stats = pretrain(model, train, val, steps, spec["batch_size"], spec["learning_rate"])
            n_params = save_model(model, config, out)
            chat = render_chat([{"role": "user", "content": "Count from 7 to 12."}], add_generation_prompt=True)
            samples = {p: greedy_continuation(model, sp, p)
                       for p in ["In the beginning", "The king said to", "BEAUTY, n."]}
            samples["(chat) user: Count from 7 to 12."] = greedy_continuation(model, sp, chat)
            (out / "README.md").write_text(model_card(name, config, n_params, stats, samples))
            print(f"{name}: {n_params:,} parameters, {stats}")


if __name__ == "__main__":
    main()
