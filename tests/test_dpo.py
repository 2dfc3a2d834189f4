"""DPO (data.task dpo): the loss against an fp64 per-example loop, packed == unpacked, the reference log-probs
(computed once, stored, read back, equal to online ones), ln 2 at step 1, 2 ranks == 1 rank at ZeRO-2/3 and
under sequence parallelism (packed, and LoRA unpacked),
SIGKILL + resume bit-identical and refused on another starting model, and LoRA's reference (adapters off)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from helpers import run_cmd, train_cmd
from safetensors.torch import load_file

STEPS = 8


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    """A private tiny GPT-2 with dropout 0.1 (DPO turns it off; a test changes the weights on disk) and pairs."""
    tmp = tmp_path_factory.mktemp("dpo")
    base = tiny.make_gpt2(tmp / "base", dropout=0.1)
    train = tiny.write_jsonl(tmp / "pairs.jsonl", tiny.toy_pairs(96))
    val = tiny.write_jsonl(tmp / "val.jsonl", tiny.toy_pairs(12))
    path = tmp / "dpo.yaml"
    path.write_text(
        f"model: {{path: {base}}}\ndata: {{train: {train}, validation: {val}, max_seq_len: 64, task: dpo}}\n"
        f"train: {{max_steps: {STEPS}, micro_batch_size: 2, lr: 3.0e-3, warmup_steps: 2}}\nengine: {{precision: fp32}}\n"
        "checkpoint: {every_steps: 3}\ntrack: {wandb: disabled}\n"
    )
    return path


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict:
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def one(cfg) -> Path:
    out = cfg.parent / "one"
    r = run_cmd(train_cmd(cfg, out, 1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reference: scoring 216 sequences with the starting model" in r.stdout
    return out


def test_step_one_is_ln2_and_the_run_learns(one):
    recs = _records(one)
    steps, evals = [r for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]
    first = steps[0]
    # policy == reference at step 1 (dropout is off): every log-ratio is 0, the loss is ln 2 to the last bit
    assert abs(first["loss"] - math.log(2)) < 1e-12, first["loss"]
    assert (
        first["reward_chosen"] == first["reward_rejected"] == first["reward_margin"] == 0.0
        and first["reward_accuracy"] == 0.0
    )
    assert all(k in first for k in ("logp_chosen", "logp_rejected")) and first["loss_tokens"] > 0  # (pairs)
    assert len(steps) == STEPS and len(evals) == 1
    ev = evals[0]
    assert ev["val_reward_accuracy"] > 0.5 and ev["val_reward_margin"] > 0 and ev["val_loss"] < math.log(2), (
        ev
    )


def _reference_file() -> Path:
    import os

    found = sorted(
        Path(os.environ["DIST_FT_CACHE"]).glob("shards/*/reference/*.npz"), key=lambda p: p.stat().st_mtime
    )
    assert found
    return found[-1]


def _setup(cfg: Path):
    """The run's tokenizer, data (shards from the cache) and a fresh starting model, built as train does."""
    from dist_ft import tasks
    from dist_ft.config import load_config
    from dist_ft.data import dataset
    from dist_ft.model import load_model
    from dist_ft.tokenizer import load_tokenizer

    c = load_config(cfg)
    task = tasks.for_config(c)
    tok = load_tokenizer(c.model)
    prep = dataset.build(c.data, tok, task, log=lambda *_: None)
    model = load_model(c.model, tok, torch.float32, task.auto_class)
    task.prepare_model(model)
    return c, task, tok, prep, model.eval()


def _loop_logps(model, examples) -> list[float]:
    """Per example, alone: fp64 log_softmax of the logits, gathered at the labels, summed."""
    out = []
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0].double()
            lp = (
                torch.log_softmax(logits[:-1], -1)
                .gather(1, torch.tensor(ex.input_ids[1:])[:, None])
                .squeeze(1)
            )
            keep = torch.tensor([label != -100 for label in ex.labels[1:]])
            out.append(float(lp[keep].sum()))
    return out


def test_stored_reference_equals_online_logps(one, cfg):
    """The stored file holds one value per training and validation sequence, equal to the starting model's log-probs
    computed now, one sequence at a time in fp64."""
    c, task, tok, prep, model = _setup(cfg)
    with np.load(_reference_file(), allow_pickle=False) as z:
        train, val = z["train"], z["validation"]
    items = prep.train.items
    assert len(train) == items.n_examples == 192 and len(val) == 24
    examples = [ex for i in range(len(items)) for ex in items[i]]
    order = [e for i in range(len(items)) for e in items.example_ids(i)]
    want = _loop_logps(model, examples)
    worst = max(abs(train[k] - w) for k, w in zip(order, want, strict=False))
    assert worst < 1e-5, worst
    vex = [ex for row in prep.val.items for ex in row]
    assert max(abs(a - b) for a, b in zip(val, _loop_logps(model, vex), strict=False)) < 1e-5


def _pairs(tok, cfg, n: int):
    from dist_ft.data.preference import to_pair, tokenize_pair

    return [tokenize_pair(tok, to_pair(r, f"r{i}"), f"r{i}") for i, r in enumerate(tiny.toy_pairs(n))]


@pytest.mark.parametrize("kind,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_batched_and_packed_loss_match_an_fp64_loop(cfg, kind, smoothing):
    """A perturbed policy against the unperturbed reference: the loss of one padded batch, of packed rows and of a pair
    alone (batch composition) all equal a per-pair fp64 loop of log_softmax-gather-sum within 1e-6, and the packed
    sequences' log-probs equal the padded ones within 1e-5."""
    from dataclasses import replace

    from dist_ft.data.chat import Example
    from dist_ft.loss import batch_sequence_logps
    from dist_ft.tasks.dpo import collate, loss

    c, task, tok, prep, model = _setup(cfg)
    pairs = _pairs(tok, c.data, 6)
    seqs = [ex for p in pairs for ex in p]
    refs = _loop_logps(model, seqs)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    pol = _loop_logps(model, seqs)
    beta = 0.1

    def want(k: int) -> float:
        lens = (
            [sum(label != -100 for label in ex.labels) for ex in seqs] if kind == "ipo" else [1] * len(seqs)
        )
        pc, pr, rc, rr = (
            pol[2 * k] / lens[2 * k],
            pol[2 * k + 1] / lens[2 * k + 1],
            refs[2 * k] / lens[2 * k],
            refs[2 * k + 1] / lens[2 * k + 1],
        )
        m = (pc - rc) - (pr - rr)
        if kind == "ipo":
            return (m - 1 / (2 * beta)) ** 2
        sig = lambda x: -math.log(1 / (1 + math.exp(-x)))  # noqa: E731
        return sig(beta * m) * (1 - smoothing) + sig(-beta * m) * smoothing

    with_refs = [
        [Example(ex.input_ids, ex.labels, refs[2 * k + j]) for j, ex in enumerate(p)]
        for k, p in enumerate(pairs)
    ]
    run = lambda b: float(loss(model, b, 0, beta=beta, kind=kind, smoothing=smoothing).sum.detach())  # noqa: E731
    total = sum(want(k) for k in range(len(pairs)))
    padded = collate(with_refs, 64, tok.pad_token_id, False)
    packed = collate(
        [with_refs[0] + with_refs[1] + with_refs[2], with_refs[3] + with_refs[4], with_refs[5]],
        64,
        tok.pad_token_id,
        True,
    )
    assert (
        packed.position_ids is not None
        and padded.attention_mask is not None
        and padded.input_ids.shape[0] == 12
    )
    for b in (padded, packed):  # (relative for IPO, whose per-pair loss is ~(1 / (2 beta))^2 = 25)
        assert abs(run(b) - total) < 1e-6 * max(1.0, total), (run(b), total)
    alone = collate([with_refs[2]], 64, tok.pad_token_id, False)
    assert abs(run(alone) - want(2)) < 1e-6 * max(1.0, want(2))
    with torch.no_grad():
        lp_pad, lp_pack = batch_sequence_logps(model, padded), batch_sequence_logps(model, packed)
    assert (lp_pad - lp_pack).abs().max() < 1e-5 and (
        lp_pad - torch.tensor(pol, dtype=torch.float64)
    ).abs().max() < 1e-5
    # a padding batch (a rank with no evaluation rows left) runs the forward and counts nothing
    empty = loss(model, replace(padded.without_loss(), extra=padded.extra), 0, beta=beta, kind=kind)
    assert float(empty.sum.detach()) == 0.0 and all(float(v) == 0.0 for v in empty.metrics.values())


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_equal_one_rank(one, cfg, stage):
    two = cfg.parent / f"two-zero{stage}"
    r = run_cmd(train_cmd(cfg, two, 2, f"engine.zero_stage={stage}", "train.micro_batch_size=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = tiny.losses(one), tiny.losses(two)
    assert max(abs(x - y) for x, y in zip(a, b, strict=False)) < 2e-5, (a, b)
    wa, wb = _weights(one), _weights(two)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 2e-5, worst
    print(
        f"DPO ZeRO-{stage} x2 vs ZeRO-0 x1: max |loss diff| {max(abs(x - y) for x, y in zip(a, b, strict=False)):.1e}, max |weight diff| {worst:.1e}"
    )


def test_sequence_parallel_two_ranks_equal_one_rank(one, cfg):
    """engine.sequence_parallel 2 (packed pairs): both sequences of a pair split alike over the 2 ranks, each
    scoring its shard of every sequence, the pair's log-probs summed over the two - in training and in the
    reference pass (scored anew: its own cache directory)."""
    sp2 = cfg.parent / "sp2"
    extra = ("engine.sequence_parallel=2", f"data.cache_dir={cfg.parent / 'sp-cache'}")
    r = run_cmd(train_cmd(cfg, sp2, 2, *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reference: scoring 216 sequences" in r.stdout
    a, b = tiny.losses(one), tiny.losses(sp2)
    assert len(b) == STEPS and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 2e-5, (a, b)
    va, vb = ([x["val_loss"] for x in _records(o) if "val_loss" in x] for o in (one, sp2))
    assert va and max(abs(x - y) for x, y in zip(va, vb, strict=True)) < 2e-5, (va, vb)
    wa, wb = _weights(one), _weights(sp2)
    d = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert float(d.max()) < 1e-4 and float(d.mean()) < 1e-7, (float(d.max()), float(d.mean()))


def test_sequence_parallel_lora_unpacked_equals_one_rank(cfg):
    """LoRA's reference (adapters off) under sp=2, pairs unpacked (a row per sequence: 2 rows per pair)."""
    args = ("model.peft.method=lora", "model.peft.r=4", "train.max_steps=3", "data.packing=false")
    outs = [cfg.parent / "lora-sp1", cfg.parent / "lora-sp2"]
    for out, ranks, extra in ((outs[0], 1, ()), (outs[1], 2, ("engine.sequence_parallel=2",))):
        r = run_cmd(train_cmd(cfg, out, ranks, *args, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = tiny.losses(outs[0]), tiny.losses(outs[1])
    assert len(b) == 3 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 2e-5, (a, b)
    assert b[-1] != a[0]  # (it learned)


def test_sigkill_resume_is_bit_identical_and_refused_on_another_start(one, cfg):
    out = cfg.parent / "killed"
    r = run_cmd(train_cmd(cfg, out, 1), {"DIST_FT_TEST_KILL_AT_STEP": "5"})
    assert r.returncode != 0 and (out / "checkpoints" / "step-3").is_dir()
    # the reference the checkpoint was trained against is gone
    with tiny.weights_changed_on_disk(cfg.parent / "base"):
        r = run_cmd(train_cmd(cfg, out, 1))  # refused, not silently rescored
        assert (
            r.returncode == 2
            and "differ from those this checkpoint was trained on" in r.stderr
            and "a DPO run's reference" in r.stderr
        )
    r = run_cmd(train_cmd(cfg, out, 1))
    assert (
        r.returncode == 0
        and "resumed from" in r.stdout
        and "reference: log-probs of the starting model read back" in r.stdout
    ), r.stderr[-3000:]
    assert tiny.losses(out) == tiny.losses(one)
    a, b = _weights(one), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_reference_is_the_model_with_adapters_off(cfg):
    """With LoRA no reference pass runs (nothing is scored or stored); B = 0 at the start, so step 1 is ln 2 exactly."""
    out = cfg.parent / "lora"
    r = run_cmd(
        train_cmd(
            cfg, out, 1, "model.peft.method=lora", "model.peft.r=4", "train.max_steps=4", "train.lr=2.0e-2"
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reference:" not in r.stdout
    steps = [x for x in _records(out) if "loss" in x]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-12 and steps[0]["reward_margin"] == 0.0
    assert steps[-1]["reward_margin"] != 0.0


def test_a_second_bos_in_a_sequence_is_refused(llama_dir):
    """A template that starts with BOS and a text that holds one too: two BOS in the sequence (axolotl#1616)."""
    from dist_ft.config import ModelConfig
    from dist_ft.data.preference import to_pair, tokenize_pair
    from dist_ft.errors import UserError
    from dist_ft.tokenizer import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(llama_dir)))
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.chat_template = "{{ bos_token }}" + tiny.ZEPHYR_TEMPLATE
    c, r = tokenize_pair(
        tok, to_pair({"prompt": "hi", "chosen": "yes", "rejected": "no"}, "d.jsonl:1"), "d.jsonl:1"
    )
    assert c.input_ids.count(tok.bos_token_id) == 1 and c.input_ids[:1] == [tok.bos_token_id]
    with pytest.raises(
        UserError, match=r"^d\.jsonl:2: the chosen sequence holds a BOS token '<s>' beyond the template's"
    ):
        tokenize_pair(
            tok, to_pair({"prompt": "hi", "chosen": "<s>yes", "rejected": "no"}, "d.jsonl:2"), "d.jsonl:2"
        )
    tok.chat_template = "{{ bos_token }}" + tok.chat_template  # the template's BOS doubled (axolotl#1616)
    with pytest.raises(UserError, match=r"^d\.jsonl:3: the chosen sequence starts with two BOS tokens '<s>'"):
        tokenize_pair(
            tok, to_pair({"prompt": "hi", "chosen": "yes", "rejected": "no"}, "d.jsonl:3"), "d.jsonl:3"
        )
