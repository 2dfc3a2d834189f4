"""Sequence heads (data.task classify / reward) on the tiny GPT-2: last-token pooling, the Bradley-Terry loss by
hand in fp64, learning the shipped sentiment set and toy preference pairs, the export through pipeline() and
dist-ft eval, 2 ranks == 1 rank at ZeRO-2, and SIGKILL + resume bit-identical with LoRA."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import tiny
import torch
from helpers import REPO, run_cli, run_cmd, train_cmd
from safetensors.torch import load_file

SENTIMENT = REPO / "data" / "sentiment" / "train.jsonl"


def _head_model(model_dir: Path, num_labels: int):
    from dist_ft.config import ModelConfig
    from dist_ft.model import load_model
    from dist_ft.tokenizer import load_tokenizer

    mc = ModelConfig(path=str(model_dir))
    tok = load_tokenizer(mc)
    torch.manual_seed(0)
    return tok, load_model(
        mc, tok, torch.float32, "AutoModelForSequenceClassification", head={"num_labels": num_labels}
    ).eval()


def _examples(tok, texts: list[str], label: int = 0):
    from dist_ft.data.chat import IGNORE, Example

    return [
        Example(ids + [label], [IGNORE] * len(ids) + [label]) for ids in (tok(t)["input_ids"] for t in texts)
    ]


def test_pooling_picks_the_last_non_pad_token(gpt2_dir):
    """An example's logits alone, right-padded in a batch with longer ones, and left-padded by hand, are the same."""
    from dist_ft.tasks.classify import collate, scores

    tok, model = _head_model(gpt2_dir, 3)
    texts = ["the cat is black", "what color is the apple and the banana and the cherry tree", "red"]
    exs = _examples(tok, texts)
    with torch.no_grad():
        alone = [scores(model, collate([ex], 64, tok.pad_token_id, False))[0] for ex in exs]
        batch = scores(model, collate(exs, 64, tok.pad_token_id, False))
        ids = [ex.input_ids[:-1] for ex in exs]
        w = max(map(len, ids))
        left = model(
            input_ids=torch.tensor([[tok.pad_token_id] * (w - len(i)) + i for i in ids]),
            attention_mask=torch.tensor([[0] * (w - len(i)) + [1] * len(i) for i in ids]),
            position_ids=torch.tensor([[0] * (w - len(i)) + list(range(len(i))) for i in ids]),
        ).logits
    for k in range(3):
        assert (alone[k] - batch[k]).abs().max() < 1e-5 and (alone[k] - left[k]).abs().max() < 1e-5, k
    assert (
        alone[0] - alone[1]
    ).abs().max() > 1e-3  # different texts, different logits: the comparison can fail


def test_bradley_terry_loss_equals_a_hand_computed_fp64_value(gpt2_dir):
    from dist_ft.tasks.reward import collate, loss

    tok, model = _head_model(gpt2_dir, 1)
    pairs = [_examples(tok, ["the apple is red", "the apple is blue"]), _examples(tok, ["yes thanks", "no"])]
    margin = 0.25
    with torch.no_grad():
        r = [
            float(model(input_ids=torch.tensor([ex.input_ids[:-1]])).logits[0, 0].double())
            for p in pairs
            for ex in p
        ]
        got = loss(model, collate(pairs, 64, tok.pad_token_id, False), 0, margin=margin)
    want = sum(math.log1p(math.exp(-(r[2 * k] - r[2 * k + 1] - margin))) for k in range(2))
    assert abs(float(got.sum) - want) < 1e-6, (float(got.sum), want)
    assert float(got.metrics["accuracy"]) == sum(r[2 * k] > r[2 * k + 1] for k in range(2))


@pytest.fixture(scope="module")
def cls_cfg(tmp_path_factory) -> Path:
    """The shipped sentiment set, a fifth held out, on a private tiny GPT-2 (2-class head)."""
    tmp = tmp_path_factory.mktemp("classify")
    base = tiny.make_gpt2(tmp / "base")
    path = tmp / "classify.yaml"
    path.write_text(
        f"model: {{path: {base}}}\ndata: {{train: {SENTIMENT}, val_fraction: 0.2, max_seq_len: 64, task: classify, packing: false}}\n"
        "train: {max_steps: 60, micro_batch_size: 8, lr: 3.0e-3, warmup_steps: 10, eval_every: 30}\n"
        "engine: {precision: fp32}\ncheckpoint: {every_steps: 20}\ntrack: {wandb: disabled}\n"
    )
    return path


@pytest.fixture(scope="module")
def cls_run(cls_cfg) -> Path:
    out = cls_cfg.parent / "one"
    r = run_cmd(train_cmd(cls_cfg, out, 1, "train.micro_batch_size=8"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_classifier_learns_and_exports_for_pipeline_and_eval(cls_run, cls_cfg, tmp_path):
    from transformers import AutoModelForSequenceClassification, pipeline

    evals = [
        json.loads(x) for x in (cls_run / "metrics.jsonl").read_text().splitlines() if "val_accuracy" in x
    ]
    assert evals[-1]["val_accuracy"] > 0.8 and evals[-1]["val_macro_f1"] > 0.8, evals
    assert evals[-1]["val_count_0"] + evals[-1]["val_count_1"] > 40
    final = cls_run / "final"
    assert AutoModelForSequenceClassification.from_pretrained(final).config.id2label == {
        0: "negative",
        1: "positive",
    }
    clf = pipeline("text-classification", model=str(final))
    recs = [json.loads(x) for x in SENTIMENT.read_text().splitlines()[:40]]
    got = clf([r["text"] for r in recs])
    assert {g["label"] for g in got} <= {"negative", "positive"}
    acc = sum(g["label"] == r["label"] for g, r in zip(got, recs, strict=False)) / len(recs)
    data = tiny.write_jsonl(tmp_path / "some.jsonl", recs)
    r = run_cli("eval", "--model", str(final), "--data", str(data))
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"accuracy (\d+\.\d)% \((\d+)/40\) \| macro-F1 (\d\.\d+)", r.stdout)
    # dist-ft eval agrees with pipeline() on every record
    assert m and int(m.group(2)) == round(acc * 40), r.stdout


def test_classifier_two_ranks_equal_one_rank(cls_cfg):
    """12 steps at lr 1e-3: further on, Adam amplifies the rounding of another padding width and reduction order into
    differences of order lr on parameters whose gradient is near zero (the fresh head)."""
    one, two = cls_cfg.parent / "one-20", cls_cfg.parent / "two-20"
    r = run_cmd(train_cmd(cls_cfg, one, 1, "train.max_steps=12", "train.lr=1.0e-3"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cmd(
        train_cmd(
            cls_cfg,
            two,
            2,
            "engine.zero_stage=2",
            "train.micro_batch_size=4",
            "train.max_steps=12",
            "train.lr=1.0e-3",
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = tiny.losses(one), tiny.losses(two)
    assert max(abs(x - y) for x, y in zip(a, b, strict=False)) < 2e-5
    wa, wb = (load_file(o / "final" / "model.safetensors") for o in (one, two))
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 2e-5, worst


def test_classifier_lora_resume_after_sigkill_is_bit_identical(cls_cfg):
    lora = ("model.peft.method=lora", "model.peft.r=4", "train.max_steps=30")
    ref, out = cls_cfg.parent / "lora", cls_cfg.parent / "lora-killed"
    assert run_cmd(train_cmd(cls_cfg, ref, 1, *lora)).returncode == 0
    r = run_cmd(train_cmd(cls_cfg, out, 1, *lora), {"DIST_FT_TEST_KILL_AT_STEP": "25"})
    assert r.returncode != 0 and (out / "checkpoints" / "step-20").is_dir()
    r = run_cmd(train_cmd(cls_cfg, out, 1, *lora))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert tiny.losses(out) == tiny.losses(ref)
    a, b = (load_file(o / "final" / "adapter" / "adapter_model.safetensors") for o in (ref, out))
    assert a.keys() == b.keys() and any("score" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)


def test_reward_model_learns_pairs_and_eval_reports_pairwise_accuracy(tmp_path, gpt2_dir):
    train = tiny.write_jsonl(tmp_path / "pairs.jsonl", tiny.toy_pairs(96))
    # rejected answers never seen
    val = tiny.write_jsonl(tmp_path / "val.jsonl", tiny.toy_pairs(24, wrong=tiny.OTHER_WRONG))
    cfg = tmp_path / "reward.yaml"
    cfg.write_text(
        f"model: {{path: {gpt2_dir}}}\ndata: {{train: {train}, validation: {val}, max_seq_len: 64, task: reward, packing: false}}\n"
        "train: {max_steps: 100, micro_batch_size: 4, lr: 5.0e-3, warmup_steps: 5}\nengine: {precision: fp32}\ntrack: {wandb: disabled}\n"
    )
    r = run_cmd(train_cmd(cfg, tmp_path / "out", 1))
    assert r.returncode == 0, r.stderr[-3000:]
    ev = [
        json.loads(x)
        for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
        if "val_accuracy" in x
    ][-1]
    assert ev["val_accuracy"] > 0.75 and ev["val_margin"] > 0, ev
    r = run_cli("eval", "--model", str(tmp_path / "out" / "final"), "--data", str(val))
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"pairwise accuracy (\d+\.\d)% \((\d+)/24\) \| mean margin (-?\d+\.\d+)", r.stdout)
    assert m and int(m.group(2)) == round(ev["val_accuracy"] * 24), (r.stdout, ev)
