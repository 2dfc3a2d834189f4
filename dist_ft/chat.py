"""`dist-ft chat`: interactive multi-turn chat with streamed tokens, or one-shot with --prompt
(inference.py generates)."""

from __future__ import annotations

import sys

from .faults import NONE, Faults
from .inference import stream


def interactive(tok, model, system: str | None, **gen) -> None:
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    print("dist-ft chat — type a message; /reset clears the conversation, /exit quits.")
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = list(base)
            print("(conversation cleared)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("bot> ")
        history.append({"role": "assistant", "content": answer_streamed(tok, model, history, **gen)})


def answer_streamed(
    tok,
    model,
    history: list[dict],
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    faults: Faults = NONE,
) -> str:
    """Print the reply to `history` token by token as it is generated (then a newline); return it."""
    ids = list(
        tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    parts = []
    for d in stream(
        tok, model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, faults=faults
    ):
        parts.append(d.text)
        sys.stdout.write(d.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(parts)
