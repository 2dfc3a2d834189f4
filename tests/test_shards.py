"""Token shards: `dist-ft prepare`, what they hold, interrupted prepares, bad shards, remote copies, training on them."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny
from helpers import REPO, free_port, run_cli

from dist_ft import tasks
from dist_ft.config import load_config
from dist_ft.data import dataset, shards
from dist_ft.data.sources import iter_records
from dist_ft.tokenizer import load_tokenizer


def _cfg(tmp: Path, model: Path, data: Path, *lines: str) -> Path:
    cfg = tmp / f"cfg-{hashlib.md5(repr((model, data, lines)).encode()).hexdigest()[:8]}.yaml"
    cfg.write_text(
        f"model: {{path: {model}}}\ndata:\n  train: {data}\n  max_seq_len: 128\n  shard_tokens: 400\n"
        + "".join(f"  {line}\n" for line in lines)
        + "train: {max_steps: 6, micro_batch_size: 2, lr: 3.0e-3}\nengine: {precision: fp32}\ntrack: {wandb: disabled}\n"
    )
    return cfg


def _shard_sums(root: Path) -> list[str]:
    m = json.loads((root / "manifest.json").read_text())
    return [
        s["bin_sha256"] + s["idx_sha256"]
        for split in ("train", "validation")
        if split in m["splits"]
        for s in m["splits"][split]["shards"]
    ]


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory) -> Path:
    return tiny.write_jsonl(tmp_path_factory.mktemp("shard-data") / "train.jsonl", tiny.toy_chat(64))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, gpt2_dir, chat_jsonl) -> Path:
    tmp = tmp_path_factory.mktemp("prepared")
    cfg = _cfg(tmp, gpt2_dir, chat_jsonl, "val_fraction: 0.2")
    r = run_cli("prepare", str(cfg), "--out", str(tmp / "ds"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tokens/s" in r.stdout and f"data.prepared={tmp / 'ds'}" in r.stdout
    (tmp / "ds.yaml").write_text(cfg.read_text())
    return tmp / "ds"


def test_shards_hold_exactly_the_tokenized_records(prepared, gpt2_dir, chat_jsonl):
    manifest = shards.read_manifest(prepared)
    assert manifest.dtype == "uint16" and len(manifest.splits["train"].shards) >= 3  # 400-token shards
    cfg = load_config(prepared.parent / "ds.yaml")
    tok = load_tokenizer(cfg.model)
    prep = dataset.build(cfg.data.model_copy(update={"prepared": str(prepared)}), tok, tasks.get("sft"))
    got = [
        (tuple(e.input_ids), tuple(e.labels))
        for split in (prep.train.items, prep.val.items)
        for i in range(len(split))
        for e in split[i]
    ]
    want = [
        (tuple(e.input_ids), tuple(e.labels))
        for where, rec in iter_records(cfg.data.train)
        for e in tasks.get(cfg.data.task).examples(rec, where, cfg.data, tok)[0]
    ]
    assert sorted(got) == sorted(want)  # every example once, token for token, label for label
    st_train, st_val = manifest.splits["train"].stats, manifest.splits["validation"].stats
    assert st_train.records + st_val.records == 64 and 5 <= st_val.records <= 24  # ~20% held out
    for i in range(len(prep.train.items)):  # packed rows fit, and every row carries loss
        row = prep.train.items[i]
        assert sum(len(e.input_ids) for e in row) <= 128 and any(x != -100 for e in row for x in e.labels)


def test_pretraining_text_puts_loss_on_every_token(tmp_path, gpt2_dir):
    data = tiny.write_jsonl(
        tmp_path / "text.jsonl", [{"text": " ".join(tiny.WORDS[i : i + 40])} for i in range(30)]
    )
    cfg = load_config(_cfg(tmp_path, gpt2_dir, data, "task: pretrain"))
    tok = load_tokenizer(cfg.model)
    prep = dataset.build(cfg.data, tok, tasks.get("pretrain"))
    rows = [prep.train.items[i] for i in range(len(prep.train.items))]
    assert all(e.labels == e.input_ids for row in rows for e in row)
    assert sum(len(e.input_ids) for row in rows for e in row) == prep.train.stats.tokens > 30 * 40


def test_a_parallel_prepare_and_a_streamed_source_write_the_same_shards(tmp_path, gpt2_dir):
    import datasets

    recs = tiny.toy_chat(3000)  # over the in-process threshold: tokenized by a pool of 2
    jsonl = tiny.write_jsonl(tmp_path / "big.jsonl", recs)
    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "big.parquet"))
    outs = {}
    for name, data, extra in (
        ("pool", jsonl, "num_proc: 2"),
        ("one", jsonl, "num_proc: 1"),
        ("stream", tmp_path / "big.parquet", "num_proc: 1"),
    ):
        cfg = _cfg(tmp_path, gpt2_dir, data, extra, "shard_tokens: 20000")
        if name == "stream":
            cfg.write_text(
                cfg.read_text().replace(f"train: {data}", f"train: {{path: {data}, streaming: true}}")
            )
        r = run_cli("prepare", str(cfg), "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("(2 processes)" if name == "pool" else "(1 process)") in r.stdout
        outs[name] = _shard_sums(tmp_path / name)
    assert len(outs["one"]) >= 3 and outs["pool"] == outs["one"] == outs["stream"]


def test_interrupted_prepare_resumes_to_the_same_shards(tmp_path, gpt2_dir, chat_jsonl, prepared):
    cfg = _cfg(tmp_path, gpt2_dir, chat_jsonl, "val_fraction: 0.2")
    out = tmp_path / "ds"
    r = run_cli("prepare", str(cfg), "--out", str(out), env={"DIST_FT_TEST_KILL_AFTER_SHARD": "2"})
    assert r.returncode != 0 and not out.exists()  # killed: no manifest anywhere, only the partial directory
    partial = tmp_path / "ds.partial"
    assert sorted(p.name for p in (partial / "train").glob("*.json")) == [
        "shard-00000.json",
        "shard-00001.json",
    ]
    r = run_cli("prepare", str(cfg), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after 2 complete shard(s)" in r.stdout and not partial.exists()
    assert _shard_sums(out) == _shard_sums(prepared)  # identical to the uninterrupted prepare
    r = run_cli("prepare", str(cfg), "--out", str(out))
    assert r.returncode == 0 and "nothing to do" in r.stdout


def _train(cfg: Path, out: Path, *extra: str):
    return run_cli("train", str(cfg), f"output.dir={out}", *extra)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("flip", r"shard-00001.bin: shard checksum mismatch \(corrupt\)"),
        ("truncate", r"shard-00001.bin: shard is \d+ bytes, the manifest says \d+ \(truncated or replaced\)"),
        ("delete", r"shard-00001.idx.npz: shard listed in .*manifest.json is missing"),
    ],
)
def test_damaged_shards_fail_naming_the_shard(tmp_path, prepared, gpt2_dir, chat_jsonl, damage, message):
    ds = tmp_path / "ds"
    shutil.copytree(prepared, ds)
    target = ds / "train" / ("shard-00001.idx.npz" if damage == "delete" else "shard-00001.bin")
    if damage == "flip":
        raw = bytearray(target.read_bytes())
        raw[10] ^= 1
        target.write_bytes(bytes(raw))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    else:
        target.unlink()
    r = _train(_cfg(tmp_path, gpt2_dir, chat_jsonl, "val_fraction: 0.2", f"prepared: {ds}"), tmp_path / "out")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and re.search(message, errors[0]), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_shards_from_another_tokenizer_or_length_are_refused(
    tmp_path, prepared, llama_dir, gpt2_dir, chat_jsonl
):
    r = _train(
        _cfg(tmp_path, llama_dir, chat_jsonl, "val_fraction: 0.2", f"prepared: {prepared}"), tmp_path / "a"
    )
    assert r.returncode == 2 and "shards were tokenized with another tokenizer" in r.stderr, r.stderr[-2000:]
    r = _train(
        _cfg(tmp_path, gpt2_dir, chat_jsonl, "val_fraction: 0.2", f"prepared: {prepared}"),
        tmp_path / "b",
        "data.max_seq_len=256",
    )
    assert r.returncode == 2 and "data.max_seq_len=128, this run has data.max_seq_len=256" in r.stderr, (
        r.stderr[-2000:]
    )


def test_training_on_prepared_local_or_remote_shards_equals_on_the_fly(
    tmp_path, prepared, gpt2_dir, chat_jsonl
):
    base = _cfg(tmp_path, gpt2_dir, chat_jsonl, "val_fraction: 0.2")
    runs = {
        "fly": (),
        "local": (f"data.prepared={prepared}",),
        "remote": (f"data.prepared=file://{prepared}",),
    }
    for name, extra in runs.items():
        r = _train(base, tmp_path / name, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        if name == "remote":
            assert "file(s) downloaded" in r.stdout
    assert (
        tiny.losses(tmp_path / "fly") == tiny.losses(tmp_path / "local") == tiny.losses(tmp_path / "remote")
    )
    again = _train(base, tmp_path / "fly2")  # the same config again: the cache is used, nothing is tokenized
    assert "tokenizing" not in again.stdout and tiny.losses(tmp_path / "fly2") == tiny.losses(
        tmp_path / "fly"
    )


def test_reader_memory_maps_instead_of_loading(prepared, gpt2_dir):
    manifest = shards.read_manifest(prepared)
    s = shards.ShardSet(prepared, manifest, "train")
    assert all(isinstance(t, np.memmap) for t in s._tokens)
    assert len(s) == sum(m.rows for m in manifest.splits["train"].shards)


def test_a_bad_record_fails_every_rank_instead_of_hanging(tmp_path, gpt2_dir):
    import subprocess
    import sys

    recs = tiny.toy_chat(40)
    recs[17] = {"messages": [{"role": "user", "content": "no answer"}]}
    data = tiny.write_jsonl(tmp_path / "bad.jsonl", recs)
    port = free_port()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            "2",
            "--master_port",
            str(port),
            "launch/train.py",
            str(_cfg(tmp_path, gpt2_dir, data)),
            f"output.dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert (
        r.returncode != 0 and f"error: {data}:18: conversation has no assistant turn" in r.stdout + r.stderr
    )
    # rank 1 was told, did not wait forever
    assert "preparing the shards failed on another rank" in r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


def test_shards_rendered_with_another_chat_template_are_refused(tmp_path, llama_dir, chat_jsonl):
    other = tmp_path / "llama-other-template"
    shutil.copytree(llama_dir, other)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other)  # same vocabulary, only the template differs
    tok.chat_template = tiny.ZEPHYR_TEMPLATE.replace("</s>\n", "</s>\n\n")
    tok.save_pretrained(other)
    ds = tmp_path / "ds"
    r = run_cli("prepare", str(_cfg(tmp_path, llama_dir, chat_jsonl)), "--out", str(ds))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _train(_cfg(tmp_path, other, chat_jsonl, f"prepared: {ds}"), tmp_path / "out")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert (
        r.returncode == 2
        and len(errors) == 1
        and "shards were rendered with another chat template" in errors[0]
    ), r.stderr[-2000:]
