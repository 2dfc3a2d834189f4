"""Weighted mixtures of training sources (data.train as a list, dist_ft/data/mixture.py).

Unit: the per-source fractions of a 0.5/0.3/0.2 mixture (within 1 sample of the weights at every block
boundary, so within 1/N of them over N samples that end one), the same global stream on 1, 2 and 3 readers, a
small source upsampled epoch after epoch with fresh shuffles, and one-line refusals. On 2 CPU ranks: a chat +
raw text (task pretrain: loss on every token) + chat mixture trains, logs tokens per source and a validation
loss per source, resumes bit-identically after SIGKILL, and a `dist-ft prepare`d mixture equals the one built
on the fly, shard file for shard file and step for step."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tiny
from helpers import assert_identical_runs, metric_records, run_cli, run_cmd, train_cmd

from dist_ft.config import Config
from dist_ft.data.mixture import MixtureOrder, cumulative_counts
from dist_ft.data.stream import GlobalOrder, SampleStream

W = [0.5, 0.3, 0.2]


def _order(rows=(40, 25, 7), weights=W, seed=3) -> MixtureOrder:
    orders = [GlobalOrder([n], seed + k, window=16) for k, n in enumerate(rows)]
    return MixtureOrder(orders, weights, seed, 16)


@pytest.mark.unit
def test_counts_add_up_never_step_back_and_stay_within_one_sample():
    w = np.array([0.5, 0.3, 0.2])
    prev = np.zeros(3, dtype=np.int64)
    for n in range(0, 5000, 7):
        c = cumulative_counts(w, n)
        assert c.sum() == n and (c >= prev).all() and (np.abs(c - w * n) < 1).all()
        prev = c


@pytest.mark.unit
def test_a_mixture_reads_its_sources_by_weight():
    order = _order()
    n = 10 * order.block  # the end of a block: every source within one sample of its share
    got = Counter(order.source(g)[0] for g in range(n))
    for k, w in enumerate(W):
        assert abs(got[k] / n - w) <= 1 / n, (k, got[k] / n)
    # and at any position, never more than one block off (the sources' places inside a block are shuffled)
    assert order.block == 16
    seen = Counter()
    for g in range(n):
        seen[order.source(g)[0]] += 1
        assert all(abs(seen[k] - w * (g + 1)) <= order.block for k, w in enumerate(W))
    # each source reads its own positions 0, 1, 2, ... in turn
    seen: dict[int, list[int]] = {}
    for g in range(2000):
        k, i = order.source(g)
        seen.setdefault(k, []).append(i)
    assert all(v == list(range(len(v))) for v in seen.values())


@pytest.mark.unit
def test_a_small_source_is_upsampled_with_a_fresh_shuffle_each_epoch():
    order = _order()
    reads = [order.row(g) for g in range(3000) if order.source(g)[0] == 2]  # 7 rows, weight 0.2
    epochs = [reads[i : i + 7] for i in range(0, len(reads) - 6, 7)]
    assert len(epochs) > 50
    first = int(order.offsets[2])
    assert all(sorted(e) == list(range(first, first + 7)) for e in epochs)  # every row once per epoch
    assert len({tuple(e) for e in epochs}) > 10  # in another order each time


@pytest.mark.unit
@pytest.mark.parametrize("readers", [2, 3])
def test_the_global_stream_is_the_same_on_any_number_of_readers(readers):
    one = SampleStream(_order(), 2, 0, 1)
    want = [i for _ in range(30) for i in one.next_indices()]
    streams = [SampleStream(_order(), 2, r, readers) for r in range(readers)]
    got = []
    while len(got) < len(want):
        for s in streams:
            got += s.next_indices()
    assert got[: len(want)] == want
    # resumed on `readers` from a state saved by 1 reader: reader 0 goes on where the 1 reader would
    cont, again = SampleStream(_order(), 2, 0, 1), SampleStream(_order(), 2, 0, readers)
    cont.load_state_dict(one.state_dict())
    again.load_state_dict(one.state_dict())
    assert again.next_indices() == cont.next_indices()


@pytest.mark.unit
@pytest.mark.parametrize(
    "data, why",
    [
        (
            {"train": [{"path": "a.jsonl", "weight": 1}, {"path": "a.jsonl", "weight": 2}]},
            "two sources are named 'a'",
        ),
        ({"train": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}]}, "source 'b' has no weight"),
        ({"train": [{"path": "a.jsonl", "weight": 1}], "task": "dpo"}, "sft or pretrain, not dpo"),
        ({"train": {"path": "a.jsonl", "weight": 1}}, "belong to the sources of a list"),
        ({"train": [{"path": "a.jsonl", "weight": 0}]}, "greater than 0"),
        ({"train": []}, "an empty list"),
    ],
)
def test_bad_mixtures_are_refused_in_one_line(data, why):
    with pytest.raises(ValueError, match=why):
        Config.model_validate({"model": {"path": "m"}, "data": data})


# ---------------------------------------------------------------- training on 2 CPU ranks


@pytest.fixture(scope="module")
def mix_cfg(tmp_path_factory, gpt2_dir) -> Path:
    """chat 0.5 (48 conversations), raw text 0.3 (task pretrain), and 6 other conversations 0.2 (upsampled);
    two validation sources scored on their own."""
    tmp = tmp_path_factory.mktemp("mixture")
    chat = tiny.write_jsonl(tmp / "chat.jsonl", tiny.toy_chat(48))
    text = tiny.write_jsonl(tmp / "text.jsonl", [{"text": line} for line in tiny.corpus()[:60]])
    other = [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]}
        for w in ("hello", "yes", "no", "thanks", "good", "please")
    ]
    small = tiny.write_jsonl(tmp / "say.jsonl", other)
    val_chat = tiny.write_jsonl(tmp / "val-chat.jsonl", tiny.toy_chat(8))
    val_text = tiny.write_jsonl(tmp / "val-text.jsonl", [{"text": line} for line in tiny.corpus()[100:108]])
    cfg = tmp / "mix.yaml"
    cfg.write_text(
        f"model: {{path: {gpt2_dir}}}\n"
        "data:\n"
        "  train:\n"
        f"    - {{path: {chat}, weight: 0.5}}\n"
        f"    - {{path: {text}, weight: 0.3, task: pretrain}}\n"
        f"    - {{path: {small}, weight: 0.2}}\n"
        "  validation:\n"
        f"    - {{path: {val_chat}, name: chat_val}}\n"
        f"    - {{path: {val_text}, name: text_val, task: pretrain}}\n"
        f"  max_seq_len: 64\n  cache_dir: {tmp / 'cache'}\n"
        "train: {max_steps: 6, micro_batch_size: 2, grad_accum: 2, lr: 3.0e-3, warmup_steps: 1, eval_every: 3}\n"
        "engine: {precision: fp32}\ncheckpoint: {every_steps: 2}\ntrack: {wandb: disabled, sample_prompts: []}\n"
    )
    return cfg


def test_a_mixture_trains_logs_per_source_resumes_exactly_and_prepares_alike(mix_cfg):
    tmp = mix_cfg.parent
    killed, prepared = tmp / "killed", tmp / "from-prepared"
    r = run_cmd(train_cmd(mix_cfg, killed, 2), {"DIST_FT_TEST_KILL_AT_STEP": "5"})
    assert r.returncode != 0 and (killed / "checkpoints" / "step-4").is_dir(), r.stderr[-3000:]
    r = run_cmd(train_cmd(mix_cfg, killed, 2))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    steps = [x for x in metric_records(killed) if "loss" in x and "tokens" in x]
    assert len(steps) >= 6
    for x in steps:  # every token of the step comes from one of the sources
        assert x["tokens_chat"] + x["tokens_text"] + x["tokens_say"] == x["tokens"] > 0
    assert sum(x["tokens_say"] for x in steps) > 0 and sum(x["tokens_text"] for x in steps) > 0
    evals = [x for x in metric_records(killed) if "val_loss" in x]
    assert evals and all({"val_loss_chat_val", "val_loss_text_val"} <= set(x) for x in evals)
    assert all(x["val_loss_chat_val"] != x["val_loss_text_val"] for x in evals)

    # prepared once (each source in its own directory, mixture.json beside them), then trained on
    out = tmp / "prepared"
    r = run_cli("prepare", str(mix_cfg), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads((out / "mixture.json").read_text())["parts"]
    assert [(p["role"], p["name"], p["weight"], p["task"]) for p in plan] == [
        ("train", "chat", 0.5, "sft"),
        ("train", "text", 0.3, "pretrain"),
        ("train", "say", 0.2, "sft"),
        ("validation", "chat_val", None, "sft"),
        ("validation", "text_val", None, "pretrain"),
    ]
    assert [p["counts"]["train"]["records"] for p in plan] == [48, 60, 6, 8, 8]  # each source's own counts
    cache = [c.read_bytes() for c in (tmp / "cache").rglob("shard-*.bin")]
    for p in plan:  # byte for byte the shards train built on the fly (found by content in the cache)
        for f in (out / f"{p['role']}-{p['name']}" / "train").glob("shard-*.bin"):
            assert f.read_bytes() in cache, f
    r = run_cmd(train_cmd(mix_cfg, prepared, 2, f"data.prepared={out}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_identical_runs(killed, prepared)
