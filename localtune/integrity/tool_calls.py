"""The tool_call metric: does a generated answer call the right function with the right arguments?

A golden row is a chat whose last message is the assistant's call ({"messages": [..., {"role":
"assistant", "tool_calls": [...]}], "tools": [...]}). The model writes that turn from the rest; its
answer is read as <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (Hermes / Qwen2.5
style), or as one bare JSON object. Three shares: the answer parses; it names the expected functions;
it names them with the expected arguments (JSON-equal: strings exactly, numbers by value).
"""
from __future__ import annotations

import json
import re

from ..errors import DataError

BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)  # an unclosed last block is read too
GOLDEN = ('{"messages": [{"role": "user", ...}, {"role": "assistant", "tool_calls": [{"type": "function", '
          '"function": {"name": ..., "arguments": {...}}}]}], "tools": [...]}')


def _object(text: str) -> dict | None:
    """The first JSON object in `text` (text after it is ignored), or None."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _call(obj: dict | None) -> dict | None:
    """{"name", "arguments"} from a call object: Hermes {"name", "arguments"}, Llama's "parameters",
    or OpenAI's {"function": {...}} with arguments as an object or a JSON string."""
    if obj is None:
        return None
    obj = obj.get("function", obj) if isinstance(obj.get("function"), dict) else obj
    name, args = obj.get("name"), obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not isinstance(args, dict):
        return None
    return {"name": name, "arguments": args}


def parse_calls(answer: str) -> list[dict] | None:
    """The calls in a generated answer, [{"name", "arguments"}], or None when any of them does not parse."""
    blocks = BLOCK.findall(answer) if "<tool_call>" in answer else [answer]
    calls = [_call(_object(block)) for block in blocks]
    return calls if calls and all(c is not None for c in calls) else None


def expected_calls(row: dict) -> list[dict]:
    """The golden row's calls (its last message's tool_calls) as [{"name", "arguments"}]."""
    return [_call(c) for c in row["messages"][-1]["tool_calls"]]


def check_golden(rows: list[dict], source: str) -> None:
    """Every golden row ends with an assistant turn holding tool calls that parse."""
    for i, row in enumerate(rows):
        last = row.get("messages", [{}])[-1]
        calls = last.get("tool_calls") if last.get("role") == "assistant" else None
        if not calls or not isinstance(calls, list) or any(_call(c) is None for c in calls):
            raise DataError(f"{source}: row {i + 1}: metric = \"tool_call\" needs the last message to be the "
                            f"assistant's tool_calls, got {json.dumps(last)[:100]}\n  fix: write golden rows as "
                            f"{GOLDEN}")


def score(answer: str, row: dict) -> tuple[bool, bool, bool]:
    """(parses, right function names, right names and arguments) for one answer."""
    got, want = parse_calls(answer), expected_calls(row)
    if got is None:
        return False, False, False
    names = [c["name"] for c in got] == [c["name"] for c in want]
    return True, names, names and got == want


def show(calls: list[dict]) -> str:
    """Calls as a short line for samples: name {arguments}; ..."""
    return "; ".join(f"{c['name']} {json.dumps(c['arguments'], ensure_ascii=False)}" for c in calls)
