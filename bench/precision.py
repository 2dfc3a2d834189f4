"""Learning, not only speed, per precision (issue #27): SFT and DPO on SmolLM2-135M at each learning rate, dist_ft in
fp32, bf16 (bf16 weights, fp32 masters started from the fp32 weights) and bf16-autocast (fp32 weights, bf16 matmuls),
and TRL's SFTTrainer / DPOTrainer at their bf16 default (autocast over fp32 weights), same records, order and settings
(padded batches; DPO with precomputed reference log-probs, as bench/dpo.py):

    python bench/precision.py              # 50 steps at lr 1e-5 and 1e-4: writes bench/results/precision.{json,md}
    python bench/precision.py --smoke      # tiny GPT-2-shaped model, 3 steps, lr 1e-4: writes nothing

Data: bench/dpo.py's arithmetic pairs ("What is a plus b?", the right sum chosen); SFT trains on prompt + chosen reply.
Held-out: records from another seed, scored for every row by the same code (bench/heldout.py) on the model the run
exported / holds, in fp32: SFT mean loss per assistant token; DPO loss and reward accuracy against the start model.
Per row also: loss at step 1 and final (mean of the last 3 steps), examples/s (conversations or pairs), peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dpo  # noqa: E402
import heldout  # noqa: E402
import run  # noqa: E402
import worker as sft  # noqa: E402

ROWS = [("dist_ft", "fp32"), ("dist_ft", "bf16"), ("dist_ft", "bf16-autocast"), ("trl", "bf16")]


def worker(spec: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from dist_ft.config import ModelConfig
    from dist_ft.tokenizer import load_tokenizer

    torch.set_num_threads(spec["threads"])
    if spec["task"] == "dpo":
        dpo.LR = spec["lr"]  # dist_ft's config reads the module constant; TRL's reads spec["lr"]
        fn = dpo.run_dist_ft if spec["framework"] == "dist_ft" else dpo.run_trl
        res = fn({**spec, "variant": "precomputed" if spec["framework"] == "trl" else "padded"})
    else:
        fn = sft.run_dist_ft if spec["framework"] == "dist_ft" else sft.run_trl
        res = fn({**spec, "variant": "padded", "examples": spec["per_step"]})
    # conversations or pairs, steps 2..S
    res["examples_per_s"] = spec["per_step"] * (res["steps"] - 1) / res["train_s"]
    # held-out, after the run's own figures (peak RSS included) are taken
    tok = load_tokenizer(ModelConfig(path=spec["model"]))
    recs = [json.loads(x) for x in Path(spec["heldout"]).read_text().splitlines()]
    if spec["framework"] == "dist_ft":
        model = AutoModelForCausalLM.from_pretrained(Path(spec["out"]) / "run" / "final", dtype=torch.float32)
    else:
        model = sft.TRAINED[-1].float()
    if spec["task"] == "dpo":
        ex = heldout.pair_examples(tok, recs)
        res.update(heldout.dpo_figures(model, ex, heldout.reference_logps(spec["model"], ex), dpo.BETA))
    else:
        res.update(heldout.sft_loss(model, heldout.sft_examples(tok, recs)))
    print("RESULT " + json.dumps({**spec, **res}), flush=True)


def run_one(spec: dict) -> dict:
    label = f"{spec['task']} {spec['framework']} {spec['precision']} lr {spec['lr']:g}"
    res, _ = run.spawn_worker([__file__, "--worker"], spec, label, {"TQDM_DISABLE": "1"})
    if "error" in res:
        return res
    extra = f"  accuracy {res['heldout_reward_accuracy']:.3f}" if "heldout_reward_accuracy" in res else ""
    print(
        f"  {label:<36} loss {res['step1_loss']:.4f} -> {res['final_loss']:.4f}  held-out {res['heldout_loss']:.4f}{extra}  "
        f"{res['examples_per_s']:.2f} ex/s  {res['tokens_per_s']:.0f} tok/s  RSS {res['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return res


def table(results: list[dict]) -> str:
    lines = [
        "| task | lr | run | precision | loss step 1 | final loss | held-out loss | held-out reward acc. | examples/s | tokens/s "
        "| peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        row = f"| {r['task']} | {r['lr']:g} | {r['framework']} | {r['precision']} |"
        if "error" in r:
            lines.append(row + " failed |" + " |" * 6)
            continue
        acc = f"{r['heldout_reward_accuracy']:.1%}" if "heldout_reward_accuracy" in r else "-"
        lines.append(
            row + f" {r['step1_loss']:.4f} | {r['final_loss']:.4f} | {r['heldout_loss']:.4f} | {acc} | "
            f"{r['examples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:,.0f} MB |"
        )
    return "\n".join(lines)


def _jsonl(path: Path, recs: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 50; 3 with --smoke)"
    )
    ap.add_argument(
        "--lr",
        type=float,
        nargs="+",
        default=None,
        help="learning rates (default 1e-5 1e-4; 1e-4 with --smoke)",
    )
    ap.add_argument("--tasks", nargs="+", choices=["sft", "dpo"], default=["sft", "dpo"])
    ap.add_argument(
        "--per-step", type=int, default=8, help="conversations (SFT) or pairs (DPO) per optimizer step"
    )
    ap.add_argument("--heldout", type=int, default=64, help="held-out conversations / pairs")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--only", choices=["dist_ft", "trl"], help="run one framework's rows")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    steps, lrs = a.steps or (3 if a.smoke else 50), a.lr or ([1e-4] if a.smoke else [1e-5, 1e-4])
    name = "tiny gpt2-2x64 (smoke)" if a.smoke else "smollm2-135m"
    n = steps * a.per_step  # one epoch: every record seen once
    head = (
        f"{name}, {steps} steps, {a.per_step} conversations or pairs per step ({n} records, one epoch), max length {a.max_len}, "
        f"{a.heldout} held-out records, AdamW constant lr, clip 1.0, no weight decay, DPO beta {dpo.BETA} sigmoid"
    )
    print(head, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, train, held = dpo.model_dir(a.smoke, tmp), dpo.pairs(n, seed=0), dpo.pairs(a.heldout, seed=1)

        def chat(recs: list[dict]) -> list[dict]:  # SFT trains on prompt + chosen reply
            return [
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["chosen"]},
                    ]
                }
                for r in recs
            ]

        files = {
            "dpo": (_jsonl(tmp / "pairs.jsonl", train), _jsonl(tmp / "pairs-heldout.jsonl", held)),
            "sft": (_jsonl(tmp / "chat.jsonl", chat(train)), _jsonl(tmp / "chat-heldout.jsonl", chat(held))),
        }
        base = {
            "model_name": name,
            "model": str(model),
            "seq_len": a.max_len,
            "steps": steps,
            "threads": 2,
            "per_step": a.per_step,
            "pairs_per_step": a.per_step,
            "rows": 1,
        }
        results = [
            run_one(
                {
                    **base,
                    "task": t,
                    "data": files[t][0],
                    "heldout": files[t][1],
                    "lr": lr,
                    "framework": f,
                    "precision": p,
                }
            )
            for t in a.tasks
            for lr in lrs
            for f, p in ROWS
            if a.only in (None, f)
        ]
    try:
        who = run.machine()
    except ImportError as e:  # run.machine() names TRL's version
        who = f"(machine line unavailable: {e})"
    md = f"Machine: {who}\n\n{head}\n\nTRL DPO: {dpo.TRL_SETTINGS}\n\n{table(results)}\n"
    print("\n" + md)
    if not a.smoke:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "precision.json").write_text(
            json.dumps({"machine": who, "setup": head, "results": results}, indent=1)
        )
        (HERE / "results" / "precision.md").write_text(md)


if __name__ == "__main__":
    main()
