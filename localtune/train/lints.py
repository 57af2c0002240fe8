"""Data lints: what a chat template or a row does wrong to the trained tokens, found before training.

Most silent fine-tuning failures are rendering bugs: the assistant header inside the loss (mlx-lm PR #584),
no end-of-turn token so the model never stops, a double BOS, a template that drops the system prompt or
the tools. `lint` reads a stage's encoded examples (data.encode) and probes the template with sentinel
texts; it returns findings, errors first.

Levels: what every row shares comes from the template or the tokenizer, and training on it teaches the
model something wrong everywhere: an error. What only some rows show comes from those rows' text, and the
rest of the data still trains well: a warning that names the rows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import DataError
from .data import Dataset, Encoder, Example, encode_row

SYSTEM_PROBE = "Sentinel system text 7f3a"
TOOL_PROBE = "localtune_probe_tool"
CALL_PROBE = "localtune_probe_call"
ANSWER_PROBE = "Sentinel answer 9c2e"
SHOWN_ROWS = 3  # rows named in a finding; the count says how many more


@dataclass
class Finding:
    level: str  # "error" | "warn"
    lint: str  # header_in_loss, no_eos, double_bos, drops_system, drops_tools, truncated, nothing_to_train, ...
    where: str  # the first rows it fires on ("train.jsonl:3, train.jsonl:7 and 5 more rows") or the template
    message: str
    fix: str
    rows: int = 0  # rows it fires on (0: the template itself)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return f"{self.level}: [{self.lint}] {self.where}: {self.message}\n  fix: {self.fix}"


class Probe:
    """What the chat template does with known inputs: its assistant header, its end of turn, what it drops."""

    def __init__(self, tokenizer, thinking: str = "keep"):
        self.tokenizer, self.enc = tokenizer, Encoder(tokenizer, thinking=thinking)

    def text(self, msgs, add_generation_prompt=False, tools=None) -> str:
        return self.tokenizer.decode(self.enc.template(msgs, add_generation_prompt, tools))

    def answer_parts(self) -> tuple[str, str]:
        """(the text before a probe answer that is not the user turn, the text after it)."""
        from jinja2 import TemplateError

        user = [{"role": "user", "content": "Hi"}]
        try:
            full = self.text(user + [{"role": "assistant", "content": ANSWER_PROBE}])
            prompt = self.text(user)
        except (TemplateError, TypeError, ValueError):  # a template with its own rules: the rows' lints still run
            return "", ""
        before, _, after = full.partition(ANSWER_PROBE)
        return (before[len(prompt):] if before.startswith(prompt) else ""), after

    def header(self) -> str:
        """The assistant header's first line, e.g. "<|im_start|>assistant" ("" when there is none)."""
        head = self.answer_parts()[0].strip()
        return head.splitlines()[0].strip() if head else ""

    def end_ids(self) -> set[int]:
        """Tokens that end a turn: the tokenizer's EOS ids and the special tokens the template closes a turn with."""
        tok = self.tokenizer
        ids = set(getattr(tok, "eos_token_ids", None) or ()) | ({tok.eos_token_id} - {None})
        if self.enc.has_template:
            special = set(tok.all_special_ids)
            ids |= {t for t in tok.encode(self.answer_parts()[1], add_special_tokens=False) if t in special}
        return ids

    def example(self, fmt: str, mask_prompt: bool) -> Dataset:
        """A one-row dataset of a probe question and answer, encoded as the stage's rows are."""
        row = {"text": ANSWER_PROBE} if fmt == "text" else {"prompt": "Hi", "completion": ANSWER_PROBE}
        try:
            ex = encode_row(Encoder(self.tokenizer, mask_prompt, self.enc.thinking), row,
                            "text" if fmt == "text" else "completion", 1 << 16, 0)
        except DataError:  # the template refuses the probe chat: judge the rows alone
            return Dataset([], source="probe")
        return Dataset([ex], source="probe")

    def shows(self, sentinel: str, msgs: list[dict], tools=None) -> bool | None:
        """Whether the sentinel survives rendering; None when the template refuses the chat (then the rows that
        need it failed already, naming themselves, in data.encode)."""
        from jinja2 import TemplateError

        try:
            return sentinel in self.text(msgs, tools=tools)
        except (TemplateError, TypeError, ValueError):
            return None

    def keeps_system(self) -> bool | None:
        return self.shows(SYSTEM_PROBE, [{"role": "system", "content": SYSTEM_PROBE},
                                         {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ok"}])

    def keeps_tool_schemas(self) -> bool | None:
        tools = [{"type": "function", "function": {"name": TOOL_PROBE, "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        return self.shows(TOOL_PROBE, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ok"}],
                          tools)

    def keeps_tool_calls(self) -> bool | None:
        call = {"type": "function", "function": {"name": CALL_PROBE, "arguments": {}}}
        return self.shows(CALL_PROBE, [{"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "", "tool_calls": [call]}])


def spans(mask) -> list[tuple[int, int]]:
    """[start, end) runs of trained positions."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def rows_n(n: int) -> str:
    return f"{n} row" + ("s" if n != 1 else "")


def _where(ds: Dataset, rows: list[int]) -> str:
    shown = ", ".join(ds.where_of(r) for r in rows[:SHOWN_ROWS])
    return shown + (f" and {len(rows) - SHOWN_ROWS} more rows" if len(rows) > SHOWN_ROWS else "")


def _header_rows(ds: Dataset, tokenizer, header: str) -> list[int]:
    return [e.source_row for e in ds.examples
            if any(tokenizer.decode(e.tokens[a:b].tolist()).lstrip().startswith(header) for a, b in spans(e.loss_mask))]


def _no_eos_rows(ds: Dataset, tokenizer, end_ids: set[int]) -> list[int]:
    bad = []
    for e in ds.examples:
        for a, b in spans(e.loss_mask):
            if e.truncated and b == len(e.tokens):
                continue  # cut by max_seq_len: reported as truncated
            last = next((int(t) for t in e.tokens[a:b][::-1]  # the last token that is not whitespace
                         if int(t) in end_ids or tokenizer.decode([int(t)]).strip()), None)
            if last is not None and last not in end_ids:
                bad.append(e.source_row)
                break
    return bad


def _double_bos_rows(ds: Dataset, tokenizer) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [e.source_row for e in ds.examples if len(e.tokens) > 1 and e.tokens[0] == e.tokens[1] == bos]


def applies(ds, fmt: str) -> bool:
    """Lints read rows encoded by data.encode (SFT-like stages), not pairs or prompts."""
    return (fmt in ("messages", "completion", "text") and type(ds) is Dataset
            and all(type(e) is Example for e in ds.examples[:1]))


def lint(ds: Dataset, tokenizer, rows: list[dict], fmt: str, max_seq_len: int, mask_prompt: bool = True,
         thinking: str = "keep") -> list[Finding]:
    """Findings over every encoded row of one stage (ds = data.encode(rows, ...)), errors first."""
    probe = Probe(tokenizer, thinking)
    chat = fmt == "messages" or (fmt == "completion" and probe.enc.has_template)
    n = len(rows)
    found: list[Finding] = []

    def add(level, lint_id, bad, message, fix):
        if bad:
            found.append(Finding(level, lint_id, _where(ds, bad), message, fix, len(bad)))

    header = probe.header() if chat and mask_prompt else ""
    if header:
        add("error", "header_in_loss", _header_rows(ds, tokenizer, header),
            f"the trained tokens start with the assistant header {header!r}: the model learns to write the header "
            "inside its answers (the template probably ignores add_generation_prompt, mlx-lm PR #584)",
            "use a chat template that writes the assistant header when add_generation_prompt is true")
    # The probe row shows what the template does to every row (an error); otherwise the rows' own text (a warning).
    sample = probe.example(fmt, mask_prompt)
    end_ids = probe.end_ids()
    eos = " or ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in sorted(end_ids))
    if _no_eos_rows(sample, tokenizer, end_ids):
        add("error", "no_eos", [e.source_row for e in ds.examples],
            f"the trained turns end without an end-of-turn token ({eos}): the model never learns to stop",
            "use a chat template that closes each assistant turn with its end-of-turn token (or EOS)")
    else:
        no_eos = _no_eos_rows(ds, tokenizer, end_ids)
        add("warn", "no_eos", no_eos, f"{len(no_eos)} of {rows_n(len(ds.examples))} end a trained turn without an "
            f"end-of-turn token ({eos}): on those the model does not learn to stop",
            "check how those rows' answers end (text after the answer, a stray role marker)")
    if _double_bos_rows(sample, tokenizer):
        add("error", "double_bos", [e.source_row for e in ds.examples], f"every row starts with two BOS tokens "
            f"({tokenizer.bos_token!r} twice): the chat template writes the BOS token more than once",
            "remove the extra bos_token from the chat template")
    else:
        double = _double_bos_rows(ds, tokenizer)
        add("warn", "double_bos", double, f"{rows_n(len(double))} start with two BOS tokens ({tokenizer.bos_token!r} "
            "twice): their text starts with the BOS token, and the tokenizer adds another",
            f"remove the leading {tokenizer.bos_token!r} from those rows")
    found += _template_findings(probe, ds, rows, fmt)
    if not ds.examples:
        found.append(Finding("error", "no_trainable_rows", ds.source, f"none of the {n} rows has a token to train",
                             "check the rows have assistant turns or completions, and raise max_seq_len if they "
                             "were cut", n))
    else:
        add("warn", "nothing_to_train", ds.dropped_rows,
            f"{len(ds.dropped_rows)} of {rows_n(n)} have no token to train and are skipped",
            "raise max_seq_len if the prompts are long, or drop those rows")
    add("warn", "truncated", ds.truncated_rows, f"{len(ds.truncated_rows)} of {rows_n(n)} are longer than "
        f"max_seq_len={max_seq_len} and are cut", f"raise max_seq_len above {max_seq_len}, or shorten those rows")
    add("warn", "skipped_turns", [e.source_row for e in ds.examples if e.skipped_turns],
        "earlier assistant turns of these rows are not trained: the template renders a turn differently once "
        "later turns follow (e.g. it drops their reasoning), or the chat opens with an assistant turn",
        "split multi-turn rows into one row per assistant turn to train every turn")
    return sorted(found, key=lambda f: f.level != "error")


def _template_findings(probe: Probe, ds: Dataset, rows: list[dict], fmt: str) -> list[Finding]:
    """The template drops what the rows carry: the system prompt, the tool schemas, the tool calls."""
    if fmt != "messages":
        return []
    out = []
    system_rows = [i for i, r in enumerate(rows) if any(m["role"] == "system" for m in r["messages"])]
    if system_rows and probe.keeps_system() is False:
        out.append(Finding("error", "drops_system", _where(ds, system_rows),
                           "the chat template drops the system prompt: the system messages of "
                           f"{rows_n(len(system_rows))} never reach the model",
                           "use a chat template that renders system messages, or move the system text into the "
                           "first user message", len(system_rows)))
    schema_rows = [i for i, r in enumerate(rows) if r.get("tools")]
    call_rows = [i for i, r in enumerate(rows) if any(m.get("tool_calls") for m in r["messages"])]
    dropped = [what for what, bad in (("tool schemas", schema_rows and probe.keeps_tool_schemas() is False),
                                      ("tool calls", call_rows and probe.keeps_tool_calls() is False)) if bad]
    if dropped:
        tool_rows = sorted(set(schema_rows) | set(call_rows))
        out.append(Finding("error", "drops_tools", _where(ds, tool_rows),
                           f"the chat template drops the {' and the '.join(dropped)}: {rows_n(len(tool_rows))} "
                           "use tools and would train without them", "use a model (or a chat template) that "
                           "renders tools and tool_calls, as tool-calling models' templates do", len(tool_rows)))
    return out
