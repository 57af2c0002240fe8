"""Extract the general-ability text set: localtune/resources/general.jsonl (shipped in the package).

The plain-text documents of the bundled models' pretraining corpus (models/corpus) that
models/build.py held out for validation: never trained on by the bundled models, public domain,
and general English for real models such as SmolLM2. The forgetting check measures mean NLL per
token on them before and after a tune. Run `python data/build_general.py` (it replays
build.py's seeded shuffle; no model is trained). The output is the same on every run.
"""
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))
import build  # noqa: E402  (models/build.py: the corpus, its seed and its split)

OUT = ROOT / "localtune" / "resources" / "general.jsonl"
MAX_CHARS = 1200  # long documents are cut at a sentence end: evaluation stays quick


def main() -> None:
    rng = random.Random(build.SEED)
    corpus = build.corpus_documents()
    text_docs = [d for docs in corpus.values() for d in docs]
    n_chats = int(len(text_docs) * build.CHAT_SHARE / (1 - build.CHAT_SHARE))
    build.chat_conversations(corpus, n_chats, rng)  # consumes the generator exactly as build.py does
    order = list(range(len(text_docs) + n_chats))
    rng.shuffle(order)  # the same permutation build.py applies to its documents
    held_out = [text_docs[i] for i in order[: int(len(order) * build.VAL_SHARE)] if i < len(text_docs)]
    rows = []
    for doc in held_out:
        if len(doc) > MAX_CHARS:
            cut = doc.rfind(". ", 0, MAX_CHARS)
            doc = doc[: cut + 1] if cut > 200 else doc[:MAX_CHARS]
        if len(doc.split()) >= 8:
            rows.append({"text": doc})
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{OUT}: {len(rows)} documents, {sum(len(r['text'].split()) for r in rows):,} words")


if __name__ == "__main__":
    main()
