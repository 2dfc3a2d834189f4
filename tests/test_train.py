"""End-to-end runs of the real CLI on tiny local models: training, export, chat, pretraining, bad input."""

import json
from pathlib import Path

import pytest
import tiny
from helpers import REPO, assert_clean_failure, run_cli, train_args


def _metrics(out: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, gpt2_dir, toy_data):
    tmp = tmp_path_factory.mktemp("chat_run")
    train, val = toy_data
    r = run_cli(
        *train_args(
            tmp,
            gpt2_dir,
            train,
            f"data.validation={val}",
            "train.max_steps=150",
            "train.lr=5e-3",
            "train.eval_every=75",
            "track.wandb=offline",
            'track.sample_prompts=["What color is the cat?"]',
            "track.sample_max_new_tokens=8",
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "out", r


def test_training_reduces_loss_and_logs_everything(chat_run):
    out, r = chat_run
    steps, evals = _metrics(out)
    assert [s["step"] for s in steps] == list(range(1, 151))
    first, last = sum(s["loss"] for s in steps[:5]) / 5, sum(s["loss"] for s in steps[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert [e["step"] for e in evals] == [75, 150] and evals[1]["val_loss"] < evals[0]["val_loss"] < 0.5
    for key in ("lr", "grad_norm", "tokens_per_s", "loss_tokens_per_s", "tokens", "loss_tokens"):
        assert all(s[key] is not None and s[key] >= 0 for s in steps), key
    assert all(0 < s["loss_tokens"] < s["tokens"] for s in steps)  # assistant-only loss
    assert (out / "loss.png").stat().st_size > 1000
    saved = (out / "config.yaml").read_text()
    assert "lr: 0.005" in saved and "max_steps: 150" in saved
    assert (
        "step    150 | loss" in r.stdout + r.stderr
        and "global batch = 4 micro x 1 accum x 1 ranks" in r.stdout + r.stderr
    )


def test_export_reloads_and_chats(chat_run):
    out, _ = chat_run
    final = out / "final"
    assert (final / "model.safetensors").is_file() and not (out / "final.tmp").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(final)
    assert "<|im_start|>" in tok.chat_template and "<|im_end|>" in tok.get_vocab()
    # ready for other servers (vLLM, transformers): generation stops on the template's end of turn by itself
    gen = json.loads((final / "generation_config.json").read_text())
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert eos[0] == im_end and gen["pad_token_id"] == tok.pad_token_id
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What color is the banana?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    new = AutoModelForCausalLM.from_pretrained(final).generate(**ids, max_new_tokens=20, do_sample=False)[
        0, ids["input_ids"].shape[1] :
    ]
    # stopped there, no config passed
    assert new[-1].item() == im_end and len(new) < 20 and "yellow" in tok.decode(new)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    pipe = pipeline("text-generation", model=str(final))
    res = pipe([{"role": "user", "content": "What color is the banana?"}], max_new_tokens=8, do_sample=False)
    reply = res[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and "yellow" in reply["content"]  # the toy fact was learned
    r = run_cli(
        "chat",
        "--model",
        str(final),
        "--prompt",
        "What color is the cat?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "The cat is black."
    # the run's sample generations (samples.jsonl + W&B table) are what chat answers
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples == [{"step": 150, "prompt": "What color is the cat?", "answer": "The cat is black."}]
    assert len(list((out / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_batched_greedy_answers_equal_one_at_a_time(chat_run):
    """inference.generate left-pads a batch of prompts of different lengths: the greedy answers are those of each
    prompt alone (what the demo, eval and sample prompts rely on when they generate many at once)."""
    from dist_ft.inference import generate, load

    tok, model = load(str(chat_run[0] / "final"))
    convs = [
        [{"role": "user", "content": q}]
        for q in (
            "What color is the cat?",
            "Hi",
            "What color is the banana? Answer briefly please.",
            "tree?",
            "What color is the river, and why is it that color?",
        )
    ]
    convs.append([{"role": "system", "content": "Answer briefly."}, *convs[0]])
    alone = [generate(tok, model, [c], max_new_tokens=10, temperature=0.0)[0] for c in convs]
    together = generate(tok, model, convs, max_new_tokens=10, temperature=0.0, batch_size=6)
    assert together == alone and alone[0] == "The cat is black." and len(set(alone)) > 2, (together, alone)


def test_pad_to_longest_mode_trains(tmp_path, gpt2_dir, toy_data):
    r = run_cli(*train_args(tmp_path, gpt2_dir, toy_data[0], "data.packing=false", "train.max_steps=10"))
    assert r.returncode == 0, r.stderr[-3000:]
    steps, _ = _metrics(tmp_path / "out")
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(s["tokens"] <= 4 * 40 for s in steps)  # 4 padded examples per step, no packed rows


def test_continued_pretraining_on_raw_text(tmp_path, gpt2_dir):
    text = tiny.write_jsonl(tmp_path / "text.jsonl", [{"text": line} for line in tiny.corpus()])
    r = run_cli(*train_args(tmp_path, gpt2_dir, text, "data.task=pretrain", "train.max_steps=15"))
    assert r.returncode == 0, r.stderr[-3000:]
    steps, _ = _metrics(tmp_path / "out")
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    # loss on every token except the last of each document (nothing to predict after it)
    assert all(s["loss_tokens"] >= 0.9 * s["tokens"] for s in steps)
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "mode,expect", [("truncate", "3 truncated, 0 dropped"), ("drop", "0 truncated, 3 dropped")]
)
def test_overlong_examples_are_counted(tmp_path, gpt2_dir, mode, expect):
    long = {
        "messages": [
            {"role": "user", "content": "apple " * 40},
            {"role": "assistant", "content": "red " * 40},
        ]
    }
    data = tiny.write_jsonl(tmp_path / "d.jsonl", tiny.toy_chat(16) + [long] * 3)
    r = run_cli(
        *train_args(
            tmp_path, gpt2_dir, data, "data.max_seq_len=64", f"data.overlong={mode}", "train.max_steps=2"
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"over max_seq_len: {expect}" in r.stdout + r.stderr


BAD = {
    "missing": (None, r"nope.jsonl: no such file"),
    "empty": ("", r"empty.jsonl: no records"),
    "malformed": ('{"text": "fine"}\n{"messages": [\n', r"malformed.jsonl:2: malformed JSON"),
    "unknown_format": (
        '{"question": "a", "answer": "b"}\n',
        r"unknown_format.jsonl:1: unknown record format",
    ),
    "no_assistant": (
        '{"messages": [{"role": "user", "content": "hi"}]}\n',
        r"no_assistant.jsonl:1: conversation has no assistant turn",
    ),
    "out_of_order": (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}\n',
        r"out_of_order.jsonl:1: roles out of order",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_one_clear_error(tmp_path, gpt2_dir, case):
    content, pattern = BAD[case]
    path = tmp_path / ("nope.jsonl" if content is None else f"{case}.jsonl")
    if content is not None:
        path.write_text(content)
    r = run_cli(*train_args(tmp_path, gpt2_dir, path, "train.max_steps=2"))
    assert_clean_failure(r, pattern, tmp_path / "out")


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("train.lerning_rate=1", r"unknown config key 'train.lerning_rate'; did you mean"),
        (
            "train.micro_batch_size=many",
            r"config key 'train.micro_batch_size': Input should be a valid integer",
        ),
        ("model.path=/does/not/exist", r"model.path '/does/not/exist': directory does not exist"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, gpt2_dir, toy_data, override, pattern):
    r = run_cli(*train_args(tmp_path, gpt2_dir, toy_data[0], override))
    assert_clean_failure(r, pattern, tmp_path / "out")


def test_finished_run_is_not_overwritten(chat_run):
    out, _ = chat_run
    before = (out / "final" / "model.safetensors").stat().st_mtime_ns
    r = run_cli("train", str(out / "config.yaml"))
    assert_clean_failure(r, r"already holds a finished run", None)
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == before


TASK_WITH_METRICS = """
import sys
from dataclasses import replace

from dist_ft import tasks, train
from dist_ft.config import load_config
from dist_ft.tasks import LossOut

sft = tasks.get("sft")


def loss(model, batch, chunk):  # SFT's loss, plus two metric sums a task could report
    out = sft.loss(model, batch, chunk)
    return LossOut(out.sum, {"twice": 2 * out.sum, "units": out.sum.new_tensor(float(batch.n_loss))})


def eval_metrics(total, n, sums):
    return {**sft.eval_metrics(total, n, sums), "val_twice": sums.scalar["twice"] / n, "val_units": sums.scalar["units"] / n}


task = replace(sft, loss=loss, eval_metrics=eval_metrics)
tasks.get = lambda name: task
train.run(load_config(sys.argv[1], sys.argv[2:]))
"""


def test_task_metric_sums_reach_the_step_and_eval_records(tmp_path, gpt2_dir, toy_data):
    """A task's LossOut.metrics are summed over the step's micro-batches (and ranks) and divided by the step's
    loss units; at evaluation their sums over the validation set reach the task's eval_metrics."""
    import subprocess
    import sys

    args = train_args(
        tmp_path,
        gpt2_dir,
        toy_data[0],
        f"data.validation={toy_data[1]}",
        "train.max_steps=3",
        "train.grad_accum=2",
        "train.micro_batch_size=2",
        "track.wandb=disabled",
    )[1:]
    r = subprocess.run(
        [sys.executable, "-c", TASK_WITH_METRICS, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    steps, evals = _metrics(tmp_path / "out")
    assert len(steps) == 3 and len(evals) == 1
    for s in steps:
        assert s["twice"] == pytest.approx(2 * s["loss"], rel=1e-12) and s["units"] == 1.0
    assert (
        evals[0]["val_twice"] == pytest.approx(2 * evals[0]["val_loss"], rel=1e-12)
        and evals[0]["val_units"] == 1.0
    )
