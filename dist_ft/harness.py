"""`dist-ft eval --harness lm-eval`: EleutherAI lm-evaluation-harness on an exported model directory, offline.

Tasks come from lm-eval's registry, from the tasks shipped here (`harness_tasks/`: veloria_mc, a
multiple-choice task over local JSONL) and from `--include DIR` (your own task YAMLs). Results (metrics and,
per sample, the log-likelihood of each choice) are saved as JSON next to the run (`<run>/eval/`).
`loglikelihood` is dist_ft's own scorer of a (context, continuation) pair, tokenized the way lm-eval's HF
model does it, so the two can be compared.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from .errors import UserError

SHIPPED = Path(__file__).resolve().parent / "harness_tasks"


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-eval's HF backend splits them: trailing spaces of the context
    move to the continuation, the whole is encoded once and split at the context's length."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx) :]


def loglikelihood(tok, model, context: str, continuation: str) -> float:
    """Summed log-probability of `continuation` after `context` (fp32 log-softmax, summed in fp64)."""
    import torch

    ctx, cont = encode_pair(tok, context, continuation)
    ids = torch.tensor([(ctx + cont)[:-1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -len(cont) :].float()
    return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).double().sum())


def _task_dir(tmp: Path) -> Path:
    """The shipped task YAMLs with their data files made absolute
    (lm-eval reads them relative to the working dir)."""
    for y in SHIPPED.glob("*.yaml"):
        text = y.read_text()
        for data in SHIPPED.glob("*.jsonl"):
            text = text.replace(f"test: {data.name}", f"test: {data}")
        (tmp / y.name).write_text(text)
    return tmp


def run(
    model_dir: str,
    tasks: list[str],
    include: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    out: Path | None = None,
) -> dict:
    """Run lm-eval's HF backend (fp32, CPU unless a GPU is there) on `model_dir`; returns its results dict and
    writes them, with each sample's per-choice log-likelihoods, to `out`
    (default: <model_dir>/../eval/lm-eval-<tasks>.json)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(
            f"--model '{model_dir}': not an exported model directory (expected config.json inside)"
        )
    # the model and the shipped data are local; never wait on the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            "--harness lm-eval needs the lm-eval package: "
            "pip install 'dist_ft[eval]' (or pip install lm-eval)"
        ) from None
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        manager = TaskManager(include_path=[str(_task_dir(Path(tmp)))] + ([include] if include else []))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise UserError(
                f"--tasks: no lm-eval task {unknown[0]!r} "
                f"(shipped here: {', '.join(p.stem for p in SHIPPED.glob('*.yaml'))}; "
                "your own: --include DIR with its YAML)"
            )
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": "float32"},
            tasks=tasks,
            task_manager=manager,
            batch_size=batch_size,
            limit=limit,
            log_samples=True,
            device="cuda" if torch.cuda.is_available() else "cpu",
        )
    seconds = time.perf_counter() - t0
    out = out or Path(model_dir).resolve().parent / "eval" / f"lm-eval-{'-'.join(tasks)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    samples = {
        t: [
            {"doc": s["doc"], "target": s["target"], "loglikelihoods": [float(r[0][0]) for r in s["resps"]]}
            for s in res.get("samples", {}).get(t, [])
        ]
        for t in tasks
    }
    saved = {
        "model": str(model_dir),
        "tasks": tasks,
        "seconds": round(seconds, 1),
        "results": res["results"],
        "samples": samples,
    }
    out.write_text(json.dumps(saved, indent=1, default=str))
    return {**saved, "path": str(out)}


def table(saved: dict) -> str:
    lines = []
    for task, metrics in saved["results"].items():
        shown = ", ".join(
            f"{k.split(',')[0]} {v:.4f}"
            for k, v in metrics.items()
            if isinstance(v, float) and "stderr" not in k
        )
        lines.append(f"{task}: {shown} ({len(saved['samples'].get(task, []))} samples)")
    return "\n".join(lines + [f"saved {saved['path']} ({saved['seconds']} s)"])
