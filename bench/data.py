"""Data pipeline benchmark: `dist-ft prepare` throughput and the shard reader's cost per training step.

    python bench/data.py            # ~4 min on 2 cores; writes bench/results/data.{json,md}

1. Prepare throughput (tokens written per second, wall clock of the whole prepare: read, template,
   tokenize, labels, pack, write, checksum) for chat SFT records and raw pretraining text, with 1 and
   with all processes; beside it, in the same run, the common peer recipe: `datasets.map(num_proc=N)`
   with `apply_chat_template(return_assistant_tokens_mask=True)` (TRL's assistant-only path) or a
   plain batched tokenizer call for text. The peer only tokenizes into an Arrow cache (no packing).
2. Reader overhead: the test suite's tiny GPT-2 (2x64, 128-token rows) and the bench's GPT-2 4x256
   (512-token rows) train on the shards; the median `step_time_s` (which includes reading the batch)
   against the median time a rank spends getting one batch from the memory-mapped shards (stream
   position -> rows -> collate).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import prep  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def text_data(n: int = 4000) -> Path:
    path = prep.CACHE / f"text-{n}.jsonl"
    if not path.exists():
        rng = random.Random(1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "".join(
                json.dumps({"text": prep._words(rng, int(rng.lognormvariate(5.8, 0.5)))}) + "\n"
                for _ in range(n)
            )
        )
    return path


def data_cfg(source: Path, task: str, num_proc: int, seq_len: int = 1024):
    from dist_ft.config import DataConfig

    return DataConfig(
        train=str(source), task=task, max_seq_len=seq_len, num_proc=num_proc, shard_tokens=1 << 22
    )


def time_prepare(tok, source: Path, task: str, num_proc: int) -> dict:
    from dist_ft import tasks
    from dist_ft.data import shards

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        m = shards.prepare(
            data_cfg(source, task, num_proc),
            tok,
            Path(tmp) / "ds",
            tasks.get(task),
            log=lambda *_: None,
            progress=False,
        )
        dt = time.perf_counter() - t0
    st = m.splits["train"].stats
    return {
        "tokens": st.tokens,
        "records": st.records,
        "seconds": dt,
        "tokens_per_s": st.tokens / dt,
        "shards": len(m.splits["train"].shards),
    }


def time_peer(tok, source: Path, task: str, num_proc: int) -> dict:
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=str(source), split="train", cache_dir=tmp)
        if task == "sft":

            def fn(batch):
                enc = tok.apply_chat_template(
                    batch["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
                return {"input_ids": enc["input_ids"], "assistant_masks": enc["assistant_masks"]}
        else:

            def fn(batch):
                return {"input_ids": tok(batch["text"])["input_ids"]}

        out = ds.map(
            fn,
            batched=True,
            batch_size=256,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=ds.column_names,
        )
        tokens = sum(len(x) for x in out["input_ids"])
        dt = time.perf_counter() - t0
    return {"tokens": tokens, "records": len(out), "seconds": dt, "tokens_per_s": tokens / dt}


def tiny_model() -> Path:
    """The test suite's tiny GPT-2 (2 layers x 64, 600-token BPE vocabulary)."""
    out = prep.CACHE / "gpt2-tiny"
    if not (out / "model.safetensors").exists():
        sys.path.insert(0, str(HERE.parent / "tests"))
        import tiny

        out.mkdir(parents=True, exist_ok=True)
        tiny.make_gpt2(out)
    return out


def reader_overhead(model: Path, chat: Path, seq_len: int) -> dict:
    """Median training step vs. the median time to get the same batch from the shards."""
    from dist_ft import tasks
    from dist_ft.config import load_config
    from dist_ft.data import dataset
    from dist_ft.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cfg.yaml"
        cfg.write_text(
            f"model: {{path: {model}}}\ndata: {{train: {chat}, max_seq_len: {seq_len}}}\n"
            "train: {max_steps: 25, micro_batch_size: 4, lr: 1.0e-4}\nengine: {precision: fp32}\n"
            f"track: {{wandb: disabled}}\noutput: {{dir: {tmp}/out}}\n"
        )
        env = {
            **os.environ,
            "DIST_FT_CACHE": f"{tmp}/cache",
            "OMP_NUM_THREADS": str(os.cpu_count()),
            "PYTHONPATH": str(HERE.parent),
        }
        r = subprocess.run(
            [sys.executable, "-m", "dist_ft", "train", str(cfg)], capture_output=True, text=True, env=env
        )
        if r.returncode != 0:
            raise SystemExit(r.stderr[-3000:])
        steps = [
            json.loads(x)
            for x in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x
        ]
        step_s = statistics.median(s["step_time_s"] for s in steps[2:])
        os.environ["DIST_FT_CACHE"] = f"{tmp}/cache"
        c = load_config(cfg)
        # as train loads it (ChatML added to a base model): the cached shards match
        tok = load_tokenizer(c.model)
        prep_ = dataset.build(c.data, tok, tasks.get(c.data.task), log=lambda *_: None)
        stream = prep_.stream(4, 0, 1)
        read, total = [], []
        for _ in range(500):
            t0 = time.perf_counter()
            # the reader: position -> row ids -> mmap rows
            rows = [prep_.train.items[i] for i in stream.next_indices()]
            t1 = time.perf_counter()
            prep_.collate(rows)  # tensors for the model (the same code as before shards existed)
            read.append(t1 - t0)
            total.append(time.perf_counter() - t0)
        read_s, batch_s = statistics.median(read), statistics.median(total)
    return {
        "model": model.name,
        "step_s": step_s,
        "read_s": read_s,
        "batch_s": batch_s,
        "fraction": read_s / step_s,
        "batch_fraction": batch_s / step_s,
        "rows_per_step": 4,
        "seq_len": seq_len,
    }


def main() -> None:
    from transformers import AutoTokenizer

    tok_dir = prep.tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    chat, text = prep.chat_data(12000), text_data()
    procs = len(os.sched_getaffinity(0))
    rows = []
    for task, source in (("sft", chat), ("pretrain", text)):
        for n in sorted({1, procs}):
            rows.append(
                {"task": task, "run": "dist-ft prepare", "processes": n, **time_prepare(tok, source, task, n)}
            )
            rows.append(
                {
                    "task": task,
                    "run": "datasets.map (tokenize only)",
                    "processes": n,
                    **time_peer(tok, source, task, n),
                }
            )
            print(rows[-2], rows[-1], flush=True)
    readers = [
        reader_overhead(tiny_model(), chat, 128),
        reader_overhead(prep.model_dir("gpt2-4x256"), chat, 512),
    ]
    print(readers, flush=True)
    md = [
        "| data | run | processes | records | tokens | seconds | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {'chat SFT (SmolLM2 tokenizer, ChatML)' if r['task'] == 'sft' else 'raw text (pretrain)'} | {r['run']} | "
            f"{r['processes']} | {r['records']:,} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} |"
        )
    md.append("")
    md += [
        "| model | rows per step | training step (median) | reader: rows from shards | share | reader + collate to tensors | share |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in readers:
        md.append(
            f"| {r['model']} | 4 x {r['seq_len']} tokens, packed | {1e3 * r['step_s']:.1f} ms | {1e3 * r['read_s']:.3f} ms | "
            f"**{100 * r['fraction']:.2f}%** | {1e3 * r['batch_s']:.3f} ms | {100 * r['batch_fraction']:.2f}% |"
        )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "data.json").write_text(json.dumps({"prepare": rows, "reader": readers}, indent=1))
    (out / "data.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
