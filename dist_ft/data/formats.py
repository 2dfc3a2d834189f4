"""Turn records of any supported format into one `Conversation` type.

Formats: OpenAI `messages` (role/content; with `tools`, assistant `tool_calls` and `tool` results: tools.py),
ShareGPT `conversations` (from/value), Alpaca (instruction/input/output), and raw `text` (continued
pretraining). A message of `messages` or `conversations` may say `"train": false`: its assistant turn carries
no loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from . import tools as tool_calls

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}


@dataclass
class Conversation:
    messages: list[dict] = field(default_factory=list)  # [{"role": ..., "content": ...}], validated order
    text: str | None = None  # raw text (pretraining); then messages is empty
    tools: list[dict] | None = None  # the record's tool definitions (passed to the chat template)
    trained: list[bool] | None = None  # per message: False where `"train": false` (None: every one)


def detect(rec: dict, where: str) -> str:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "text" in rec:
        return "text"
    raise UserError(
        f"{where}: unknown record format (keys: {', '.join(sorted(rec)) or 'none'}); expected 'messages', "
        "'conversations' (from/value), 'instruction'+'output', or 'text' — or set data.format"
    )


def _check_roles(msgs: list[dict], where: str) -> None:
    """[system], then user and assistant turns in turn; an assistant message with tool calls is followed by
    their `tool` results, then the assistant again."""
    roles = [m["role"] for m in msgs]
    start = 1 if roles and roles[0] == "system" else 0
    if len(roles) == start:
        raise UserError(f"{where}: conversation has no user or assistant turn")
    if "assistant" not in roles[start:]:
        raise UserError(
            f"{where}: conversation has no assistant turn, so nothing to learn from; remove it or add the "
            "answer"
        )
    prev: dict | None = None
    want: tuple[str, ...]
    for pos in range(start, len(msgs)):
        if prev is None:
            want = ("user",)
        elif prev["role"] == "user":
            want = ("assistant",)
        elif prev["role"] == "assistant":
            want = ("tool",) if prev.get("tool_calls") else ("user",)
        else:  # tool
            want = ("tool", "assistant")
        if roles[pos] not in want:
            expected = "' or '".join(want)
            raise UserError(
                f"{where}: roles out of order at message {pos} ('{roles[pos]}', expected '{expected}'); use "
                "[system], user, assistant, user, assistant, ... (an assistant message with tool_calls is "
                "followed by their tool results)"
            )
        prev = msgs[pos]


def json_type(v) -> str:
    """The JSON name of a parsed value's type, for messages."""
    return {
        type(None): "null",
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
    }.get(type(v), "object")


def message_list(
    raw,
    where: str,
    key: str,
    role_key: str,
    content_key: str,
    role_map: dict | None,
    extended: bool = False,
) -> list[dict]:
    """`raw` (a record's `key`) as checked {role, content} messages: a non-empty list of objects with
    `role_key` and `content_key`, roles mapped through `role_map` (None: system, user or assistant only).
    `extended` (SFT conversations): also `tool` messages (with `tool_call_id`), assistant `tool_calls` (whose
    content may be empty or null), and a boolean `train` on assistant messages, all kept."""
    if not isinstance(raw, list) or not raw:
        raise UserError(
            f"{where}: '{key}' must be a non-empty array of messages, got "
            f"{'an empty one' if raw == [] else 'JSON ' + json_type(raw)}; "
            f'give [{{"{role_key}": ..., "{content_key}": ...}}, ...]'
        )
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise UserError(
                f"{where}: message {i} is a JSON {json_type(m)}, not an object; write each message as "
                f'{{"{role_key}": ..., "{content_key}": ...}}'
            )
        calls = extended and m.get(role_key) == "assistant" and m.get("tool_calls") is not None
        missing = [k for k in (role_key, content_key) if k not in m and not (calls and k == content_key)]
        if missing:
            raise UserError(
                f"{where}: message {i} lacks '{missing[0]}' (keys: {', '.join(sorted(m)) or 'none'}); "
                f"each message needs '{role_key}' and '{content_key}'"
            )
        role = m[role_key]
        if role_map is not None:
            if role not in role_map:
                raise UserError(
                    f"{where}: message {i}: unknown speaker '{role}' (expected one of "
                    f"{', '.join(sorted(role_map))})"
                )
            role = role_map[role]
        elif role not in (allowed := ("system", "user", "assistant", *(("tool",) if extended else ()))):
            raise UserError(
                f"{where}: message {i}: unknown role '{role}' (expected {', '.join(allowed[:-1])} or "
                f"{allowed[-1]})"
            )
        content = "" if calls and m.get(content_key) is None else m[content_key]
        msg = {
            "role": role,
            "content": _text(
                content, where, f"message {i} ({role}) '{content_key}'", role == "assistant" and not calls
            ),
        }
        if extended:
            msg |= _extended(m, i, role, where)
        out.append(msg)
    return out


def _extended(m: dict, i: int, role: str, where: str) -> dict:
    """A message's tool fields and `train` flag (checked against each other in tools.checked)."""
    out: dict = {}
    if "train" in m:
        if not isinstance(m["train"], bool) or role != "assistant":
            raise UserError(
                f"{where}: message {i}: 'train' is true or false on an assistant message (whether its turn "
                f"carries loss), got {m['train']!r} on a {role} message"
            )
        out["train"] = m["train"]
    if role == "assistant" and m.get("tool_calls") is not None:
        out["tool_calls"] = m["tool_calls"]
    if role == "tool":
        out["tool_call_id"] = m.get("tool_call_id")
    return out


def _text(v, where: str, what: str, required: bool) -> str:
    """A text field of a record: a string, non-empty where it is what is learned (an assistant turn, an
    answer)."""
    if not isinstance(v, str):
        raise UserError(
            f"{where}: {what} must be a string, got JSON {json_type(v)}"
            + (f" {str(v)[:40]}" if isinstance(v, (int, float)) else "")
            + (
                "; flatten structured content to plain text"
                if isinstance(v, (list, dict))
                else "; give the text"
            )
        )
    if required and not v.strip():
        raise UserError(
            f"{where}: {what} is empty, so there is nothing to learn; write the answer or remove the record"
        )
    return v


def _alpaca(rec: dict, where: str) -> list[dict]:
    instruction = _text(rec["instruction"], where, "alpaca 'instruction'", True)
    output = _text(rec["output"], where, "alpaca 'output'", True)
    extra, system = (
        "" if rec.get(k) is None else _text(rec[k], where, f"alpaca '{k}'", False)  # absent or null: none
        for k in ("input", "system")
    )
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": output},
    ]


def to_conversation(rec: dict, fmt: str, where: str) -> Conversation:
    """One record -> Conversation; `fmt` is 'auto' or a declared format."""
    declared = fmt != "auto"
    if fmt == "auto":
        fmt = detect(rec, where)
    try:
        if fmt == "text":
            text = rec["text"]
            if not isinstance(text, str) or not text.strip():
                raise UserError(
                    f"{where}: 'text' must be a non-empty string, got "
                    f"{'an empty one' if isinstance(text, str) else 'JSON ' + json_type(text)}; give the "
                    "document's text"
                )
            return Conversation(text=text)
        if fmt == "messages":
            msgs = message_list(rec["messages"], where, "messages", "role", "content", None, True)
        elif fmt == "sharegpt":
            msgs = message_list(
                rec["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES, True
            )
        elif fmt == "alpaca":
            msgs = _alpaca(rec, where)
        else:  # pragma: no cover - config validation restricts fmt
            raise UserError(f"unknown data.format '{fmt}'")
    except KeyError as e:
        fix = (
            f"this record is not '{fmt}' (data.format): set data.format: auto to detect each record's format"
            if declared
            else "add it"
        )
        raise UserError(
            f"{where}: record lacks key {e} required by format '{fmt}' (keys: "
            f"{', '.join(sorted(rec)) or 'none'}); {fix}"
        ) from None
    tools = tool_calls.definitions(rec.get("tools"), where)
    msgs = tool_calls.checked(msgs, tools, where)
    _check_roles(msgs, where)
    trained = [m.pop("train", True) for m in msgs]
    return Conversation(messages=msgs, tools=tools, trained=None if all(trained) else trained)
