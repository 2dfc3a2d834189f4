"""dist_ft DPO (data.task: dpo) against TRL's DPOTrainer, measured side by side on this machine.

    python bench/dpo.py              # SmolLM2-135M, 10 steps x 8 pairs: writes bench/results/dpo.{json,md}
    python bench/dpo.py --smoke      # tiny GPT-2-shaped model, 3 steps, under a minute: writes nothing

Both frameworks load the same model directory and train on the same generated preference pairs (arithmetic
questions, the right sum chosen, a wrong one rejected, filler words for a spread of lengths: 41-78 tokens per
sequence with SmolLM2's tokenizer) with the same max length per sequence, pairs per optimizer step, AdamW
(constant LR, clip 1.0, no weight decay), beta 0.1, sigmoid loss, dropout off, no gradient checkpointing,
2 threads, and the precision dist_ft's engine.precision auto picks (on a CPU with native bf16: bf16-autocast,
DeepSpeed's torch_autocast over fp32 weights, for dist_ft; autocast for TRL, its only bf16 path). Runs, each a fresh process (as bench/worker.py):
- dist_ft packed: rows of whole pairs (2 x max length wide), as many rows per step as hold ~ the pairs per step;
- dist_ft padded: data.packing false, one padded batch of exactly the pairs per step;
- trl precomputed: precompute_ref_log_probs=True, TRL's reference-log-prob cache (what dist_ft does);
- trl ref_model: TRL's default, a second model in memory scores every batch.
Measured: pairs/s and mean step time over steps 2..S (end of step 1 to end of step S, data loading included);
time to first step (process start -> end of step 1: imports, loading, tokenizing, the reference pass); the
reference pass where separate (dist_ft's own log line; TRL's `_precompute_ref_logps` timed); tokens/pair (the
same work?); peak RSS; loss at step 1 (policy == reference: ln 2 = 0.6931) and final (mean of the last 3).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import prep  # noqa: E402
import run  # noqa: E402
import worker  # noqa: E402

RUNS = [("dist_ft", "packed"), ("dist_ft", "padded"), ("trl", "precomputed"), ("trl", "ref_model")]
BETA, LR = 0.1, 1e-5
TRL_SETTINGS = (
    "DPOConfig(loss_type=['sigmoid'], beta=0.1, per_device_train_batch_size=<pairs/step>, max_length=<max len>, "
    "precompute_ref_log_probs=True|False, bf16=<as dist_ft>, gradient_checkpointing=False (TRL default True: recompute), "
    "padding_free=False (1.16 ignores True), disable_dropout=True, use_cpu=True, dataloader_num_workers=0, "
    "dataloader_pin_memory=False, optim=adamw_torch, lr constant, max_grad_norm=1.0, weight_decay=0)"
)


def pairs(n: int, seed: int = 0) -> list[dict]:
    """n preference pairs {prompt, chosen, rejected}: 'What is a plus b?', the right sum chosen, a wrong one rejected."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        words = [prep._words(rng, rng.randint(lo, hi)).rstrip(".,?") for lo, hi in ((1, 6), (3, 12), (3, 12))]
        out.append(
            {
                "prompt": f"{words[0]}. What is {a} plus {b}?",
                "chosen": f"{a} plus {b} is {a + b}. {words[1]}.",
                "rejected": f"{a} plus {b} is {wrong}. {words[2]}.",
            }
        )
    return out


def model_dir(smoke: bool, tmp: Path) -> Path:
    """The model both load: SmolLM2-135M (prep.model_dir, with dist_ft's ChatML tokenizer), or for --smoke tmp/model, a tiny
    GPT-2 given dist_ft's ChatML tokenizer (its two new tokens, embeddings resized), so TRL renders the same template."""
    if not smoke:
        return prep.model_dir("smollm2-135m")
    from transformers import AutoModelForCausalLM

    from dist_ft.config import ModelConfig
    from dist_ft.tokenizer import load_tokenizer

    out = tmp / "model"
    sys.path.insert(0, str(HERE.parent / "tests"))
    import tiny

    tiny.make_gpt2(out)
    tok = load_tokenizer(ModelConfig(path=str(out)))
    model = AutoModelForCausalLM.from_pretrained(out)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def packed_rows(model: Path, recs: list[dict], seq_len: int, pairs_per_step: int) -> dict:
    """Packed rows per step holding about `pairs_per_step` pairs: dist_ft's tokenization and best-fit packing of the pairs."""
    from dist_ft.config import ModelConfig
    from dist_ft.data.packing import pack
    from dist_ft.data.preference import to_pair, tokenize_pair
    from dist_ft.tokenizer import load_tokenizer

    # SmolLM2: 41-78 tokens per sequence, 4.1 pairs per 512-token row
    tok = load_tokenizer(ModelConfig(path=str(model)))
    lens = [
        [len(e.input_ids) for e in tokenize_pair(tok, to_pair(r, f"pair {i}"), f"pair {i}")]
        for i, r in enumerate(recs)
    ]
    per_row = len(lens) / len(pack([min(sum(x), 2 * seq_len) for x in lens], 2 * seq_len))
    flat = [n for x in lens for n in x]
    return {
        "rows": max(1, round(pairs_per_step / per_row)),
        "pairs_per_row": per_row,
        "seq_tokens": [min(flat), max(flat)],
    }


def run_dist_ft(spec: dict) -> dict:  # in the worker process, as run_trl
    import yaml

    from dist_ft import train
    from dist_ft.config import load_config
    from dist_ft.track import read_steps

    out, packed = Path(spec["out"]), spec["variant"] == "packed"
    cfg = {
        "model": {"path": spec["model"]},
        "data": {"train": spec["data"], "task": "dpo", "max_seq_len": spec["seq_len"], "packing": packed},
        "train": {
            "max_steps": spec["steps"],
            "micro_batch_size": spec["rows"] if packed else spec["pairs_per_step"],
            "lr": LR,
            "schedule": "constant",
            "warmup_steps": 0,
        },
        "engine": {"precision": spec["precision"]},
        "dpo": {"beta": BETA, "loss": "sigmoid"},
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "track": {"wandb": "disabled"},
        "output": {"dir": str(out / "run"), "overwrite": True},
    }
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train.run(load_config(out / "cfg.yaml", []))
    steps = read_steps(out / "run" / "metrics.jsonl")  # loss_tokens = pairs
    return worker._result(
        [worker.START + s.elapsed_s for s in steps],
        [s.loss_tokens for s in steps],
        [s.tokens for s in steps],
        [round(s.tokens / (1 - s.padding)) for s in steps],
        [s.loss for s in steps],
        {"step1_loss": steps[0].loss},
    )


class _Count:
    """Wraps TRL's collator: records each training batch's pairs, real tokens and positions (bookkeeping only)."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, features):  # features: pairs
        b = self.inner(features)
        self.batches.append((len(features), int(b["attention_mask"].sum()), b["input_ids"].numel()))
        return b


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # fp32 weights, AdamW, constant LR, clip 1.0, use_cpu
    tok, model, rows, clock, common = worker._hf_common(spec)
    ref_s = []

    class Timed(DPOTrainer):
        def _precompute_ref_logps(self, *a, **kw):
            t0 = time.time()
            out = super()._precompute_ref_logps(*a, **kw)
            ref_s.append(time.time() - t0)
            return out

    args = DPOConfig(
        loss_type=["sigmoid"],
        beta=BETA,
        per_device_train_batch_size=spec["pairs_per_step"],
        max_length=spec["seq_len"],
        precompute_ref_log_probs=spec["variant"] == "precomputed",
        bf16=spec["precision"] in ("bf16", "bf16-autocast"),
        fp16=False,
        gradient_checkpointing=False,
        padding_free=False,
        disable_dropout=True,
        dataloader_pin_memory=False,
        **common,
    )
    conv = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ]  # conversational: the chat template
    trainer = Timed(
        model=model, args=args, train_dataset=Dataset.from_list(conv), processing_class=tok, callbacks=[clock]
    )
    # after the precompute pass, which used the inner one
    trainer.data_collator = count = _Count(trainer.data_collator)
    trainer.train()
    worker.TRAINED.append(trainer.model)  # bench/precision.py scores it on held-out pairs
    b = count.batches[: len(clock.ends)]
    return worker._result(
        clock.ends,
        [x[0] for x in b],
        [x[1] for x in b],
        [x[2] for x in b],
        clock.losses,
        {"step1_loss": clock.losses[0], "reference_s": sum(ref_s) if ref_s else None},
    )


def run_one(spec: dict) -> dict:
    res, output = run.spawn_worker(
        [__file__, "--worker"], spec, f"{spec['framework']} {spec['variant']}", {"TQDM_DISABLE": "1"}
    )
    if "error" in res:
        return res
    if res["framework"] == "dist_ft":  # "reference: 800 sequences scored in 12.3 s; stored in ..."
        m = re.search(r"reference: [\d,]+ sequences scored in ([\d.]+) s", output)
        res["reference_s"] = float(m.group(1)) if m else None
    res["pairs_per_step"] = res["loss_tokens"] / (res["steps"] - 1)  # actual, steps 2..S
    res["step_s"] = res["train_s"] / (res["steps"] - 1)
    print(
        f"  {res['framework']:>7} {res['variant']:<11} {res['loss_tokens_per_s']:6.2f} pairs/s  step {res['step_s']:5.2f} s  "
        f"TTFS {res['time_to_first_step_s']:5.1f} s  RSS {res['peak_rss_mb']:6.0f} MB  loss {res['step1_loss']:.4f} -> {res['final_loss']:.4f}",
        flush=True,
    )
    return res


def table(results: list[dict]) -> str:
    lines = [
        "| run | pairs/step | pairs/s | step time | tokens/pair | padding | reference pass | time to 1st step | peak RSS | loss step 1 | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['framework']} {r['variant']} | failed |" + " |" * 9)
            continue
        ref = f"{r['reference_s']:.1f} s" if r.get("reference_s") is not None else "in every step"
        lines.append(
            f"| {r['framework']} {r['variant']} | {r['pairs_per_step']:.2f} | {r['loss_tokens_per_s']:.2f} | {r['step_s']:.2f} s | "
            f"{r['tokens'] / r['loss_tokens']:.1f} | {r['padding']:.1%} | {ref} | {r['time_to_first_step_s']:.1f} s | "
            f"{r['peak_rss_mb']:,.0f} MB | {r['step1_loss']:.4f} | {r['final_loss']:.4f} |"
        )
    return "\n".join(lines)


def ratios(results: list[dict]) -> str:
    ok = {f"{r['framework']} {r['variant']}": r["loss_tokens_per_s"] for r in results if "error" not in r}
    return "\n".join(
        f"- {ours}: "
        + ", ".join(f"{ok[ours] / v:.2f}x {peer}" for peer, v in ok.items() if peer.startswith("trl"))
        for ours in ok
        if ours.startswith("dist_ft")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 10; 3 with --smoke)"
    )
    ap.add_argument("--pairs-per-step", type=int, default=8)
    ap.add_argument(
        "--max-len",
        type=int,
        default=256,
        help="max tokens per sequence (dist_ft packed rows are twice this)",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny GPT-2-shaped model, 64 pairs, 3 steps; writes nothing"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return run.serve_worker(a.worker, {"dist_ft": run_dist_ft, "trl": run_trl})
    from dist_ft.precision import resolve

    steps = a.steps or (3 if a.smoke else 10)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, recs = model_dir(a.smoke, tmp), pairs(64 if a.smoke else 400)
        data = tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in recs))
        shape = packed_rows(model, recs, a.max_len, a.pairs_per_step)
        name = "tiny gpt2-2x64 (smoke)" if a.smoke else "smollm2-135m"
        precision = resolve("auto")
        head = (
            f"{name}, {len(recs)} pairs ({shape['seq_tokens'][0]}-{shape['seq_tokens'][1]} tokens per sequence), max length "
            f"{a.max_len}, {a.pairs_per_step} pairs/step (dist_ft packed: {shape['rows']} rows of {2 * a.max_len}, "
            f"{shape['pairs_per_row']:.2f} pairs/row), {steps} steps, {precision}, lr {LR:g}, beta {BETA}, sigmoid"
        )
        print(head, flush=True)
        base = {
            "model_name": name,
            "model": str(model),
            "data": str(data),
            "seq_len": a.max_len,
            "steps": steps,
            "threads": 2,
            "pairs_per_step": a.pairs_per_step,
            "rows": shape["rows"],
            "precision": precision,
            "lr": LR,
        }
        results = [run_one({**base, "framework": f, "variant": v}) for f, v in RUNS]
    who = run.machine()
    md = f"Machine: {who}\n\n{head}\n\nTRL: {TRL_SETTINGS}\n\n{table(results)}\n\npairs/s ratios:\n{ratios(results)}\n"
    print("\n" + md)
    if not a.smoke:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        (out / "dpo.json").write_text(
            json.dumps({"machine": who, "setup": head, "trl": TRL_SETTINGS, "results": results}, indent=1)
        )
        (out / "dpo.md").write_text(md)


if __name__ == "__main__":
    main()
