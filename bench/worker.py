"""One benchmark run in a fresh process: `python bench/worker.py '<spec json>'` prints `RESULT {json}`.

Every framework trains the same model on the same chat data for the same number of optimizer steps with
the same tokens per step, fp32, AdamW (constant LR, clip 1.0), 2 threads. Measured the same way for all:
- time to first step: process start -> end of optimizer step 1 (imports, loading, tokenizing included);
- throughput over steps 2..S, from the end of step 1 to the end of step S (data loading included);
- loss-bearing tokens = assistant tokens that carry loss (the useful work of chat SFT); HF Trainer's
  recipe puts loss on every token, but only its assistant tokens count as useful work here;
- padding = padded positions / all positions fed to the model; peak RSS of the process.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import psutil

START = psutil.Process().create_time()
TRAINED: list = []  # the model a peer run trained, for held-out scoring after its figures are taken


def _result(
    step_end: list[float],
    loss_tok: list[int],
    tokens: list[int],
    positions: list[int],
    losses: list[float],
    extra: dict,
) -> dict:
    s = len(step_end)
    dt = step_end[-1] - step_end[0]
    return {
        "steps": s,
        "time_to_first_step_s": step_end[0] - START,
        "train_s": dt,
        "loss_tokens": sum(loss_tok[1:s]),
        "tokens": sum(tokens[1:s]),
        "loss_tokens_per_s": sum(loss_tok[1:s]) / dt,
        "tokens_per_s": sum(tokens[1:s]) / dt,
        "padding": 1 - sum(tokens[:s]) / max(1, sum(positions[:s])),
        "step1_loss": losses[0],
        "final_loss": sum(losses[-3:]) / len(losses[-3:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **extra,
    }


def run_dist_ft(spec: dict) -> dict:
    import yaml

    from dist_ft import train
    from dist_ft.config import load_config
    from dist_ft.track import read_metrics, read_steps

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    packing = spec["variant"] == "packed"
    cfg = {
        "model": {
            "path": spec["model"],
            **({"attn_implementation": spec["attn"]} if spec.get("attn") else {}),
            **({"peft": {"method": "lora", **spec["lora"]}} if spec.get("lora") else {}),
        },
        "data": {
            "train": spec["data"],
            "max_seq_len": spec["seq_len"],
            "packing": packing,
            "num_proc": spec.get("num_proc", 0),
        },
        "train": {
            "max_steps": spec["steps"],
            "micro_batch_size": spec["rows"] if packing else spec["examples"],
            "lr": spec["lr"],
            "schedule": "constant",
            "warmup_steps": 0,
        },
        "engine": {"precision": spec.get("precision", "fp32"), "zero_stage": spec.get("zero_stage", 0)},
        "checkpoint": {"every_steps": spec.get("every_steps", 0), "resume": "never"},
        "track": {"wandb": "disabled"},
        "output": {"dir": str(out / "run"), "overwrite": True},
    }
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train.run(load_config(out / "cfg.yaml", []))
    recs = read_metrics(out / "run" / "metrics.jsonl")
    steps = read_steps(out / "run" / "metrics.jsonl")
    saves = [r["checkpoint_save_s"] for r in recs if "checkpoint_save_s" in r]
    loads = []
    if spec.get("every_steps"):  # checkpoint timing: resume the finished run for one more step
        import subprocess  # a fresh process, as a requeued job would be

        subprocess.run(
            [
                sys.executable,
                "-m",
                "dist_ft",
                "train",
                str(out / "cfg.yaml"),
                f"train.max_steps={spec['steps'] + 1}",
                "checkpoint.resume=auto",
            ],
            check=True,
            env={
                k: v
                for k, v in os.environ.items()
                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
            },
        )
        loads = [
            r["checkpoint_load_s"]
            for r in read_metrics(out / "run" / "metrics.jsonl")
            if "checkpoint_load_s" in r
        ]
    # while training (not the export)
    peaks = [s.memory["gpu_peak_mb"] for s in steps if s.memory.get("gpu_peak_mb") is not None]
    return _result(
        [START + s.elapsed_s for s in steps],
        [s.loss_tokens for s in steps],
        [s.tokens for s in steps],
        [round(s.tokens / (1 - s.padding)) for s in steps],
        [s.loss for s in steps],
        {
            "checkpoint_save_s": saves[-1] if saves else None,
            "checkpoint_load_s": loads[-1] if loads else None,
            "peak_gpu_mb": max(peaks) if peaks else None,
            "dist_ft_logged_mfu": steps[-1].mfu,
            "optimizer_bytes": next(
                (r["mem_optimizer_bytes"] for r in recs if "mem_optimizer_bytes" in r), None
            ),
            "trainable_params": next((r["params_trainable"] for r in recs if "params_trainable" in r), None),
            "train_rss_mb": max((s.memory.get("rss_mb") or 0 for s in steps), default=None),
        },
    )


def _optimizer_bytes(trainer) -> int:
    import torch

    return sum(
        v.numel() * v.element_size()
        for st in trainer.optimizer.state.values()
        for v in st.values()
        if torch.is_tensor(v)
    )


class _Counting:
    """Wraps a framework's own collator and records what each batch feeds the model (bookkeeping only)."""

    def __init__(self, inner, pad_id: int):
        self.inner, self.pad_id, self.batches = inner, pad_id, []

    def __call__(self, features):
        useful = [f.pop("n_assist", None) for f in features]
        batch = self.inner(features)
        ids = batch["input_ids"]
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        loss_tok = sum(useful) if None not in useful else int((batch["labels"] != -100).sum())
        self.batches.append((loss_tok, real, ids.numel()))
        return batch


def _hf_common(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    kw = {"attn_implementation": spec["attn"]} if spec.get("attn") else {}
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, **kw)
    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.losses, self.peak_gpu_mb = [], [], None

        def on_step_end(self, args, state, control, **kw):
            self.rss_mb = max(getattr(self, "rss_mb", 0), psutil.Process().memory_info().rss / 2**20)
            if cuda:
                torch.cuda.synchronize()  # the step's kernels are done: the same point dist_ft's step end is taken at
                self.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
            self.ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    common = dict(
        output_dir=spec["out"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    return tok, model, rows, Clock(), common


def run_hf_trainer(spec: dict) -> dict:
    """The seeds' recipe: chat template -> text -> tokenize -> DataCollatorForLanguageModeling(mlm=False)."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok, model, rows, clock, common = _hf_common(spec)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    enc = tok(texts, truncation=True, max_length=spec["seq_len"])
    t0 = time.time()  # bookkeeping (assistant-token counts), not part of the recipe: excluded from TTFS
    n_assist = [
        sum(
            tok.apply_chat_template(r["messages"], return_dict=True, return_assistant_tokens_mask=True)[
                "assistant_masks"
            ][: spec["seq_len"]]
        )
        for r in rows
    ]
    book = time.time() - t0
    ds = Dataset.from_dict(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "n_assist": n_assist}
    )
    collator = _Counting(DataCollatorForLanguageModeling(tok, mlm=False), tok.pad_token_id)
    args = TrainingArguments(
        per_device_train_batch_size=spec["examples"],
        remove_unused_columns=False,
        bf16=spec.get("precision") == "bf16",
        **common,
    )  # bf16: autocast over fp32 weights
    Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[clock]).train()
    b = collator.batches[: len(clock.ends)]
    return _result(
        [t - book for t in clock.ends],
        [x[0] for x in b],
        [x[1] for x in b],
        [x[2] for x in b],
        clock.losses,
        {
            "note": "loss over all tokens (recipe); assistant tokens counted as useful",
            "peak_gpu_mb": clock.peak_gpu_mb,
        },
    )


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok, model, rows, clock, common = _hf_common(spec)
    packed = spec["variant"] != "padded"
    args = SFTConfig(
        max_length=spec["seq_len"],
        packing=packed,
        padding_free=packed,
        assistant_only_loss=True,
        per_device_train_batch_size=spec["rows"] if packed else spec["examples"],
        bf16=spec.get("precision") == "bf16",
        fp16=False,  # bf16: autocast over fp32 weights (TRL's only bf16 path)
        gradient_checkpointing=False,  # TRL's default is on (recompute); off for parity
        **common,
    )
    peft = None
    if spec.get("lora"):  # the same adapter as dist_ft's model.peft: every projection, rank r, alpha, dropout
        from peft import LoraConfig

        lo = spec["lora"]
        peft = LoraConfig(
            r=lo["r"],
            lora_alpha=lo["alpha"],
            lora_dropout=lo["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[clock],
        peft_config=peft,
    )
    trainer.data_collator = collator = _Counting(trainer.data_collator, tok.pad_token_id)
    trainer.train()
    TRAINED.append(trainer.model)  # bench/precision.py scores it on held-out data
    b = collator.batches[: len(clock.ends)]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return _result(
        clock.ends,
        [x[0] for x in b],
        [x[1] for x in b],
        [x[2] for x in b],
        clock.losses,
        {
            "optimizer_bytes": _optimizer_bytes(trainer),
            "trainable_params": trainable,
            "train_rss_mb": clock.rss_mb,
        },
    )


if __name__ == "__main__":
    import torch

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads", 2))
    fn = {"dist_ft": run_dist_ft, "hf_trainer": run_hf_trainer, "trl": run_trl}[spec["framework"]]
    print("RESULT " + json.dumps({**spec, **fn(spec)}), flush=True)
