"""The shapes rows come in, found by their columns, and the canonical rows the methods read.

Canonical formats (train/data.py encodes them):
  messages    {"messages": [{"role", "content"}...], "tools"?: [...]}
  completion  {"prompt", "completion"}
  text        {"text"}
  preference  {"prompt", "chosen", "rejected"}; chosen/rejected strings or message lists
  prompt      {"prompt"}                        prompts alone (PPO, GRPO, sequence distillation)
  labelled    {"prompt", "completion", "label": bool}   unpaired thumbs-up / thumbs-down rows (KTO)

A row may fit several shapes (UltraFeedback rows hold "messages" and "chosen"/"rejected"): the
stage's method decides among them, and when it accepts more than one, the user does, with `columns`.
"""
from __future__ import annotations

import difflib
import json
import os
import re

from ..errors import DataError

PRECEDENCE = ("preference", "labelled", "messages", "completion", "text", "prompt")
# columns a recipe's `columns` table may map; every other column is kept as it is (rewards read them)
TARGETS = ("messages", "conversations", "prompt", "completion", "text", "chosen", "rejected", "label", "tools",
           "instruction", "input", "output")
KEPT = ("tools",)  # format columns that do not decide the format: kept when `columns` maps others
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system", "tool": "tool"}
DESCRIBE = {
    "openai": "OpenAI messages (messages: role/content)",
    "conversations": "chat conversations (conversations: role/content)",
    "sharegpt": "ShareGPT conversations (conversations: from/value)",
    "alpaca": "Alpaca instructions (instruction/input/output)",
    "preference": "preference pairs (prompt/chosen/rejected)",
    "preference-conversations": "preference pairs as whole conversations (chosen/rejected message lists)",
    "preference-text": "preference pairs as whole texts (chosen/rejected, the prompt their shared beginning)",
    "labelled": "labelled completions (prompt/completion/label)",
    "completion": "prompt/completion pairs",
    "chat-completion": "prompt/completion message lists",
    "text": "plain text (text)",
    "prompt": "prompts (prompt)",
}
CANONICAL = {"openai": "messages", "conversations": "messages", "sharegpt": "messages", "alpaca": "completion",
             "preference": "preference", "preference-conversations": "preference", "preference-text": "preference",
             "labelled": "labelled", "completion": "completion", "chat-completion": "messages", "text": "text",
             "prompt": "prompt"}


def _is_chat(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def shapes(row: dict) -> list[str]:
    """Every shape the row fits, most specific first."""
    out = []
    if "chosen" in row or "rejected" in row:
        chosen = row.get("chosen")
        if _is_chat(chosen) and ("prompt" not in row or chosen[0].get("role") in ("system", "user")):
            out.append("preference-conversations")  # whole chats (UltraFeedback-binarized, prompt column or not)
        elif isinstance(row.get("chosen"), str) and "prompt" not in row:
            out.append("preference-text")
        else:
            out.append("preference")
    if "label" in row and "prompt" in row and "completion" in row:
        out.append("labelled")
    if "messages" in row:
        out.append("openai")
    conv = row.get("conversations")
    if _is_chat(conv):
        out.append("sharegpt" if "from" in conv[0] or "value" in conv[0] else "conversations")
    if "instruction" in row and "output" in row:
        out.append("alpaca")
    if "prompt" in row and "completion" in row and "label" not in row:
        out.append("chat-completion" if _is_chat(row["prompt"]) and _is_chat(row["completion"]) else "completion")
    if "text" in row:
        out.append("text")
    if "prompt" in row and not ({"completion", "chosen", "rejected"} & set(row)):
        out.append("prompt")
    return out


def choose(found: list[str], accept: tuple | None, where: str) -> str:
    """The shape to read: the one the stage accepts; several accepted -> the user chooses."""
    fits = [s for s in found if accept is None or CANONICAL[s] in accept]
    fmts = {CANONICAL[s] for s in fits}
    if len(fmts) > 1 and accept is not None and "prompt" not in accept:  # prompt-only methods read the prompt alone
        options = "\n".join(f"    {DESCRIBE[s]}: columns = {{ {_mapping(s)} }}" for s in fits)
        raise DataError(f"{where}: the rows fit more than one format this stage reads, so localtune will not guess:\n"
                        f"{options}\n  fix: add the `columns` line of the one you mean to the stage")
    pool = fits or found
    return min(pool, key=lambda s: PRECEDENCE.index(CANONICAL[s]))


def _mapping(shape: str) -> str:
    keys = {"openai": ["messages"], "conversations": ["conversations"], "sharegpt": ["conversations"],
            "alpaca": ["instruction", "input", "output"], "preference": ["prompt", "chosen", "rejected"],
            "preference-conversations": ["chosen", "rejected"], "preference-text": ["chosen", "rejected"],
            "labelled": ["prompt", "completion", "label"], "completion": ["prompt", "completion"],
            "chat-completion": ["prompt", "completion"], "text": ["text"], "prompt": ["prompt"]}[shape]
    return ", ".join(f'{k} = "{k}"' for k in keys)


def check_columns(columns: dict | None) -> tuple[str, str] | None:
    """A recipe's `columns` table: (message, fix) for its first fault, or None."""
    for target, column in (columns or {}).items():
        if target not in TARGETS:
            close = difflib.get_close_matches(target, TARGETS, n=1)
            return (f'columns: "{target}" is not a format column.' + (f' Did you mean "{close[0]}"?' if close else ""),
                    f"map one of {', '.join(TARGETS)} to a column of the data")
        if not isinstance(column, str) or not column:
            return f"columns: {target} must name a column (a string), got {column!r}", f'write {target} = "the_column"'
    return None


def map_columns(row: dict, columns: dict, where: str) -> dict:
    """`columns = { prompt = "question" }`: the named columns become the format's columns. Columns not
    mapped keep their names, except format columns, which would make the format ambiguous again."""
    out = {k: v for k, v in row.items() if k not in TARGETS or k in KEPT}
    for target, column in columns.items():
        if column not in row:
            raise DataError(f'{where}: no column "{column}" (columns = {{ {target} = "{column}" }}); this row has '
                            f"{', '.join(sorted(row))}\n  fix: name one of those columns in the stage's `columns`")
        out[target] = row[column]
    return out


def canonical(row: dict, shape: str, where: str) -> dict:
    """The row in its canonical format; columns the format does not use are kept."""
    if shape in ("openai", "preference", "completion", "text", "prompt"):
        return row
    rest = {k: v for k, v in row.items() if k not in TARGETS or k == "tools"}
    if shape in ("conversations", "sharegpt"):
        return {**rest, "messages": [_turn(m, shape, where, i) for i, m in enumerate(row["conversations"])]}
    if shape == "alpaca":
        prompt = str(row["instruction"]) + (f"\n\n{row['input']}" if row.get("input") else "")
        return {**rest, "prompt": prompt, "completion": row["output"]}
    if shape == "chat-completion":
        return {**rest, "messages": row["prompt"] + row["completion"]}
    if shape == "labelled":
        return {**rest, "prompt": row["prompt"], "completion": row["completion"], "label": _label(row["label"], where)}
    if shape == "preference-conversations":
        return {**rest, **_split_conversations(row, where)}
    return {**rest, **_split_texts(row, where)}  # preference-text


def _turn(m, shape: str, where: str, i: int) -> dict:
    if shape == "conversations":
        return m
    role = SHAREGPT_ROLES.get(str(m.get("from", "")).lower())
    if role is None:
        raise DataError(f'{where}: conversations[{i}] has from = {json.dumps(m.get("from"))}; ShareGPT rows use '
                        f"{', '.join(SHAREGPT_ROLES)}\n  fix: rename that speaker in the data")
    return {"role": role, "content": m.get("value")}


def _label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text_cells = re.search(r"\.csv:\d+$", where, re.IGNORECASE) is not None  # CSV cells are text; JSON has booleans
    if text_cells and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise DataError(f'{where}: "label" must be true or false (thumbs up or down), got {json.dumps(value)}\n'
                    "  fix: write the label as true or false (a JSON boolean without quotes, or the text "
                    "true/false in a CSV cell)")


def _split_conversations(row: dict, where: str) -> dict:
    """UltraFeedback-binarized rows: chosen and rejected are whole conversations; their shared
    beginning is the prompt."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not (_is_chat(chosen) and _is_chat(rejected)):
        raise DataError(f'{where}: "chosen" is a conversation, so "rejected" must be one too, got '
                        f"{type(rejected).__name__}")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and chosen[k - 1].get("role") == "assistant":  # the responses start at an assistant turn
        k -= 1
    if k == 0:
        raise DataError(f"{where}: chosen and rejected share no beginning, so there is no prompt to answer\n"
                        '  fix: add a "prompt" column (or map one with columns = { prompt = "..." })')
    return {"prompt": chosen[:k], "chosen": chosen[k:], "rejected": rejected[k:]}


MARKERS = ("\n\nAssistant:", "\nAssistant:", "<|im_start|>assistant\n", "[/INST]")


def _split_texts(row: dict, where: str) -> dict:
    """Anthropic-HH rows: chosen and rejected are whole dialogues as text; the prompt is their shared
    beginning, up to the last assistant marker in it (or the last whitespace)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not isinstance(rejected, str):
        raise DataError(f'{where}: "chosen" is text, so "rejected" must be too, got {type(rejected).__name__}')
    shared = os.path.commonprefix([chosen, rejected])
    cut = max((shared.rfind(m) + len(m) for m in MARKERS if m in shared), default=-1)
    if cut < 0:
        cut = max(shared.rfind(" "), shared.rfind("\n")) + 1
    if cut <= 0:
        raise DataError(f"{where}: chosen and rejected share no beginning, so there is no prompt to answer\n"
                        '  fix: add a "prompt" column (or map one with columns = { prompt = "..." })')
    return {"prompt": chosen[:cut], "chosen": chosen[cut:].strip(), "rejected": rejected[cut:].strip()}
