"""Turn records of any supported format into one `Conversation` type.

Formats: OpenAI `messages` (role/content), ShareGPT `conversations` (from/value), Alpaca
(instruction/input/output), and raw `text` (continued pretraining).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


@dataclass
class Conversation:
    messages: list[dict] = field(default_factory=list)  # [{"role": ..., "content": ...}], validated order
    text: str | None = None  # raw text (pretraining); then messages is empty


def detect(rec: dict, where: str) -> str:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "text" in rec:
        return "text"
    raise UserError(f"{where}: unknown record format (keys: {', '.join(sorted(rec)) or 'none'}); expected 'messages', "
                    "'conversations' (from/value), 'instruction'+'output', or 'text' — or set data.format")


def _check_roles(msgs: list[dict], where: str) -> None:
    roles = [m["role"] for m in msgs]
    body = roles[1:] if roles and roles[0] == "system" else roles
    if not body:
        raise UserError(f"{where}: conversation has no user or assistant turn")
    if "assistant" not in body:
        raise UserError(f"{where}: conversation has no assistant turn, so nothing to learn from; remove it or add the answer")
    for i, r in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if r != want:
            pos = i + (len(roles) - len(body))
            raise UserError(f"{where}: roles out of order at message {pos} ('{r}', expected '{want}'); "
                            "use [system], user, assistant, user, assistant, ...")


def _message_list(raw, where: str, role_key: str, content_key: str, role_map: dict | None) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise UserError(f"{where}: message {i} needs '{role_key}' and '{content_key}'")
        role = m[role_key]
        if role_map is not None:
            if role not in role_map:
                raise UserError(f"{where}: message {i}: unknown speaker '{role}' (expected one of {', '.join(sorted(role_map))})")
            role = role_map[role]
        elif role not in ("system", "user", "assistant"):
            raise UserError(f"{where}: message {i}: unknown role '{role}' (expected system, user or assistant)")
        content = m[content_key]
        if not isinstance(content, str):
            raise UserError(f"{where}: message {i}: content must be a string")
        out.append({"role": role, "content": content})
    return out


def to_conversation(rec: dict, fmt: str, where: str) -> Conversation:
    """One record -> Conversation; `fmt` is 'auto' or a declared format."""
    if fmt == "auto":
        fmt = detect(rec, where)
    try:
        if fmt == "text":
            text = rec["text"]
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{where}: 'text' must be a non-empty string")
            return Conversation(text=text)
        if fmt == "messages":
            msgs = _message_list(rec["messages"], where, "role", "content", None)
        elif fmt == "sharegpt":
            msgs = _message_list(rec["conversations"], where, "from", "value", SHAREGPT_ROLES)
        elif fmt == "alpaca":
            prompt = rec["instruction"] if not rec.get("input") else f"{rec['instruction']}\n\n{rec['input']}"
            msgs = ([{"role": "system", "content": rec["system"]}] if rec.get("system") else []) + [
                {"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]
        else:  # pragma: no cover - config validation restricts fmt
            raise UserError(f"unknown data.format '{fmt}'")
    except KeyError as e:
        raise UserError(f"{where}: record lacks key {e} required by format '{fmt}' (keys: {', '.join(sorted(rec))})") from None
    _check_roles(msgs, where)
    return Conversation(messages=msgs)
