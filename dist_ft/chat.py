"""Chat with an exported model: interactive multi-turn with streamed tokens, or one-shot with --prompt."""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import UserError


def load(model_dir: str, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(model_dir).is_dir() or not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"--model '{model_dir}': not an exported model directory (expected config.json inside, e.g. runs/demo/final)")
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if not tok.chat_template:
        raise UserError(f"--model '{model_dir}': tokenizer has no chat template; export it with dist-ft train (which saves one)")
    return tok, model.eval()


def reply(tok, model, history: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.7,
          top_p: float = 0.9, stream: bool = False) -> str:
    import torch
    from transformers import TextStreamer

    enc = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tok.pad_token_id, **sampling)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


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
