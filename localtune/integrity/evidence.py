"""The provenance gate's evidence: a finding, a source's findings, and what a model's name, a
license or a card (README.md with YAML front matter) says about training on a source.

A finding is a verdict (allow / warn / block), its evidence (file:line or field), the rule and its
citation, and any conditions the user must meet. A source's verdict is its worst finding.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import LocaltuneError
from .policy import CLOSED_APIS, LICENSES, OPEN_FAMILIES, ClosedApi

ORDER = {"allow": 0, "warn": 1, "block": 2}


@dataclass
class Finding:
    verdict: str  # allow | warn | block
    rule: str  # what decided it, e.g. "closed-api:openai" or "license:llama3.1"
    reason: str
    evidence: list = field(default_factory=list)  # "file:line: text" or "field = value"
    citation: str = ""  # the clause (document, section, URL)
    conditions: list = field(default_factory=list)  # what the user must do, e.g. a name prefix


@dataclass
class Source:
    kind: str  # teacher | data
    ref: str  # as written in the recipe or on the command line
    findings: list = field(default_factory=list)
    license: str | None = None
    attested: str | None = None  # the user's reason, when an attestation lifted a block

    @property
    def verdict(self) -> str:
        if not self.findings:
            return "allow"
        worst = max(self.findings, key=lambda f: ORDER[f.verdict]).verdict
        return "allow" if worst == "block" and self.attested else worst

    @property
    def conditions(self) -> list[str]:
        return [c for f in self.findings for c in f.conditions]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "source": self.ref, "verdict": self.verdict, "license": self.license,
                "attested": self.attested, "conditions": self.conditions,
                "findings": [asdict(f) for f in self.findings]}



# ---------------------------------------------------------------------------------------------
# Names


def closed_api(name: str) -> ClosedApi | None:
    """The closed-API provider whose model this name is: `gpt-4o`, `openai/gpt-4o`,
    `anthropic/claude-3-opus`. A repo id under another owner is an open-weight model (a name such
    as `someone/gpt4-x-alpaca` is not OpenAI's), and so are names like gpt2, gpt-j or gpt-oss."""
    name = name.strip().lower()
    owner, _, model = name.rpartition("/")
    model = re.sub(r"[:@].*$", "", model)  # ollama-style tags, versions
    for api in CLOSED_APIS:
        if owner and owner not in api.owners:
            continue
        if any(re.fullmatch(p, model) for p in api.patterns):
            return api
    return None


def open_family(name: str) -> str | None:
    """The license id an open-weight model family ships under, when the family decides it."""
    model = name.strip().lower().rpartition("/")[2]
    for pattern, license in OPEN_FAMILIES:
        if re.fullmatch(pattern, model):
            return license
    return None


def closed_finding(api: ClosedApi, evidence: list[str], what: str) -> Finding:
    return Finding("block", f"closed-api:{api.key}",
                   f"{what} {api.provider}'s closed API; its terms forbid using outputs to develop competing "
                   "models", evidence, api.citation)


# ---------------------------------------------------------------------------------------------
# Cards: README.md with YAML front matter


@dataclass
class Card:
    path: Path
    meta: dict
    body: str
    body_line: int  # line number of the body's first line
    lines: dict  # top-level key -> line number
    front: list = field(default_factory=list)  # the front matter's lines, from line 2

    def where(self, key: str) -> str:
        return f"{self.path}:{self.lines.get(key, 1)}"

    def where_item(self, key: str, item) -> str:
        """The line of one item of a list value (`- meta-llama/Llama-2-7b-hf`), else the key's."""
        start = self.lines.get(key)
        if start is None:
            return self.where(key)
        for n, text in enumerate(self.front[start - 1:], start + 1):  # the lines after the key's
            if re.match(r"^[A-Za-z_][\w-]*\s*:", text):
                break  # the next top-level key
            if str(item) in text:
                return f"{self.path}:{n}"
        return self.where(key)


def read_card(path: Path) -> Card | None:
    """A card's front matter and text; a malformed front matter is an error naming the line."""
    import yaml

    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return Card(path, {}, text, 1, {})
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise LocaltuneError(f"{path}:1: the front matter opened with '---' is never closed\n"
                             "  fix: end the YAML block with a line holding only '---'") from None
    front = "\n".join(lines[1:end])
    try:
        meta = yaml.safe_load(front) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 2 if mark else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LocaltuneError(f"{path}:{line}: malformed YAML front matter: {problem}\n"
                             f"  line {line}: {lines[line - 1] if line <= len(lines) else ''}\n"
                             "  fix: write key: value pairs, lists as [a, b]; quote values holding ':'") from None
    if not isinstance(meta, dict):
        raise LocaltuneError(f"{path}:2: the front matter must be key: value pairs, got {type(meta).__name__}")
    where = {}
    for i in range(1, end):
        m = re.match(r"^([A-Za-z_][\w-]*)\s*:", lines[i])
        if m:
            where.setdefault(m.group(1), i + 1)
    return Card(path, meta, "\n".join(lines[end + 1:]), end + 2, where, lines[1:end])


def read_other_card(path: Path, name: str, trail: list[str]) -> tuple[Card | None, Finding | None]:
    """A card the user did not point at (a base model's, an upstream dataset's): a malformed one is
    a warning about that source, not an error that stops the gate."""
    try:
        return read_card(path), None
    except LocaltuneError as e:
        problem = str(e).splitlines()[0]
        return None, Finding("warn", "provenance:unreadable-card", f"the card of {name} cannot be read, so "
                             "localtune cannot judge it", list(trail) + [problem],
                             conditions=[f"check {name}'s license and origin yourself"])


def as_list(value) -> list:
    """A card value that may be one item or a list of them, as a list."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def license_findings(license_id: str | None, license_name: str | None, evidence: str, role: str) -> list[Finding]:
    """What a license says about training another model on this source's outputs (or on it)."""
    if not license_id and not license_name:
        return [Finding("warn", "license:unknown", f"no license is stated for this {role}", [evidence],
                        conditions=[f"find the {role}'s license and check that it allows training other models"])]
    key = (license_id or "").lower()
    if key in ("other", "unknown", "") and license_name:
        key = license_name.lower()
    rule = LICENSES.get(key)
    if rule is None:
        return [Finding("warn", f"license:{key}", f"license {key!r} is not in localtune's table", [evidence],
                        conditions=[f"read the {key!r} license for what it says about training other models "
                                    "on outputs"])]
    return [Finding(rule.verdict, f"license:{key}", rule.summary, [evidence], rule.citation, list(rule.conditions))]


NEGATION = re.compile(r"\b(not|no|never|without|nor|none|neither|avoid(?:ed|ing)?)\b|n't\b", re.I)
# A verb that says who wrote the data decides alone; a bare noun ("responses") decides only when the
# sentence is not a comparison ("our responses beat ChatGPT's on MT-Bench" is not provenance).
GENERATION = re.compile(r"\b(generat\w*|produc\w*|writ\w*|wrote|creat\w*|synthesi[sz]\w*|distill\w*|"
                        r"annotat\w*|label\w*|rat(?:ed|ings?)|collected from|sampled from|"
                        r"from (?:the )?(?:openai|anthropic|google))\b", re.I)
OUTPUT_NOUN = re.compile(r"\b(outputs?|responses?|completions?|answers?)\b", re.I)
COMPARISON = re.compile(r"\b(compar\w*|outperform\w*|beats?|better|worse|vs\.?|versus|benchmark\w*|preferred|"
                        r"win[- ]?rates?|on par|rivals?|surpass\w*|evaluat\w*|baselines?|unlike|similar\w*)\b", re.I)
ATTRIBUTED = re.compile(r"\b(by|with|using|from|via|of)\s+(?:[\w'-]+\s+){0,2}$", re.I)  # "... generated by <API>"

# Conversations people had with a closed chat product and shared (ShareGPT, share links, exports).
# "ShareGPT format" names a JSON layout, not the site, and says nothing about who wrote the data.
_SHAREGPT = r"\bsharegpt(?![-_ ]?(?:format|style|schema|template|json|structure|layout|like|compatible))"
CHAT_PRODUCTS = {  # the product's name; a sentence naming it must also speak of shared conversations
    "openai": re.compile(_SHAREGPT + r"|\bchatgpt\b|\bchat\.openai\.com|\bchatgpt\.com|\bgpt-?(4o?|3\.5)\b", re.I),
    "anthropic": re.compile(r"\bclaude(?:\.ai)?\b", re.I),
    "google": re.compile(r"\b(?:gemini|bard)\b", re.I),
    "xai": re.compile(r"\bgrok\b", re.I),
}
SHARE_SITES = re.compile(r"sharegpt\.com|chat\.openai\.com|chatgpt\.com|claude\.ai|g\.co/gemini/share|"
                         r"gemini\.google\.com/share|bard\.google\.com|grok\.com/share", re.I)
CONVERSATION = re.compile(r"\b(conversations?|chats?|dialog(?:ue)?s?|transcripts?|chat ?logs?|chat histor(?:y|ies)|"
                          r"threads?)\b", re.I)
SHARING = re.compile(r"\b(shar(?:ed|ing|es)|share ?(?:links?|urls?)|export\w*|scrap\w*|crawl\w*|collected|"
                     r"gathered|harvested|donated|contributed|submitted|users?'?)\b", re.I)
# Only the user's side taken ("prompts from ShareGPT"): people wrote those, not the product.
PROMPTS = re.compile(r"\b(prompts?|questions?|instructions?|queries|user turns?)\b", re.I)
REPLIES = re.compile(r"\b(responses?|answers?|replies|outputs?|completions?|assistant)\b", re.I)


def card_text_findings(card: Card) -> list[Finding]:
    """Sentences of the card's text that say a closed API produced the data, or that the data are
    conversations shared from a closed chat product (a block whatever role labels the rows use).
    A sentence that names a provider only to deny it ("no OpenAI models were used") is not evidence."""
    findings = []
    for offset, line in enumerate(card.body.splitlines()):
        for sentence in re.split(r"(?<=[.!?])\s+", line):
            if NEGATION.search(sentence):
                continue
            ev = f"{card.path}:{card.body_line + offset}: {sentence.strip()[:160]}"
            shared = shared_chat(sentence)
            findings += [Finding("block", f"closed-api:{api.key}", "the dataset card says the data are "
                                 f"conversations shared from {api.provider}'s chat product; its terms forbid using "
                                 "outputs to develop competing models", [ev], api.citation) for api in shared]
            if shared:
                continue
            for api in CLOSED_APIS:
                mention = api.mention.search(sentence)
                if not mention:
                    continue
                if says_generated(sentence, mention.start()):
                    findings.append(closed_finding(api, [ev], "the dataset card says the data came from"))
                break
    return findings


def says_generated(sentence: str, at: int) -> bool:
    """Whether a sentence naming a provider (at `at`) says it wrote the data. In a comparison
    ("our answers were preferred over ChatGPT's"), only a generation verb attributed to the
    provider ("generated with GPT-4") counts."""
    if not COMPARISON.search(sentence):
        return bool(GENERATION.search(sentence) or OUTPUT_NOUN.search(sentence))
    return bool(GENERATION.search(sentence) and ATTRIBUTED.search(sentence[:at]))


def shared_chat(sentence: str) -> list[ClosedApi]:
    """The providers whose chat products a sentence says the conversations were shared from: a
    share site or export with conversations or sharing words, the ShareGPT name with
    conversations, or a product's name with both ("user conversations with Claude")."""
    if PROMPTS.search(sentence) and not REPLIES.search(sentence):
        return []
    conversation, sharing = CONVERSATION.search(sentence), SHARING.search(sentence)
    site = SHARE_SITES.search(sentence)
    if COMPARISON.search(sentence) and not site:
        return []  # "conversations users had with our bot and with ChatGPT are compared"
    found = []
    for api in CLOSED_APIS:
        name = CHAT_PRODUCTS[api.key].search(sentence) if api.key in CHAT_PRODUCTS else None
        if not name:
            continue
        sharegpt = name.group(0).lower().startswith("sharegpt")
        if (site and (conversation or sharing)) or (sharegpt and conversation) or (conversation and sharing):
            found.append(api)
    return found


def cached_card(repo_id: str, repo_type: str = "model") -> Path | None:
    """The card (README.md) of a Hugging Face repo in the local cache; never downloads."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "README.md", repo_type=repo_type)
    except Exception:  # noqa: BLE001 - a cache lookup must never break the gate
        return None
    return Path(found) if isinstance(found, str) else None
