"""dist_ft GRPO (data.task: grpo) against TRL's GRPOTrainer, measured side by side on this machine.

    python bench/grpo.py              # SmolLM2-135M-Instruct, 8 steps: writes bench/results/grpo.{json,md}
    python bench/grpo.py --smoke      # tiny GPT-2-shaped model, 3 steps, about a minute: writes nothing

Both load the same model directory and train on the same prompts ("What is a plus b?", a and b from 1 to 20,
the sum as the record's answer) with the same reward (1 when the completion's last number is the sum), group
size, completion length, sampling (temperature 1, top_p 1, top_k off), prompts per optimizer step (one
generation per step), loss (`grpo`: sequence mean, std-scaled advantages, epsilon 0.2, no KL), AdamW (constant
LR, clip 1.0, no weight decay), no gradient checkpointing, 2 threads and the precision dist_ft's `auto` picks
(bf16-autocast on a CPU with native bf16; TRL bf16=True is autocast too). Each run is a fresh process.
Measured: completions/s and mean step time over steps 2..S (end of step 1 to end of step S: sampling,
rewards, forward, backward, optimizer), time to first step, peak RSS, mean completion length, and the mean
reward of the first and of the last 3 steps.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dpo  # noqa: E402  (the model both load)
import run  # noqa: E402
import worker  # noqa: E402

LR, G = 1e-6, 8
TRL_SETTINGS = (
    "GRPOConfig(num_generations=8, per_device_train_batch_size=<prompts x 8>, max_completion_length=<n>, "
    "temperature=1.0, top_p=1.0, top_k=0, loss_type='grpo', scale_rewards='group', beta=0.0, epsilon=0.2, "
    "num_iterations=1, gradient_checkpointing=False (TRL default True), bf16=<as dist_ft>, use_vllm=False, "
    "use_cpu=True, optim=adamw_torch, lr constant, max_grad_norm=1.0, weight_decay=0)"
)


def prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        out.append({"prompt": f"What is {a} plus {b}? Answer with the number.", "answer": str(a + b)})
    return out


def correct(completion: str, answer: str) -> float:
    """The reward both runs use: dist_ft's `numeric` (1 when the completion's last number is the answer)."""
    from dist_ft import rewards
    from dist_ft.task_settings.grpo import RewardSpec

    return rewards.numeric(RewardSpec(kind="numeric"))([None], [completion], [0], [{"answer": answer}])[0]


def run_dist_ft(spec: dict) -> dict:
    import yaml

    from dist_ft import train
    from dist_ft.config import load_config
    from dist_ft.track import read_steps

    out = Path(spec["out"])
    cfg = {
        "model": {"path": spec["model"]},
        "data": {"train": spec["data"], "task": "grpo", "max_seq_len": 256, "packing": False},
        "train": {
            "max_steps": spec["steps"],
            "micro_batch_size": spec["prompts_per_step"],
            "lr": LR,
            "schedule": "constant",
            "warmup_steps": 0,
        },
        "engine": {"precision": spec["precision"]},
        "grpo": {
            "group_size": G,
            "max_completion_tokens": spec["completion_tokens"],
            "loss": "grpo",
            "rewards": [{"kind": "numeric"}],
            "samples_every": 0,
        },
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "track": {"wandb": "disabled", "sample_prompts": []},
        "output": {"dir": str(out / "run"), "overwrite": True},
    }
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train.run(load_config(out / "cfg.yaml", []))
    steps = read_steps(out / "run" / "metrics.jsonl")
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    per_step = [x for x in records if "reward" in x and "loss" in x]
    return worker._result(
        [worker.START + s.elapsed_s for s in steps],
        [s.loss_tokens for s in steps],  # completions
        [s.tokens for s in steps],
        [round(s.tokens / (1 - s.padding)) for s in steps],
        [s.loss for s in steps],
        {
            "rewards": [x["reward"] for x in per_step],
            "completion_length": sum(x["completion_length"] for x in per_step) / len(per_step),
        },
    )


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok, model, rows, clock, common = worker._hf_common(spec)

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):  # noqa: A002 - TRL's keyword
            if logs and "reward" in logs:
                kept.append(dict(logs))

    kept: list[dict] = []

    def reward(completions, answer, **kw):
        return [correct(c[-1]["content"], a) for c, a in zip(completions, answer, strict=True)]

    args = GRPOConfig(
        num_generations=G,
        per_device_train_batch_size=spec["prompts_per_step"] * G,
        max_completion_length=spec["completion_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        loss_type="grpo",
        scale_rewards="group",
        beta=0.0,
        epsilon=0.2,
        num_iterations=1,
        gradient_checkpointing=False,
        bf16=spec["precision"] in ("bf16", "bf16-autocast"),
        fp16=False,
        dataloader_pin_memory=False,
        **common,
    )
    data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=data,
        processing_class=tok,
        callbacks=[clock, Keep()],
    )
    t0 = time.time()
    trainer.train()
    n = spec["prompts_per_step"] * G
    steps = len(clock.ends)
    lengths = [x.get("completions/mean_length", 0.0) for x in kept]
    return worker._result(
        clock.ends,
        [n] * steps,
        [0] * steps,  # (tokens: not counted for TRL)
        [1] * steps,
        clock.losses or [0.0] * steps,
        {
            "rewards": [x["reward"] for x in kept],
            "completion_length": sum(lengths) / max(len(lengths), 1),
            "train_wall_s": time.time() - t0,
        },
    )


def run_one(spec: dict) -> dict:
    res, _ = run.spawn_worker([__file__, "--worker"], spec, spec["framework"], {"TQDM_DISABLE": "1"})
    if "error" in res:
        return res
    res["completions_per_s"] = res["loss_tokens_per_s"]
    res["step_s"] = res["train_s"] / (res["steps"] - 1)
    r = res["rewards"]
    res["reward_first"], res["reward_last3"] = r[0], sum(r[-3:]) / len(r[-3:])
    print(
        f"  {res['framework']:>7} {res['completions_per_s']:6.2f} completions/s  step {res['step_s']:6.2f} s  "
        f"TTFS {res['time_to_first_step_s']:5.1f} s  RSS {res['peak_rss_mb']:6.0f} MB  length "
        f"{res['completion_length']:.1f}  reward {res['reward_first']:.3f} -> {res['reward_last3']:.3f}",
        flush=True,
    )
    return res


def table(results: list[dict]) -> str:
    lines = [
        "| run (pair) | completions/step | completions/s | step time | time to 1st step | peak RSS | mean completion length | reward step 1 | reward, last 3 steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['framework']} {r['pair'] + 1} | failed |" + " |" * 7)
            continue
        lines.append(
            f"| {r['framework']} {r['pair'] + 1} | {r['prompts_per_step'] * G} | {r['completions_per_s']:.2f} | {r['step_s']:.2f} s | "
            f"{r['time_to_first_step_s']:.1f} s | {r['peak_rss_mb']:,.0f} MB | {r['completion_length']:.1f} | "
            f"{r['reward_first']:.3f} | {r['reward_last3']:.3f} |"
        )
    return "\n".join(lines)


def ratios(results: list[dict]) -> str:
    """dist_ft / TRL per pair (completions/s, completion tokens/s, peak RSS) and their medians."""
    pairs = []
    for i in sorted({r["pair"] for r in results}):
        ok = {r["framework"]: r for r in results if r["pair"] == i and "error" not in r}
        if len(ok) < 2:
            continue
        d, t = ok["dist_ft"], ok["trl"]
        pairs.append(
            (
                d["completions_per_s"] / t["completions_per_s"],
                d["completions_per_s"]
                * d["completion_length"]
                / (t["completions_per_s"] * t["completion_length"]),
                d["peak_rss_mb"] / t["peak_rss_mb"],
            )
        )
    if not pairs:
        return "(a run failed)"
    med = [statistics.median(x) for x in zip(*pairs, strict=True)]
    each = ", ".join(f"{c:.2f}x" for c, _, _ in pairs)
    return (
        f"dist_ft / TRL, median of {len(pairs)} pairs: completions/s **{med[0]:.2f}x** (pairs: {each}), "
        f"completion tokens/s {med[1]:.2f}x, peak RSS {med[2]:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 8; 3 with --smoke)"
    )
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--completion-tokens", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="tiny GPT-2-shaped model, 3 steps; writes nothing")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="dist_ft / TRL pairs, run alternately (this machine's speed drifts between runs: the ratio "
        "reported is the median of the pairs'; default 3, 1 with --smoke)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return run.serve_worker(a.worker, {"dist_ft": run_dist_ft, "trl": run_trl})
    from dist_ft.precision import resolve

    steps = a.steps or (3 if a.smoke else 8)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = dpo.model_dir(a.smoke, tmp)
        data = tmp / "prompts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in prompts(400)))
        name = "tiny gpt2-2x64 (smoke)" if a.smoke else "smollm2-135m-instruct"
        precision = resolve("auto")
        head = (
            f"{name}, arithmetic prompts (a + b, 1..20), {a.prompts_per_step} prompts x {G} completions per step, "
            f"up to {a.completion_tokens} completion tokens, {steps} steps, {precision}, lr {LR:g}, loss grpo"
        )
        print(head, flush=True)
        base = {
            "model_name": name,
            "model": str(model),
            "data": str(data),
            "steps": steps,
            "threads": 2,
            "prompts_per_step": a.prompts_per_step,
            "completion_tokens": a.completion_tokens,
            "precision": precision,
            "lr": LR,
            "seq_len": 256,
        }
        repeats = 1 if a.smoke else a.repeats
        results = [
            {**run_one({**base, "framework": f}), "pair": i}
            for i in range(repeats)
            for f in ("dist_ft", "trl")
        ]
    ratio = ratios(results)
    who = run.machine()
    md = f"Machine: {who}\n\n{head}\n\nTRL: {TRL_SETTINGS}\n\n{table(results)}\n\n{ratio}\n"
    print("\n" + md)
    if not a.smoke:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        (out / "grpo.json").write_text(
            json.dumps({"machine": who, "setup": head, "trl": TRL_SETTINGS, "results": results}, indent=1)
        )
        (out / "grpo.md").write_text(md)


if __name__ == "__main__":
    main()
