"""Tool calling in conversations (OpenAI's shape): a record's `tools` (function definitions, passed to the
chat template), assistant `tool_calls` (id, function name, JSON arguments) and `tool` results
(`tool_call_id`).

`checked` validates a conversation's calls and results against each other and the definitions (one line
naming the message on each error) and gives the messages in the shape chat templates read: each call as
{"id", "type": "function", "function": {"name", "arguments": <object>}}. `parse_calls` reads the calls back
out of generated text in our ChatML template's syntax (`<tool_call>{"name", "arguments"}</tool_call>`), for
`dist-ft serve`."""

from __future__ import annotations

import json
import re
import secrets

from ..errors import UserError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)


def definitions(raw, where: str) -> list[dict] | None:
    """A record's `tools`: a list of {"type": "function", "function": {"name", ...}} (None where absent)."""
    if raw is None:
        return None
    ok = isinstance(raw, list) and all(
        isinstance(t, dict)
        and t.get("type", "function") == "function"
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
        for t in raw
    )
    if not ok:
        raise UserError(
            f"{where}: 'tools' must be a list of function definitions, each "
            '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}'
        )
    return [{"type": "function", "function": t["function"]} for t in raw]


def _arguments(raw, where: str, i: int, name: str) -> dict:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{where}: message {i}: the arguments of the call to '{name}' are not JSON ({e.msg} at "
                f'character {e.pos}); write them as a JSON object string, e.g. \'{{"city": "Quenmar"}}\''
            ) from None
    if not isinstance(raw, dict):
        raise UserError(
            f"{where}: message {i}: the arguments of the call to '{name}' must be a JSON object, got JSON "
            f"{type(raw).__name__}"
        )
    return raw


def _calls(raw, where: str, i: int, names: set[str] | None) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where}: message {i}: 'tool_calls' must be a non-empty list of calls")
    out = []
    for c in raw:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UserError(
                f"{where}: message {i}: each tool call needs "
                '{"id": ..., "type": "function", "function": {"name": ..., "arguments": "{...}"}}'
            )
        name = fn["name"]
        if names is None or name not in names:
            have = (
                f"the record's tools are {', '.join(sorted(names))}" if names else "the record has no 'tools'"
            )
            raise UserError(
                f"{where}: message {i} calls tool '{name}', which is not defined ({have}); add its "
                "definition to the record's 'tools'"
            )
        call_id = c.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise UserError(f"{where}: message {i}: a tool call's 'id' must be a string")
        args = _arguments(fn.get("arguments", {}), where, i, name)
        out.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
    return out


def checked(msgs: list[dict], tools: list[dict] | None, where: str) -> list[dict]:
    """The messages with their calls normalized; every tool result answers a call of the assistant message
    before it, by id."""
    names = {t["function"]["name"] for t in tools} if tools is not None else None
    out: list[dict] = []
    pending: set[str] = set()
    for i, m in enumerate(msgs):
        m = dict(m)
        if m["role"] == "assistant":
            pending = set()
            if m.get("tool_calls") is not None:
                m["tool_calls"] = _calls(m["tool_calls"], where, i, names)
                pending = {c["id"] for c in m["tool_calls"] if c["id"] is not None}
        elif m["role"] == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in pending:
                have = (
                    f"the calls before it are {', '.join(sorted(pending))}"
                    if pending
                    else "no call has an id"
                )
                raise UserError(
                    f"{where}: message {i} is a tool result for call id {call_id!r}, which no call before it "
                    f"made ({have}); set its 'tool_call_id' to the id of the call it answers"
                )
        out.append(m)
    return out


def parse_calls(text: str) -> tuple[str, list[dict]]:
    """(the text outside the calls, the calls in OpenAI's response shape: id, type, function {name,
    arguments as a JSON string}) of a generated reply; a block that is not {"name", "arguments"} JSON is left
    in the text."""
    calls, rest, last = [], [], 0
    for m in _CALL.finditer(text):
        try:
            body = json.loads(m.group(1))
            name, args = body["name"], body.get("arguments", {})
            ok = isinstance(name, str) and isinstance(args, dict)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            continue
        rest.append(text[last : m.start()])
        last = m.end()
        calls.append(
            {
                "id": f"call_{secrets.token_hex(12)}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
    rest.append(text[last:])
    return "".join(rest).strip(), calls
