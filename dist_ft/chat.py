"""`dist-ft chat`: interactive multi-turn chat with streamed tokens, or one-shot with --prompt (inference.py generates)."""

from __future__ import annotations

import sys

from .inference import reply


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
        sys.stdout.flush()
        history.append({"role": "assistant", "content": reply(tok, model, history, stream=True, **gen)})
