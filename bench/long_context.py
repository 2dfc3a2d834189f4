"""How long a sequence trains in a fixed memory budget per rank: `python bench/long_context.py` (issue #29).

Model: a Llama-shaped model built here (hidden 256, MLP 1024, `--layers` layers, 4 heads, the test tokenizer), fp32 -
SmolLM2-135M on 2 CPU cores takes minutes per step at 16k tokens, which makes a search over lengths hours long.
Data: one long text (continued pretraining: loss on every token), rows of exactly the length tried, one row per
step. Each run is a fresh process tree inside a cgroup-v1 memory limit of `--budget-mb` per rank plus 256 MB
(and, for a multi-rank run, the deepspeed launcher's own peak RSS) - the OOM killer ends a run that needs more,
nothing else on the machine is touched; without a writable memory cgroup
the runs are uncapped and only the peak RSS is reported. For each mode the length doubles from 2,048 until a
run fails (or `--max-len`); the longest that trained, the peak RSS per rank at each length (ru_maxrss of the
largest process of the tree) and tokens/s over step 2 at `--common-len` are written to
bench/results/long_context.{json,md}.

Modes: dist_ft sp=1 plain; sp=1 with gradient checkpointing + tiled MLP (4 tiles); sp=2 on 2 ranks with the
same; HF Trainer (transformers' own loop, plain, as a peer) - all on the same model, data and budget.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CGROUP = Path("/sys/fs/cgroup/memory")
MODES = {
    "dist_ft sp=1": (1, ()),
    "dist_ft sp=1 + checkpointing + tiled MLP": (
        1,
        ("model.gradient_checkpointing=true", "model.tiled_mlp=4"),
    ),
    "dist_ft sp=2 + checkpointing + tiled MLP": (
        2,
        ("model.gradient_checkpointing=true", "model.tiled_mlp=4", "engine.sequence_parallel=2"),
    ),
    "HF Trainer (peer)": (1, None),
}


def build(tmp: Path, layers: int) -> tuple[Path, Path]:
    """The model directory and a text file long enough for two rows of the longest length."""
    sys.path.insert(0, str(REPO / "tests"))
    import tiny
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp / "model"
    tok = tiny.train_tokenizer(out, eos="</s>")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1 << 17,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    words = " ".join(tiny.corpus())
    text = (words + " ") * (1 + (2 << 17) // max(1, len(tok(words)["input_ids"])))
    data = tmp / "long.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    return out, data


class Capped:
    """A fresh memory cgroup (v1) limited to `limit_mb`, or nothing where none can be made."""

    def __init__(self, limit_mb: int):
        self.path = CGROUP / f"dist_ft_bench_{os.getpid()}_{time.monotonic_ns()}"
        try:
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit_mb << 20))
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit_mb << 20))
        except OSError:
            self.path = None  # type: ignore[assignment]

    def preexec(self):
        path = self.path
        return (lambda: (path / "cgroup.procs").write_text(str(os.getpid()))) if path else None

    def close(self) -> None:
        if self.path is not None:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)


def run(mode: str, length: int, model: Path, data: Path, tmp: Path, budget_mb: int, steps: int) -> dict:
    ranks, extra = MODES[mode]
    out = tmp / f"run-{abs(hash((mode, length)))}"
    cfg = tmp / "cfg.yaml"
    cfg.write_text(f"model: {{path: {model}}}\ndata: {{train: {data}}}\n")
    if extra is None:
        cmd = [
            sys.executable,
            str(Path(__file__)),
            "--hf-worker",
            json.dumps([str(model), str(data), length, steps]),
        ]
    else:
        args = [
            f"model.path={model}",
            f"data.train={data}",
            "data.task=pretrain",
            "data.packing=false",
            f"data.max_seq_len={length}",
            "train.micro_batch_size=1",
            f"train.max_steps={steps}",
            "train.lr=1e-4",
            "engine.precision=fp32",
            "engine.loss_chunk_tokens=4096",
            "track.wandb=disabled",
            "track.sample_prompts=[]",
            f"output.dir={out}",
            *extra,
        ]
        if ranks == 1:
            cmd = [sys.executable, "-m", "dist_ft", "train", str(cfg), *args]
        else:
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
            cmd += ["--master_port", str(29700 + length % 97), "launch/train.py", str(cfg), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // ranks)), "PYTHONPATH": str(REPO)}
    # every run gets the budget per rank plus 256 MB of slack; a multi-rank run also its launcher's own memory
    cap = Capped(int(budget_mb * ranks + 256 + (launcher_mb() if ranks > 1 else 0)))
    t0 = time.time()
    p = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=cap.preexec(),
    )
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(p.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    # the rusage of the tree: ru_maxrss is the largest single process (a rank; the launcher waits for them)
    _, status, usage = os.wait4(p.pid, 0)
    reader.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    log = "".join(chunks)
    cap.close()
    peak = usage.ru_maxrss / 1024
    res = {
        "mode": mode,
        "len": length,
        "ok": p.returncode == 0,
        "peak_rss_mb": peak,
        "wall_s": time.time() - t0,
        "capped": cap.path is not None,
    }
    if p.returncode == 0 and extra is not None:
        steps_ = [
            json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines() if '"tokens_per_s"' in s
        ]
        res["tokens_per_s"] = steps_[-1]["tokens_per_s"]
    elif p.returncode == 0:
        res["tokens_per_s"] = json.loads(log.rsplit("HFRESULT ", 1)[1].splitlines()[0])["tokens_per_s"]
    else:
        res["tail"] = log[-400:]
    return res


_LAUNCHER: list[float] = []


def launcher_mb() -> float:
    """Peak RSS of the deepspeed launcher process itself (it imports torch): measured once."""
    if not _LAUNCHER:
        p = subprocess.Popen([sys.executable, "-c", "import deepspeed.launcher.runner"], cwd=REPO)
        _, _, usage = os.wait4(p.pid, 0)
        _LAUNCHER.append(usage.ru_maxrss / 1024)
    return _LAUNCHER[0]


def hf_worker(spec: str) -> None:
    """HF Trainer on the same model and rows: plain, fp32, batch 1, AdamW."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    model_dir, data, length, steps = json.loads(spec)
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(json.loads(Path(data).read_text())["text"])["input_ids"]
    rows = [ids[i * length : (i + 1) * length] for i in range(steps)]
    ds = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows]
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out,
            per_device_train_batch_size=1,
            max_steps=steps,
            learning_rate=1e-4,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        Trainer(model=model, args=args, train_dataset=ds, callbacks=[Clock()]).train()
    dt = times[-1] - times[-2] if len(times) > 1 else float("nan")
    print("HFRESULT " + json.dumps({"tokens_per_s": length / dt}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-mb", type=int, default=1536, help="memory per rank")
    ap.add_argument("--max-len", type=int, default=1 << 16)
    ap.add_argument("--common-len", type=int, default=4096)
    ap.add_argument("--start-len", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the bench's model")
    ap.add_argument("--hf-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hf_worker:
        hf_worker(a.hf_worker)
        return
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        model, data = build(tmp, a.layers)
        for mode in MODES:
            length = a.start_len
            while length <= a.max_len:
                r = run(mode, length, model, data, tmp, a.budget_mb, 2 if length == a.common_len else 1)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "tail"}), flush=True)
                if not r["ok"]:
                    break
                length *= 2
    head = (
        f"Machine: {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}; "
        f"model: {a.layers} layers x hidden 256; "
        f"{time.strftime('%Y-%m-%d')}; budget {a.budget_mb} MB per rank + 256 MB (+ launcher {launcher_mb():.0f} MB "
        "for 2 ranks) "
        f"({'cgroup-capped' if rows and rows[0]['capped'] else 'NOT capped: no writable memory cgroup'})"
    )
    best = {m: max([r["len"] for r in rows if r["mode"] == m and r["ok"]], default=0) for m in MODES}
    lines = [
        head,
        "",
        "| mode | longest sequence trained | peak RSS per rank (MB) by length | tokens/s at "
        f"{a.common_len} |",
        "|---|---|---|---|",
    ]
    for m in MODES:
        mine = [r for r in rows if r["mode"] == m]
        ladder = ", ".join(
            f"{r['len'] // 1024}k: {r['peak_rss_mb'] or 0:.0f}{'' if r['ok'] else ' (failed)'}" for r in mine
        )
        tps = next((r.get("tokens_per_s") for r in mine if r["len"] == a.common_len and r["ok"]), None)
        lines.append(
            f"| {m} | {best[m]:,} | {ladder} | {tps:.0f} |"
            if tps
            else f"| {m} | {best[m]:,} | {ladder} | — |"
        )
    plain = best["dist_ft sp=1"]
    lines += [
        "",
        f"sp=2 + tiling trains {best['dist_ft sp=2 + checkpointing + tiled MLP'] / max(plain, 1):.1f}x the "
        "sequence length of sp=1 plain.",
    ]
    md = "\n".join(lines) + "\n"
    print(md)
    res = HERE / "results"
    (res / "long_context.md").write_text(md)
    (res / "long_context.json").write_text(json.dumps({"head": head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
