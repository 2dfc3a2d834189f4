"""dist_ft vs HF Trainer vs TRL SFTTrainer, measured side by side on this machine.

    pip install -e .[bench]          # adds trl
    python bench/run.py --quick      # GPT-2-shaped model, a few minutes
    python bench/run.py              # + SmolLM2-135M, sequence-length and model-size scaling, checkpoint timings
    python bench/run.py --lora       # SmolLM2-135M: LoRA vs full fine-tuning, and LoRA against TRL SFTTrainer + peft

Writes bench/results/<name>.json, bench/results/<name>.md (tables) and bench/results/<name>.png.
Each run is a fresh process (bench/worker.py); see its docstring for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import prep  # noqa: E402

PEERS = [
    ("dist_ft", "packed"),
    ("dist_ft", "padded"),
    ("hf_trainer", "padded"),
    ("trl", "padded"),
    ("trl", "packed"),
]


def machine() -> str:
    import deepspeed
    import torch
    import transformers
    import trl

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM, "
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}; {datetime.date.today().isoformat()}"
    )


def work_shape(model: Path, data: Path, seq_len: int, tokens_per_step: int) -> dict:
    """Rows (packed) or examples (padded) per step giving the same tokens per step."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    lens = [
        min(
            seq_len, len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
        )
        for r in rows[:500]
    ]
    mean = sum(lens) / len(lens)
    return {
        "rows": max(1, tokens_per_step // seq_len),
        "examples": max(1, round(tokens_per_step / mean)),
        "mean_example_tokens": mean,
        "causal_pairs_per_token": sum(n * (n + 1) / 2 for n in lens) / sum(lens),
    }  # attention work per token (perf.FlopCount)


def spawn_worker(argv: list[str], spec: dict, label: str, env: dict | None = None) -> tuple[dict, str]:
    """Run one measured worker (`python ARGV SPEC_JSON`) in a fresh process with its own empty shard cache (every run
    tokenizes anew, as the peers do) and 2-core-style thread settings; returns (its RESULT, or the spec with an
    `error`, printed as FAILED LABEL) and the process's output."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(spec["threads"]),
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(HERE.parent),
        **(env or {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        env["DIST_FT_CACHE"] = tmp  # no shard cache (or stored reference log-probs) carried over between runs
        r = subprocess.run(
            [sys.executable, *argv, json.dumps({**spec, "out": tmp})], capture_output=True, text=True, env=env
        )
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        print(f"  FAILED {label}: {r.stderr[-1500:]}", file=sys.stderr)
        return {**spec, "error": r.stderr[-500:]}, r.stdout + r.stderr
    res = json.loads(line[7:])
    res.pop("out", None)
    return res, r.stdout + r.stderr


def serve_worker(spec_json: str, runners: dict) -> None:
    """The worker side of `spawn_worker`: the spec's threads, `runners[spec["framework"]](spec)`, and the
    RESULT line (the spec with what the run measured)."""
    import torch

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    print("RESULT " + json.dumps({**spec, **runners[spec["framework"]](spec)}), flush=True)


def run_one(spec: dict) -> dict:
    res, _ = spawn_worker([str(HERE / "worker.py")], spec, f"{spec['framework']}/{spec['variant']}")
    if "error" in res:
        return res
    print(
        f"  {res['framework']:>10}/{res['variant']:<6} {res['loss_tokens_per_s']:8.0f} loss-tok/s {res['tokens_per_s']:8.0f} tok/s "
        f"pad {res['padding']:5.1%}  TTFS {res['time_to_first_step_s']:5.1f} s  RSS {res['peak_rss_mb']:6.0f} MB  "
        f"loss {res['final_loss']:.3f}",
        flush=True,
    )
    return res


def compare(
    model_name: str, seq_len: int, tokens_per_step: int, steps: int, data: Path, peers=PEERS, threads: int = 2
) -> list[dict]:
    model = prep.model_dir(model_name)
    shape = work_shape(model, data, seq_len, tokens_per_step)
    print(
        f"{model_name}, seq {seq_len}, {tokens_per_step} tokens/step ({shape['rows']} rows packed / {shape['examples']} examples padded), "
        f"{steps} steps",
        flush=True,
    )
    base = {
        "model_name": model_name,
        "model": str(model),
        "data": str(data),
        "seq_len": seq_len,
        "tokens_per_step": tokens_per_step,
        "steps": steps,
        "lr": 1e-4,
        "threads": threads,
        **shape,
    }
    return [run_one({**base, "framework": f, "variant": v}) for f, v in peers]


def table(results: list[dict]) -> str:
    ok = [r for r in results if "error" not in r]
    lines = [
        "| model | seq | run | loss-bearing tok/s | tok/s | padding | time to 1st step | peak RSS | loss tokens (vs dist_ft packed) | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        ref = next(
            (
                x
                for x in ok
                if x["framework"] == "dist_ft"
                and x["variant"] == "packed"
                and x["model_name"] == r["model_name"]
                and x["seq_len"] == r["seq_len"]
            ),
            r,
        )
        lines.append(
            f"| {r['model_name']} | {r['seq_len']} | {r['framework']} {r['variant']} | {r['loss_tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s']:,.0f} | {r['padding']:.1%} | {r['time_to_first_step_s']:.1f} s | {r['peak_rss_mb']:,.0f} MB | "
            f"{r['loss_tokens']:,} ({r['loss_tokens'] / ref['loss_tokens']:.2f}x) | {r['final_loss']:.3f} |"
        )
    return "\n".join(lines)


def ratios(results: list[dict]) -> str:
    out = []
    groups = sorted({(r["model_name"], r["seq_len"]) for r in results if "error" not in r})
    for m, s in groups:
        g = {
            (r["framework"], r["variant"]): r["loss_tokens_per_s"]
            for r in results
            if "error" not in r and (r["model_name"], r["seq_len"]) == (m, s)
        }
        ours = g.get(("dist_ft", "packed"))
        if not ours:
            continue
        parts = [f"{m} seq {s}: dist_ft packed"]
        if ("hf_trainer", "padded") in g:
            parts.append(f"{ours / g[('hf_trainer', 'padded')]:.2f}x HF Trainer (target >= 1.5x)")
        trl_best = max((v for (f, _), v in g.items() if f == "trl"), default=None)
        if trl_best:
            parts.append(f"{ours / trl_best:.2f}x TRL best (target >= 1.1x)")
        out.append(" | ".join(parts))
    return "\n".join(f"- {x}" for x in out)


def chart(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    groups = sorted({(r["model_name"], r["seq_len"]) for r in ok})
    runs = [f"{f} {v}" for f, v in PEERS]
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(groups)), 4))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        ys = [
            next(
                (
                    r["loss_tokens_per_s"]
                    for r in ok
                    if (r["model_name"], r["seq_len"]) == g and f"{r['framework']} {r['variant']}" == run
                ),
                0,
            )
            for g in groups
        ]
        ax.bar([j + i * width for j in range(len(groups))], ys, width, label=run)
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(groups))], [f"{m}\nseq {s}" for m, s in groups], fontsize=8
    )
    ax.set_ylabel("loss-bearing tokens / s")
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def checkpoint_times(models: list[str], data: Path) -> list[dict]:
    """dist_ft checkpoint save (engine + optimizer + RNG + manifest, fsynced) and load (resume) seconds."""
    rows = []
    for name in models:
        model = prep.model_dir(name)
        spec = {
            "framework": "dist_ft",
            "variant": "packed",
            "model": str(model),
            "data": str(data),
            "seq_len": 256,
            "rows": 2,
            "examples": 2,
            "steps": 2,
            "lr": 1e-4,
            "threads": 2,
            "every_steps": 1,
        }
        r = run_one(spec)
        rows.append(
            {
                "model_name": name,
                "checkpoint_save_s": r.get("checkpoint_save_s"),
                "checkpoint_load_s": r.get("checkpoint_load_s"),
            }
        )
    return rows


LORA = {"r": 8, "alpha": 16.0, "dropout": 0.05}


def lora_bench(data: Path, steps: int) -> None:
    """dist_ft full fine-tuning vs dist_ft LoRA vs TRL SFTTrainer with the same LoRA (peft_config), SmolLM2-135M."""
    model = prep.model_dir("smollm2-135m")
    shape = work_shape(model, data, 512, 2048)
    base = {
        "model_name": "smollm2-135m",
        "model": str(model),
        "data": str(data),
        "seq_len": 512,
        "tokens_per_step": 2048,
        "steps": steps,
        "lr": 1e-4,
        "threads": 2,
        **shape,
    }
    runs = [
        ({"framework": "dist_ft", "variant": "packed"}, "full"),
        ({"framework": "dist_ft", "variant": "packed", "lora": LORA}, "lora"),
        ({"framework": "trl", "variant": "packed", "lora": LORA}, "lora"),
        ({"framework": "trl", "variant": "padded", "lora": LORA}, "lora"),
    ]
    results = [{**run_one({**base, **spec}), "method": method} for spec, method in runs]
    lines = [
        "| run | method | trainable params | optimizer state | step time | loss-bearing tok/s | RSS while training | "
        "peak RSS (load, export) | time to 1st step | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['framework']} {r['variant']} | {r['method']} | failed | | | | | | | |")
            continue
        opt = f"{r['optimizer_bytes'] / 2**20:,.1f} MB" if r.get("optimizer_bytes") else "?"
        lines.append(
            f"| {r['framework']} {r['variant']} | {r['method']} | {r.get('trainable_params') or 0:,} | {opt} | "
            f"{r['train_s'] / max(1, r['steps'] - 1):.2f} s | {r['loss_tokens_per_s']:,.0f} | {r.get('train_rss_mb') or 0:,.0f} MB | "
            f"{r['peak_rss_mb']:,.0f} MB | "
            f"{r['time_to_first_step_s']:.1f} s | {r['final_loss']:.3f} |"
        )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    who = machine()
    md = (
        f"Machine: {who}\n\nSmolLM2-135M, seq 512, 2048 tokens/step, {steps} steps, fp32, LoRA r {LORA['r']} alpha {LORA['alpha']:g} "
        f"dropout {LORA['dropout']} on every projection\n\n" + "\n".join(lines) + "\n"
    )
    (out / "lora.json").write_text(json.dumps({"machine": who, "results": results}, indent=1))
    (out / "lora.md").write_text(md)
    print("\n" + md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="GPT-2-shaped model only, seq 512: a few minutes")
    ap.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 8 quick, 10 full)"
    )
    ap.add_argument("--lora", action="store_true", help="only the LoRA comparison on SmolLM2-135M")
    args = ap.parse_args()
    data = prep.chat_data()
    if args.lora:
        return lora_bench(data, args.steps or 5)
    steps = args.steps or (8 if args.quick else 10)
    results = compare("gpt2-4x256", 512, 4096, steps, data)
    extra = {}
    if not args.quick:
        results += compare("smollm2-135m", 512, 2048, 5, data)
        # scaling: dist_ft against the fastest peer measured above (HF Trainer here; TRL's fused head is slower on CPU)
        best_peer = [("dist_ft", "packed"), ("hf_trainer", "padded")]
        for seq in (256, 1024):
            results += compare("gpt2-4x256", seq, 4096, steps, data, best_peer)
        for name in ("gpt2-6x384", "gpt2-8x512"):
            results += compare(name, 512, 4096, steps, data, best_peer)
        extra["checkpoint"] = checkpoint_times(["gpt2-4x256", "smollm2-135m"], data)
    name = "quick" if args.quick else "full"
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    who = machine()
    (out / f"{name}.json").write_text(json.dumps({"machine": who, "results": results, **extra}, indent=1))
    md = f"Machine: {who}\n\n{table(results)}\n\n{ratios(results)}\n"
    if extra.get("checkpoint"):
        md += (
            "\n| model | checkpoint save (engine + optimizer + RNG, fsynced) | load (resume) |\n|---|---|---|\n"
            + "\n".join(
                f"| {c['model_name']} | {c['checkpoint_save_s']:.2f} s | {c['checkpoint_load_s']:.2f} s |"
                for c in extra["checkpoint"]
                if c["checkpoint_save_s"] and c["checkpoint_load_s"]
            )
            + "\n"
        )
    (out / f"{name}.md").write_text(md)
    chart(results, out / f"{name}.png", who)
    print("\n" + md)


if __name__ == "__main__":
    main()
