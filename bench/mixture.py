"""The shipped mixture (configs/mixture.yaml) before and after training, on its held-out sets.

    python bench/mixture.py          # SmolLM2-135M-Instruct: writes bench/results/mixture.{json,md}

SmolLM2-135M-Instruct with our ChatML template (`model.chat_template: chatml`, which renders tools) is scored on
data/demo/tools-heldout.jsonl (24 requests for the weather in 4 towns never trained on: the greedy reply's tool
calls must be exactly get_weather({"town": <town>})) and data/demo/heldout.jsonl (48 Veloria questions in
unseen phrasings: the answer contains the fact), then trained on the mixture (chat 0.5, tool calls 0.35, raw
prose 0.15 as task pretrain) and scored again. Wall time, the per-source tokens seen and the per-source
validation losses of the run are recorded too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OUT = REPO / "bench" / "results"


def main() -> None:
    import torch

    from dist_ft import inference, train
    from dist_ft.config import load_config
    from dist_ft.evaluate import score
    from dist_ft.model import load_model
    from dist_ft.tokenizer import load_tokenizer

    torch.set_num_threads(2)
    cfg = load_config(str(REPO / "configs" / "mixture.yaml"), ["output.dir=runs/bench-mixture"])
    sets = {"tools": "data/demo/tools-heldout.jsonl", "chat": "data/demo/heldout.jsonl"}

    def scored(tok, model) -> dict:
        s = {k: score(tok, model, str(REPO / v)) for k, v in sets.items()}
        return {
            "tool_calls_exact": s["tools"]["tool_accuracy"],
            "chat_answer_accuracy": s["chat"]["accuracy"],
        }

    tok = load_tokenizer(cfg.model)
    base = load_model(cfg.model, tok, torch.float32, adapters=False)
    before = scored(tok, base)
    del base
    t0 = time.perf_counter()
    out = train.run(cfg)
    wall = time.perf_counter() - t0
    tok, tuned = inference.load(str(out / "final"))
    after = scored(tok, tuned)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r and "tokens" in r]
    seen = {k: sum(r[k] for r in steps) for k in steps[0] if k.startswith("tokens_") and k != "tokens_per_s"}
    evals = [r for r in recs if "val_loss" in r]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "model": "SmolLM2-135M-Instruct (chatml template)",
        "before": before,
        "after": after,
        "train_wall_s": round(wall, 1),
        "steps": len(steps),
        "tokens_seen": seen,
        "val_first": {k: v for k, v in evals[0].items() if k.startswith("val_loss")} if evals else {},
        "val_last": {k: v for k, v in evals[-1].items() if k.startswith("val_loss")} if evals else {},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "mixture.json").write_text(json.dumps(result, indent=2) + "\n")
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    (OUT / "mixture.md").write_text(
        "| held-out set | before | after |\n|---|---|---|\n"
        f"| tool calls exact (24, unseen towns) | {pct(before['tool_calls_exact'])} | "
        f"{pct(after['tool_calls_exact'])} |\n"
        f"| chat answers contain the fact (48) | {pct(before['chat_answer_accuracy'])} | "
        f"{pct(after['chat_answer_accuracy'])} |\n\n"
        f"{len(steps)} steps in {wall:.0f} s; tokens seen per source: "
        + ", ".join(f"{k[7:]} {v:,}" for k, v in seen.items())
        + "\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
