"""Learning, not only speed, per precision (issue #27): DPO on SmolLM2-135M at each learning rate, dist_ft in fp32,
bf16 (bf16 weights, fp32 masters started from the fp32 weights) and bf16-autocast (fp32 weights, bf16 matmuls),
and TRL's DPOTrainer at its bf16 default (autocast over fp32 weights), same pairs, order and settings as
bench/dpo.py (padded batches, precomputed reference log-probs):

    python bench/precision.py                       # 50 steps at lr 1e-5 and 1e-4: writes bench/results/precision.{json,md}
    python bench/precision.py --smoke               # tiny GPT-2-shaped model, 3 steps, lr 1e-4: writes nothing

Per row: loss at step 1 and final (mean of the last 3 steps), pairs/s, peak RSS. Not yet here: SFT, held-out
loss / reward accuracy."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dpo  # noqa: E402
import run  # noqa: E402

ROWS = [("dist_ft", "padded", "fp32"), ("dist_ft", "padded", "bf16"), ("dist_ft", "padded", "bf16-autocast"),
        ("trl", "precomputed", "bf16")]


def worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    dpo.LR = spec["lr"]  # dist_ft's config reads the module constant; TRL's reads spec["lr"]
    fn = dpo.run_dist_ft if spec["framework"] == "dist_ft" else dpo.run_trl
    print("RESULT " + json.dumps({**spec, **fn(spec)}), flush=True)


def run_one(spec: dict) -> dict:
    res, _ = run.spawn_worker([__file__, "--worker"], spec, f"{spec['framework']} {spec['precision']} lr {spec['lr']:g}",
                              {"TQDM_DISABLE": "1"})
    if "error" in res:
        return res
    print(f"  lr {res['lr']:g} {res['framework']:>7} {res['precision']:<13} loss {res['step1_loss']:.4f} -> {res['final_loss']:.4f}  "
          f"{res['loss_tokens_per_s']:.2f} pairs/s  RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    return res


def table(results: list[dict]) -> str:
    lines = ["| lr | run | precision | loss step 1 | final loss | pairs/s | peak RSS |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['lr']:g} | {r['framework']} | {r['precision']} | failed | | | |")
        else:
            lines.append(f"| {r['lr']:g} | {r['framework']} | {r['precision']} | {r['step1_loss']:.4f} | {r['final_loss']:.4f} | "
                         f"{r['loss_tokens_per_s']:.2f} | {r['peak_rss_mb']:,.0f} MB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 50; 3 with --smoke)")
    ap.add_argument("--lr", type=float, nargs="+", default=None, help="learning rates (default 1e-5 1e-4; 1e-4 with --smoke)")
    ap.add_argument("--pairs-per-step", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--only", choices=["dist_ft", "trl"], help="run one framework's rows")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    steps, lrs = a.steps or (3 if a.smoke else 50), a.lr or ([1e-4] if a.smoke else [1e-5, 1e-4])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, recs = dpo.model_dir(a.smoke, tmp), dpo.pairs(64 if a.smoke else 400)
        data = tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in recs))
        name = "tiny gpt2-2x64 (smoke)" if a.smoke else "smollm2-135m"
        head = f"DPO, {name}, {len(recs)} pairs, {a.pairs_per_step} pairs/step, max length {a.max_len}, {steps} steps, beta {dpo.BETA}"
        print(head, flush=True)
        base = {"model_name": name, "model": str(model), "data": str(data), "seq_len": a.max_len, "steps": steps, "threads": 2,
                "pairs_per_step": a.pairs_per_step, "rows": 1}
        results = [run_one({**base, "lr": lr, "framework": f, "variant": v, "precision": p})
                   for lr in lrs for f, v, p in ROWS if a.only in (None, f)]
    try:
        who = run.machine()
    except ImportError as e:  # run.machine() names TRL's version
        who = f"(machine line unavailable: {e})"
    md = f"Machine: {who}\n\n{head}\n\nTRL: {dpo.TRL_SETTINGS}\n\n{table(results)}\n"
    print("\n" + md)
    if not a.smoke:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "precision.json").write_text(json.dumps({"machine": who, "setup": head, "results": results}, indent=1))
        (HERE / "results" / "precision.md").write_text(md)


if __name__ == "__main__":
    main()
