"""Chat rows as a chat template wants them: tool calls, tool turns and thinking blocks.

A canonical "messages" row is {"messages": [...], "tools": [...]?}. Assistant turns may carry OpenAI
`tool_calls` (content empty or missing); `tool` turns carry a tool's result. Checks name the row and the
message index; `clean` rewrites a row into what templates render (arguments as objects, no None content,
thinking stripped when asked).
"""
from __future__ import annotations

import json
import re

from ..errors import DataError

ROLES = ("system", "user", "assistant", "tool")
THINKING = ("keep", "strip")
THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
REASONING_KEYS = ("reasoning_content", "thinking")  # where chat datasets keep an assistant's reasoning
CALL_SHAPE = '{"type": "function", "function": {"name": string, "arguments": object or JSON string}}'


def _short(value) -> str:
    return json.dumps(value, ensure_ascii=False)[:80]


def check_tools(tools, where: str) -> None:
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f'{where}: "tools" must be a list of OpenAI function schemas '
                        '({"type": "function", "function": {"name", "description", "parameters"}}), '
                        f"got {_short(tools)}\n  fix: write the row's tools as a JSON list of objects")
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool)
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(f'{where}: tools[{i}] has no function name, got {_short(tool)}\n'
                            '  fix: give each tool {"type": "function", "function": {"name": ..., "parameters": ...}}')


def _check_call(call, where: str, i: int, j: int) -> None:
    fn = call.get("function") if isinstance(call, dict) else None
    ok = isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]
    args = fn.get("arguments", {}) if ok else None
    if ok and isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as e:
            raise DataError(f"{where}: messages[{i}].tool_calls[{j}].function.arguments is not valid JSON "
                            f"({e.msg} at column {e.colno}): {args[:80]}\n"
                            "  fix: write the arguments as a JSON object (or a string holding one)") from None
    if not ok or not isinstance(args, dict):
        raise DataError(f"{where}: messages[{i}].tool_calls[{j}] must be {CALL_SHAPE}, got {_short(call)}")


def check_messages(msgs, where: str) -> None:
    """A chat: roles known, contents strings, tool calls well formed, at least one assistant turn."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, "
                            f"\"content\": string}}, got {_short(m)}")
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list) or not calls:
                raise DataError(f'{where}: messages[{i}] "tool_calls" must be a non-empty list on an assistant '
                                f"message, got {_short(m)}")
            for j, call in enumerate(calls):
                _check_call(call, where, i, j)
        content = m.get("content")
        if not isinstance(content, str) and not (calls and content in (None, "", [])):
            raise DataError(f"{where}: messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, "
                            f"\"content\": string}} (content may be empty only beside tool_calls), got {_short(m)}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f'{where}: no "assistant" message, so there is nothing to learn from this row')


def strip_thinking(text: str) -> str:
    return THINK_BLOCK.sub("", text)


def clean(msgs: list[dict], thinking: str = "keep") -> list[dict]:
    """Messages as templates render them: no None content, arguments as objects, thinking kept or stripped."""
    out = []
    for m in msgs:
        m = dict(m)
        if m.get("content") is None or m.get("content") == []:
            m["content"] = ""
        if m.get("tool_calls"):
            m["tool_calls"] = [_call_with_object_arguments(c) for c in m["tool_calls"]]
        if thinking == "strip" and m["role"] == "assistant":
            m["content"] = strip_thinking(m["content"])
            for key in REASONING_KEYS:
                m.pop(key, None)
        out.append(m)
    return out


def _call_with_object_arguments(call: dict) -> dict:
    # Templates print arguments with `tojson`: a JSON string would be quoted twice.
    fn = dict(call["function"])
    args = fn.get("arguments")
    if isinstance(args, str):
        fn["arguments"] = json.loads(args) if args.strip() else {}
    elif args is None:
        fn["arguments"] = {}
    return {**call, "type": call.get("type", "function"), "function": fn}
