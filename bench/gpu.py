"""GPU benchmark: dist_ft vs Hugging Face Trainer on one GPU, GPT-2 124M shape, bf16, 1024-token rows.

    python bench/gpu.py                 # needs a CUDA GPU; a few minutes; writes bench/results/gpu.{json,md}
    python bench/gpu.py --smoke         # same code path, tiny model (2 layers x 64), seq 128, 3 steps;
                                        # CPU fp32 when there is no GPU; writes bench/.cache/gpu-smoke.{json,md}

Model: GPT-2 124M shape (12 layers, 12 heads, 768 wide, 1024 positions), random init, with the SmolLM2 tokenizer
(49,152 tokens, GPT-2-sized; ChatML template with generation markers, see bench/prep.py): 123.6M parameters
(GPT-2's own 50,257-token vocabulary gives 124.4M). Built with `GPT2Config(vocab_size=len(tok), ...)` and
`save_pretrained` next to the tokenizer, so both frameworks load it through `from_pretrained`.
Data: bench/prep.py's 3,000 generated chat conversations (1-3 turns, log-normal lengths).

Runs, each a fresh process on the same GPU (CUDA_VISIBLE_DEVICES pinned to one device, so HF Trainer does not
wrap the model in DataParallel):
- dist_ft: `train.run` as `dist-ft train` runs it: packed rows of 1024 tokens, micro batch 8 (8,192 tokens/step),
  ZeRO 0, engine.precision bf16 (DeepSpeed: bf16 weights, fp32 master weights in the optimizer),
  engine.dist_backend auto (NCCL, one rank), torch AdamW (DeepSpeed `torch_adam`);
- HF Trainer: the usual recipe (chat template -> text -> tokenize -> DataCollatorForLanguageModeling, padded to
  the longest example of each batch), bf16=True (autocast over fp32 weights), as many examples per step as give
  the same tokens per step (mean example length), optim adamw_torch (the same torch AdamW), the model's default
  `use_cache`, loss on every token.
Both: constant LR 1e-4, no warmup, weight decay 0, gradient clipping 1.0, the model's default attention
(sdpa; `--attn flash_attention_2` for both when flash-attn is installed).

Measured as bench/worker.py does: throughput over steps 2..S (from the end of step 1 to the end of step S, every
step end CUDA-synchronized), tokens = non-padding tokens, loss-bearing tokens = assistant tokens that carry loss;
time to first step = process start -> end of step 1 (imports, CUDA init, model load, tokenization included);
peak GPU memory = torch.cuda.max_memory_allocated() during training.
MFU = executed FLOPs/s / peak, with dist_ft.perf.FlopCount (printed: perf.FLOP_FORMULA; matmul weights only, the
output layer where it runs, causal attention over the examples' real lengths, from the data's length distribution)
and dist_ft.perf.peak_flops() (dense bf16 peak of the GPU; no MFU for GPUs not in perf.PEAK_FLOPS). dist_ft runs its
output layer only at loss-bearing positions, HF Trainer at every token: each is charged for what it runs. Model FLOPs
(no recomputation counted), not measured hardware utilization.

Published anchors (pretraining, full rows, fused kernels / flash attention, mostly torch.compile or CUDA C):
llm.c GPT-2 124M reaches about 50% MFU on an A100; MosaicML llm-foundry's 125M model 44.8% MFU on A100s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

FULL = {"name": "gpt2-124m", "seq_len": 1024, "micro": 8, "steps": 200}  # model dimensions: prep.GPT2_SHAPES
SMOKE = {"name": "gpt2-2x64-smoke", "seq_len": 128, "micro": 4, "steps": 3}
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
)


# ---------------------------------------------------------------- inputs (parent process)


def model_facts(model: Path, seq_len: int) -> dict:
    """Parameter count (tied weights once, as dist_ft counts them) and the FLOP counter's weights, without loading weights."""
    import dataclasses

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_ft import perf

    cfg = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in m.parameters())
    return {
        "n_params": n,
        "flops": dataclasses.asdict(perf.FlopCount.of(m)),
        "vocab": cfg.vocab_size,
        "layers": cfg.n_layer,
        "heads": cfg.n_head,
        "width": cfg.n_embd,
    }


def flops_per_s(facts: dict, r: dict, pairs_per_token: float) -> float:
    """Executed FLOP/s of a run: dist_ft's output layer runs at loss-bearing positions, HF Trainer's at every token."""
    from dist_ft import perf

    head_at = r["loss_tokens_per_s"] if r["framework"] == "dist_ft" else r["tokens_per_s"]
    return perf.FlopCount(**facts["flops"]).flops(
        r["tokens_per_s"], head_at, r["tokens_per_s"] * pairs_per_token
    )


def device_info() -> dict:
    import deepspeed
    import torch
    import transformers

    from dist_ft import perf

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "CPU (no CUDA device)",
        "peak_flops": perf.peak_flops(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "date": datetime.date.today().isoformat(),
    }


# ---------------------------------------------------------------- one measured run (bench/worker.py, fresh process)

RUNS = {"dist_ft": "dist_ft packed", "hf_trainer": "HF Trainer padded"}


def run_one(spec: dict) -> dict:
    """One run in a fresh process (`bench/worker.py SPEC`, as bench/run.py runs it), pinned to one GPU, with its own
    on-the-fly shard cache."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0] if visible else "0"  # one GPU for both frameworks
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "out": tmp}
        env["DIST_FT_CACHE"] = tmp  # tokenized anew, as the HF recipe does: no shard cache carried over
        r = subprocess.run(
            [sys.executable, str(HERE / "worker.py"), json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
        )
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        print(
            f"  FAILED {spec['framework']}: exit {r.returncode}\n{r.stderr[-3000:]}",
            file=sys.stderr,
            flush=True,
        )
        return {**spec, "error": (r.stderr or r.stdout)[-1500:]}
    res = json.loads(line[len("RESULT ") :])
    res.pop("out", None)
    return res


# ---------------------------------------------------------------- report


def _fmt_mb(mb) -> str:
    return "n/a" if mb is None else f"{mb:,.0f} MB"


def table(results: list[dict], facts: dict, info: dict, pairs_per_token: float) -> str:
    peak = info["peak_flops"]
    ok = [r for r in results if "error" not in r]
    lines = [
        "| run | tokens/s | loss-bearing tokens/s | MFU | peak GPU memory | time to first step | padding | loss tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        mfu = flops_per_s(facts, r, pairs_per_token) / peak if peak else None
        r["mfu"] = mfu
        mem = (
            _fmt_mb(r.get("peak_gpu_mb"))
            if r.get("peak_gpu_mb") is not None
            else f"n/a (CPU; peak RSS {r['peak_rss_mb']:,.0f} MB)"
        )
        lines.append(
            f"| {RUNS[r['framework']]} | {r['tokens_per_s']:,.0f} | {r['loss_tokens_per_s']:,.0f} | "
            f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | {mem} | {r['time_to_first_step_s']:.1f} s | "
            f"{r['padding']:.1%} | {r['loss_tokens']:,} |"
        )
    for r in results:
        if "error" in r:
            lines.append(f"| {RUNS[r['framework']]} | FAILED | | | | | | |")
    by = {r["framework"]: r for r in ok}
    if "dist_ft" in by and "hf_trainer" in by:
        a, b = by["dist_ft"], by["hf_trainer"]
        lines += [
            "",
            f"dist_ft / HF Trainer: **{a['tokens_per_s'] / b['tokens_per_s']:.2f}x** tokens/s, "
            f"**{a['loss_tokens_per_s'] / b['loss_tokens_per_s']:.2f}x** loss-bearing tokens/s, "
            f"{a['time_to_first_step_s'] / b['time_to_first_step_s']:.2f}x time to first step"
            + (
                f", {a['peak_gpu_mb'] / b['peak_gpu_mb']:.2f}x peak GPU memory"
                if a.get("peak_gpu_mb") and b.get("peak_gpu_mb")
                else ""
            ),
        ]
    return "\n".join(lines)


def header(info: dict, facts: dict, shape: dict, spec: dict, smoke: bool) -> str:
    from dist_ft import perf

    peak = (
        f"{info['peak_flops'] / 1e12:,.0f} TFLOP/s dense bf16"
        if info["peak_flops"]
        else "peak unknown: no MFU"
    )
    f = facts["flops"]
    return (
        f"Device: {info['device']} ({peak}); torch {info['torch']}"
        + (f" (CUDA {info['cuda']})" if info["cuda"] else "")
        + f", DeepSpeed {info['deepspeed']}, transformers {info['transformers']}; {info['date']}"
        + (" -- SMOKE RUN (tiny model, not a measurement)" if smoke else "")
        + "\n\n"
        f"Model: {shape['name']} ({facts['layers']} layers x {facts['width']}, {facts['heads']} heads, vocab {facts['vocab']:,}, "
        f"{facts['n_params'] / 1e6:.1f}M params), "
        f"{spec['precision']}, seq {spec['seq_len']}, {spec['rows'] * spec['seq_len']:,} tokens/step "
        f"(dist_ft {spec['rows']} packed rows, HF Trainer {spec['examples']} padded examples), {spec['steps']} steps, "
        f"throughput over steps 2..{spec['steps']}.\n\n"
        f"MFU counts executed FLOPs: {perf.FLOP_FORMULA} (N_mm {f['matmul'] / 1e6:.1f}M, N_head {f['head'] / 1e6:.1f}M, "
        f"L {f['layers']}, d_attn {f['attn_width']}, sum n(n+1)/2 = {spec['causal_pairs_per_token']:.0f} per token "
        f"on this data; the output layer at loss positions for dist_ft, at every token for HF Trainer)."
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, seq 128, 3 steps (CPU fp32 without a GPU): checks the code path",
    )
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default 200; smoke 3)")
    ap.add_argument("--micro", type=int, help="dist_ft packed rows per step (default 8; smoke 4)")
    ap.add_argument(
        "--attn",
        choices=["sdpa", "eager", "flash_attention_2"],
        help="attention kernel for both (default: the model's, sdpa)",
    )
    args = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not args.smoke and not cuda:
        print(
            "error: bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "`python bench/gpu.py --smoke` checks the code path on CPU",
            file=sys.stderr,
        )
        return 2
    import prep
    import run as cpu_bench

    shape = SMOKE if args.smoke else FULL
    seq, steps, micro = shape["seq_len"], args.steps or shape["steps"], args.micro or shape["micro"]
    info = device_info()
    print(
        f"device: {info['device']} | torch {info['torch']} | DeepSpeed {info['deepspeed']} | transformers {info['transformers']}",
        flush=True,
    )
    data = prep.chat_data()
    model = prep.model_dir(shape["name"])
    facts = model_facts(model, seq)
    # HF examples per step for the same tokens per step
    work = cpu_bench.work_shape(model, data, seq, micro * seq)
    spec = {
        "model": str(model),
        "data": str(data),
        "seq_len": seq,
        "steps": steps,
        "lr": 1e-4,
        "rows": micro,
        "examples": work["examples"],
        "mean_example_tokens": work["mean_example_tokens"],
        "causal_pairs_per_token": work["causal_pairs_per_token"],
        "precision": "bf16" if cuda else "fp32",
        "attn": args.attn,
        "threads": os.cpu_count(),
    }
    print(
        f"{shape['name']}: {facts['n_params'] / 1e6:.1f}M params, seq {seq}, {micro * seq:,} tokens/step "
        f"({micro} packed rows / {work['examples']} padded examples), {steps} steps, {spec['precision']}",
        flush=True,
    )
    from dist_ft import perf

    print(f"MFU formula: {perf.FLOP_FORMULA}", flush=True)
    results = []
    for framework in RUNS:
        t = time.time()
        results.append(
            run_one(
                {**spec, "framework": framework, "variant": "packed" if framework == "dist_ft" else "padded"}
            )
        )
        r = results[-1]
        if "error" not in r:
            print(
                f"  {RUNS[framework]:<18} {r['tokens_per_s']:>10,.0f} tok/s {r['loss_tokens_per_s']:>10,.0f} loss-tok/s  "
                f"TTFS {r['time_to_first_step_s']:5.1f} s  GPU peak {_fmt_mb(r.get('peak_gpu_mb'))}  ({time.time() - t:.0f} s)",
                flush=True,
            )
    md = (
        header(info, facts, shape, spec, args.smoke)
        + "\n\n"
        + table(results, facts, info, spec["causal_pairs_per_token"])
    )
    md += "\n"
    out_dir = prep.CACHE if args.smoke else HERE / "results"
    name = "gpu-smoke" if args.smoke else "gpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(
        json.dumps(
            {
                "info": info,
                "model": {**shape, **facts},
                "spec": spec,
                "smoke": args.smoke,
                "results": results,
            },
            indent=1,
        )
    )
    (out_dir / f"{name}.md").write_text(md)
    print("\n" + md)
    print(f"wrote {out_dir / name}.json and .md")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
