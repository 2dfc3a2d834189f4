"""Bad input, table-driven (#14): data, config, model dir, tokenizer, shards, checkpoints, launch environment.

Every case exits 2 with exactly one `error: ` line on stderr that names the file:line / record / key / path
and says what to do, prints no traceback, and leaves a finished run's output directory (which the train cases
point `output.dir` at, with `output.overwrite=true`, so validation runs all the way through) byte for byte and
mtime for mtime as it was. Cases run in-process through `dist_ft.cli.main`: a subprocess each would cost
seconds of imports per case. An autouse fixture undoes what a run leaves in the process (process group,
DeepSpeed's communication state, os.environ, signal handlers).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiny
from helpers import assert_clean_failure, free_port, run_cli, train_args

LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_STEP_ID",
    "SLURM_STEPID",
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_RESTART_COUNT",
)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
SECRET = "s3cr3tValue"
GOOD = [json.dumps(r) for r in tiny.toy_chat(16)]  # lines 1-16 of the data cases; the bad record is line 17
REVIEWS = [
    json.dumps(
        {
            "text": f"review {i} was {'great' if i % 2 == 0 else 'awful'}",
            "label": "positive" if i % 2 == 0 else "negative",
        }
    )
    for i in range(16)
]  # the good lines of the classification cases
PAIRS = [json.dumps(r) for r in tiny.toy_pairs(16)]  # the good lines of the preference (data.task dpo) cases
SPACE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)  # the prompt ends in a space the reply's first word takes
LONG_USER = {
    "messages": [
        {"role": "user", "content": "apple banana cherry " * 40},
        {"role": "assistant", "content": "red"},
    ]
}
LONG_BOTH = {
    "messages": [{"role": "user", "content": "apple " * 20}, {"role": "assistant", "content": "red " * 60}]
}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, gpt2_dir, toy_data) -> Path:
    """A previous run's output: checkpoints/, metrics.jsonl, config.yaml, loss.png, final/."""
    tmp = tmp_path_factory.mktemp("finished")
    r = run_cli(*train_args(tmp, gpt2_dir, toy_data[0], "train.max_steps=2", "track.wandb=disabled"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp / "out"
    assert (out / "final").is_dir() and (out / "checkpoints").is_dir() and (out / "metrics.jsonl").is_file()
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, gpt2_dir, toy_data) -> Path:
    """Token shards of the toy data, written by `dist-ft prepare` with the settings the train cases use."""
    from dist_ft.cli import main

    tmp = tmp_path_factory.mktemp("prepared")
    args = train_args(tmp, gpt2_dir, toy_data[0])
    assert main(["prepare", args[1], "--out", str(tmp / "shards")]) == 0
    return tmp / "shards"


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    """Each case starts without launcher variables and ends with the process as it was: no live process group
    (a later subprocess would otherwise inherit MASTER_PORT and meet a live TCPStore), no DeepSpeed
    communication state pointing at it, os.environ restored exactly, the signal handlers a run installs removed."""
    environ, handlers = dict(os.environ), {s: signal.getsignal(s) for s in SIGNALS}
    for k in LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)
    yield
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    if "deepspeed.comm.comm" in sys.modules:
        sys.modules["deepspeed.comm.comm"].cdb = None
    os.environ.clear()
    os.environ.update(environ)
    for s, h in handlers.items():
        signal.signal(s, h)


def _snapshot(root: Path) -> dict:
    """Every file's sha256 and mtime, and every directory, under `root` (the run lock exists only during a run)."""
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.name == ".dist_ft.lock":
            continue
        snap[rel] = (
            (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) if p.is_file() else "dir"
        )
    return snap


@dataclass
class Ctx:
    """What a case builds its command from."""

    tmp: Path
    model: Path  # the session's tiny GPT-2
    data: Path  # the toy chat set
    run: Path  # the finished run every train case points output.dir at
    prepared: Path
    monkeypatch: pytest.MonkeyPatch
    cleanup: list = field(default_factory=list)
    kept: dict = field(default_factory=dict)  # directories a case must leave as they were: path -> snapshot

    def train(
        self, *overrides: str, data: Path | None = None, model: Path | None = None, env: dict | None = None
    ) -> list[str]:
        """`dist-ft train` of the toy config into the finished run's directory (with `env` set for the case)."""
        for k, v in (env or {}).items():
            self.monkeypatch.setenv(k, v)
        return train_args(
            self.tmp,
            model or self.model,
            data or self.data,
            f"output.dir={self.run}",
            "output.overwrite=true",
            "track.wandb=disabled",
            *overrides,
        )

    def lines(self, *bad, good: list[str] = GOOD, name: str = "d.jsonl") -> Path:
        """A JSONL file: the good lines, then the bad ones (str or raw bytes)."""
        raw = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in [*good, *bad])
        (self.tmp / name).write_bytes(raw)
        return self.tmp / name

    def records(self, *bad, **kw) -> Path:
        return self.lines(*(json.dumps(r) for r in bad), **kw)

    def model_copy(self, edit: Callable[[Path], None]) -> Path:
        d = self.tmp / "model"
        shutil.copytree(self.model, d)
        edit(d)
        return d

    def prepared_copy(self, edit: Callable[[Path], None]) -> Path:
        d = self.tmp / "prepared"
        shutil.copytree(self.prepared, d)
        edit(d)
        return d


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _huge_record(c: Ctx) -> list[str]:
    """Line 3 is one ~300 MB record, written about 1 MiB at a time; the file is removed after the case."""
    path = c.tmp / "huge.jsonl"
    c.cleanup.append(path)
    with path.open("w") as f:
        f.write(GOOD[0] + "\n" + GOOD[1] + "\n" + '{"text": "')
        chunk = "apple banana cherry " * (1 << 16)  # 1.25 MiB
        for _ in range(240):
            f.write(chunk)
        f.write('"}\n')
    return c.train("data.task=pretrain", data=path)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _prepare_into_cwd(c: Ctx) -> list[str]:
    c.monkeypatch.chdir(c.run)
    return ["prepare", c.train()[1], "--out", "."]


def _yaml(c: Ctx, text: str) -> list[str]:
    (c.tmp / "bad.yaml").write_text(text)
    return ["train", str(c.tmp / "bad.yaml")]


def _named_templates(names: tuple[str, ...]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        _edit_json(
            d / "tokenizer_config.json",
            lambda t: t.update(chat_template=[{"name": n, "template": tiny.ZEPHYR_TEMPLATE} for n in names]),
        )

    return edit


def _shard_name(name: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        _edit_json(d / "manifest.json", lambda m: m["splits"]["train"]["shards"][0].update(name=name))

    return edit


def _checkpoint_copy(c: Ctx) -> Path:
    src = max((c.run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    dst = c.tmp / "ckpt" / src.name
    shutil.copytree(src, dst)
    _truncate(dst / "rank-0.pt")
    return dst


def _damaged_run(c: Ctx) -> Path:
    """A run directory whose every checkpoint lost part of a file (as after a copy that left some out)."""
    out = c.tmp / "damaged"
    shutil.copytree(c.run / "checkpoints", out / "checkpoints")
    # (a run directory of ours: a copy without the marker is refused as foreign)
    shutil.copy(c.run / ".dist_ft-run.json", out)
    for f in (out / "checkpoints").glob("step-*/rank-0.pt"):
        _truncate(f)
    return out


# what another tool or the user keeps in a project directory, under the names a run writes
FOREIGN = {
    "wandb/offline-run-20261201_000000-abc/run-abc.wandb": b"theirs",
    "checkpoints/lightning-epoch3/model.ckpt": b"weights",
    "config.yaml": b"lr: 0.1\n",
    "metrics.jsonl": b'{"step": 1}\n',
    "rank-0.log": b"log\n",
    "final.old/w": b"old",
    ".replaced-1/x": b"x",
    "final.tmp/y": b"y",
    "loss.png": b"png",
}


def _foreign(c: Ctx, *extra: str, cwd: bool = False, home: bool = False) -> list[str]:
    """A project directory that holds files a run might have written, but no run marker: `output.overwrite` must not
    touch it (as output.dir, as the current directory, or as a fake $HOME)."""
    d = c.tmp / "project"
    for rel, data in FOREIGN.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    c.kept[d] = _snapshot(d)
    if cwd:
        c.monkeypatch.chdir(d)
    if home:
        c.monkeypatch.setenv("HOME", str(d))
    return c.train(f"output.dir={'.' if cwd else '~/' if home else d}", *extra)


def _run_copy(c: Ctx, edit: Callable[[Path], str]) -> list[str]:
    """A copy of the finished run as output.dir, with something it reads placed inside it by `edit` (returns the override)."""
    d = c.tmp / "ours"
    shutil.copytree(c.run, d)
    override = edit(d)
    c.kept[d] = _snapshot(d)
    return c.train(f"output.dir={d}", override)


def _untouched(c: Ctx, output: str) -> bool:
    return all(_snapshot(d) == before for d, before in c.kept.items())


def _remote_not_written(c: Ctx) -> None:
    from dist_ft.data.shards import remote_copy_dir

    assert not remote_copy_dir(f"file://{c.tmp / 'prepared'}", Path(os.environ["DIST_FT_CACHE"])).exists()


def _no_secret(c: Ctx, output: str) -> None:
    assert SECRET not in output and "pass@" not in output


def _secret_nowhere(c: Ctx, output: str) -> None:
    """No part of the secret on the terminal, nor in any file of the run directory (config.yaml, logs, metrics,
    checkpoints) or of the case's own directory."""
    _no_secret(c, output)
    for root in (c.run, c.tmp):
        for p in root.rglob("*"):
            assert not p.is_file() or SECRET.encode() not in p.read_bytes(), p


# id -> (build the command, pattern of the one error line[, check afterwards])
CASES: dict[str, tuple] = {
    # ------------------------------------------------------------ data
    "data_latin1_byte": (
        lambda c: c.train(
            data=c.lines(
                b'{"messages": [{"role": "user", "content": "caf\xe9?"}, {"role": "assistant", "content": "ok"}]}'
            )
        ),
        r"d\.jsonl:17: not valid UTF-8 \(byte 0xe9 at column \d+\); re-encode the file as UTF-8, e\.g\. iconv -f latin1 -t utf-8",
    ),
    "data_json_latin1_byte": (
        lambda c: c.train(data=_write(c.tmp / "d.json", b'[\n {"text": "ok"},\n {"text": "caf\xe9"}\n]')),
        r"d\.json:3: not valid UTF-8 .*iconv -f latin1 -t utf-8",
    ),
    "data_alpaca_number": (
        lambda c: c.train(data=c.records({"instruction": 5, "input": "", "output": "five"})),
        r"d\.jsonl:17: alpaca 'instruction' must be a string, got JSON number 5; give the text",
    ),
    "data_alpaca_null": (
        lambda c: c.train(data=c.records({"instruction": "Name a color.", "output": None})),
        r"d\.jsonl:17: alpaca 'output' must be a string, got JSON null; give the text",
    ),
    "data_empty_assistant": (
        lambda c: c.train(
            data=c.records(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
            )
        ),
        r"d\.jsonl:17: message 1 \(assistant\) 'content' is empty, so there is nothing to learn; write the answer or remove the record",
    ),
    "data_content_list": (
        lambda c: c.train(
            data=c.records(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                        {"role": "assistant", "content": "ok"},
                    ]
                }
            )
        ),
        r"d\.jsonl:17: message 0 \(user\) 'content' must be a string, got JSON array; flatten structured content to plain text",
    ),
    "data_content_number": (
        lambda c: c.train(
            data=c.records(
                {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": 4}]}
            )
        ),
        r"d\.jsonl:17: message 1 \(assistant\) 'content' must be a string, got JSON number 4; give the text",
    ),
    "data_content_null": (
        lambda c: c.train(
            data=c.records(
                {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "ok"}]}
            )
        ),
        r"d\.jsonl:17: message 0 \(user\) 'content' must be a string, got JSON null; give the text",
    ),
    "data_missing_content": (
        lambda c: c.train(
            data=c.records({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]})
        ),
        r"d\.jsonl:17: message 1 lacks 'content' \(keys: role\); each message needs 'role' and 'content'",
    ),
    "data_message_not_object": (
        lambda c: c.train(data=c.records({"messages": [{"role": "user", "content": "hi"}, "ok"]})),
        r"d\.jsonl:17: message 1 is a JSON string, not an object; write each message as \{\"role\": \.\.\., \"content\": \.\.\.\}",
    ),
    "data_record_array": (
        lambda c: c.train(data=c.lines('[{"role": "user", "content": "hi"}]')),
        r"d\.jsonl:17: expected a JSON object \(a record such as .*\), got a JSON array; put one object per record",
    ),
    "data_record_string": (
        lambda c: c.train(data=c.lines('"just a string"')),
        r"d\.jsonl:17: expected a JSON object .*got a JSON string; put one object per record",
    ),
    "data_assistant_beyond_max_seq_len": (
        lambda c: c.train("data.max_seq_len=64", data=c.records(*[LONG_USER] * 4, good=[])),
        r"d\.jsonl:1: its first trained \(assistant\) token is at position (\d+) >= data\.max_seq_len 64, .*"
        r"no record of .*d\.jsonl gave a training example \(4 records: 0 longer than data\.max_seq_len and dropped, 4 with no "
        r"trained token left after truncation\): raise data\.max_seq_len above \d+, or shorten the turns before the answer",
    ),
    "data_all_overlong_dropped": (
        lambda c: c.train(
            "data.max_seq_len=64", "data.overlong=drop", data=c.records(*[LONG_BOTH] * 4, good=[])
        ),
        r"d\.jsonl:1: example is \d+ tokens > data\.max_seq_len 64 and data\.overlong: drop removed it; .*4 longer than "
        r"data\.max_seq_len and dropped.*: set data\.overlong: truncate \(keeps its first 64 tokens\) or raise data\.max_seq_len to \d+",
    ),
    "data_huge_record": (
        _huge_record,
        r"huge\.jsonl:3: record is longer than 33,554,432 bytes \(32 MiB, the limit per record\); split the "
        r"document into several records, or raise \$DIST_FT_MAX_RECORD_BYTES",
    ),
    "data_empty_file": (
        lambda c: c.train(data=_write(c.tmp / "empty.jsonl", b"")),
        r"empty\.jsonl: no records \(the file is empty\); add data or point the config at another file",
    ),
    "data_malformed_json": (
        lambda c: c.train(data=c.lines('{"messages": [{"role": "user", "content": "hi"}')),
        r"d\.jsonl:17: malformed JSON \(.* at column \d+\); fix or remove that line",
    ),
    "data_json_not_array": (
        lambda c: c.train(data=_write(c.tmp / "d.json", b"42")),
        r"d\.json: expected a JSON array of objects \(records\), got a JSON number; write \[\{\.\.\.\}, \{\.\.\.\}\], or one object per line",
    ),
    "data_parquet_corrupt": (
        lambda c: c.train(data=_write(c.tmp / "d.parquet", b"PAR1 this is not parquet at all")),
        r"d\.parquet: not a readable parquet file \(.*\); re-export it, or convert it to \.jsonl",
    ),
    "data_validation_missing": (
        lambda c: c.train(f"data.validation={c.tmp / 'nope.jsonl'}"),
        r"nope\.jsonl: no such file; check data\.train\.path / data\.validation\.path",
    ),
    "data_format_forced_alpaca": (
        lambda c: c.train("data.format=alpaca"),
        r"train\.jsonl:1: record lacks key 'instruction' required by format 'alpaca' \(keys: messages\); this record is not "
        r"'alpaca' \(data\.format\): set data\.format: auto",
    ),
    "data_pretrain_without_text": (
        lambda c: c.train(
            "data.task=pretrain", data=c.records({"title": "Apples", "body": "Apples are red."})
        ),
        r"d\.jsonl:17: unknown record format \(keys: body, title\); expected .*'text'.*or set data\.format",
    ),
    # ------------------------------------------------------------ config
    "config_betas_one": (
        lambda c: c.train("train.betas=[0.9]"),
        r"config key 'train\.betas': must be two numbers in \[0, 1\), e\.g\. \[0\.9, 0\.999\] \(got \[0\.9\]\)",
    ),
    "config_betas_out_of_range": (
        lambda c: c.train("train.betas=[1.5, 0.999]"),
        r"config key 'train\.betas': must be two numbers in \[0, 1\).*\(got \[1\.5, 0\.999\]\)",
    ),
    "config_betas_string": (
        lambda c: c.train("train.betas=fast"),
        r"config key 'train\.betas': must be two numbers in \[0, 1\).*\(got 'fast'\)",
    ),
    "config_negative_lr": (
        lambda c: c.train("train.lr=-0.001"),
        r"run\.yaml \+ overrides: config key 'train\.lr': Input should be greater than 0 \(got -0\.001\)",
    ),
    "config_unknown_key": (
        lambda c: c.train("data.max_seqlen=64"),
        r"unknown config key 'data\.max_seqlen'; did you mean 'data\.max_seq_len'\?",
    ),
    "config_section_not_mapping": (
        lambda c: c.train("train=5"),
        r"config key 'train' must be a section \(a mapping such as train: \{\.\.\.\}\), got 5",
    ),
    "config_max_seq_len_over_positions": (
        lambda c: c.train("data.max_seq_len=1024"),
        r"data\.max_seq_len 1024 is above the model's n_positions 512 \(model\.path '.*'\), .*set data\.max_seq_len to 512 or less",
    ),
    "config_flash_attn_not_installed": (
        lambda c: c.train("model.attn_implementation=flash_attention_2"),
        r"model\.attn_implementation: flash_attention_2 needs the flash-attn package, which is not installed; "
        r"pip install flash-attn .*or set model\.attn_implementation: sdpa",
    ),
    "config_unknown_task": (
        lambda c: c.train("data.task=sftt"),
        r"config key 'data\.task': unknown task 'sftt' \(did you mean 'sft'\?\); tasks: ",
    ),
    "config_override_without_equals": (
        lambda c: c.train("train.lr"),
        r"override 'train\.lr': expected key=value, e\.g\. train\.lr=3e-5",
    ),
    "config_yaml_syntax": (
        lambda c: _yaml(c, "model: {path: gpt2}\ndata: {train: x.jsonl\ntrain: {lr: 1}\n"),
        r"bad\.yaml:3: invalid YAML: .*; fix the syntax there",
    ),
    "config_file_is_a_list": (
        lambda c: _yaml(c, "- model\n- data\n"),
        r"bad\.yaml: top level must be a mapping of sections",
    ),
    # ------------------------------------------------------------ model directory, tokenizer
    "model_dir_missing": (
        lambda c: c.train(f"model.path={c.tmp / 'no-model'}"),
        r"model\.path '.*no-model': directory does not exist; give a local model directory or a hub id",
    ),
    "model_safetensors_truncated": (
        lambda c: c.train(model=c.model_copy(lambda d: _truncate(d / "model.safetensors"))),
        r"model\.path '.*model': model\.safetensors: damaged or truncated \(.*\); re-download the model, or re-save it",
    ),
    "model_tokenizer_json_garbage": (
        lambda c: c.train(
            model=c.model_copy(lambda d: (d / "tokenizer.json").write_bytes(bytes(range(256)) * 4))
        ),
        r"model\.path '.*model': tokenizer\.json: not a readable tokenizer \(.*\); re-download the model, or re-save it",
    ),
    "model_chat_templates_without_default": (
        lambda c: c.train(model=c.model_copy(_named_templates(("chat", "tool_use")))),
        r"model\.path '.*model': the tokenizer has several named chat templates \(chat, tool_use\) and none named "
        r"'default'.*name one 'default' in tokenizer_config\.json, or set model\.chat_template: chatml",
    ),
    "model_config_json_invalid": (
        lambda c: c.train(
            model=c.model_copy(
                lambda d: (d / "config.json").write_text('{"model_type": "gpt2",\n "n_layer": 2,,\n}')
            )
        ),
        r"model\.path '.*model': config\.json:2: invalid JSON \(.* at column \d+\); re-download the model, or re-save it",
    ),
    "model_no_weights": (
        lambda c: c.train(model=c.model_copy(lambda d: (d / "model.safetensors").unlink())),
        r"model\.path '.*model': no weights file in it \(model\.safetensors, pytorch_model\.bin or sharded ones",
    ),
    # ------------------------------------------------------------ prepare, shards
    "prepare_out_current_dir": (
        _prepare_into_cwd,
        r"prepare --out '\.': that is the current directory \(or holds it\), and the shards would be mixed into it; give a new directory",
    ),
    "prepare_out_foreign_dir": (
        lambda c: ["prepare", c.train()[1], "--out", str(c.run)],
        r"out: exists and is not a prepared dataset \(holds \.dist_ft-run\.json, checkpoints, config\.yaml, final, \.\.\.\); nothing was "
        r"changed: give dist-ft prepare a new or empty directory",
        lambda c, _: not (c.run.parent / "out.lock").exists() and not (c.run.parent / "out.partial").exists(),
    ),
    "shards_file_truncated": (
        lambda c: c.train(
            f"data.prepared={c.prepared_copy(lambda d: _truncate(next((d / 'train').glob('*.bin'))))}"
        ),
        r"prepared/train/shard-00000\.bin: shard is \d+ bytes, the manifest says \d+ \(truncated or replaced\); restore it or re-run dist-ft prepare",
    ),
    "shards_manifest_not_json": (
        lambda c: c.train(
            f"data.prepared={c.prepared_copy(lambda d: (d / 'manifest.json').write_text('{not json'))}"
        ),
        r"prepared/manifest\.json: unreadable manifest \(.*\); re-run dist-ft prepare",
    ),
    "shards_manifest_name_dotdot": (
        lambda c: c.train(f"data.prepared={c.prepared_copy(_shard_name('../../../escape'))}"),
        r"prepared/manifest\.json: shard name '\.\./\.\./\.\./escape' is not of the form shard-NNNNN .*re-run dist-ft prepare",
    ),
    "shards_remote_manifest_absolute_name": (
        lambda c: c.train(f"data.prepared=file://{c.prepared_copy(_shard_name('/tmp/escape'))}"),
        r"data\.prepared 'file://.*prepared': manifest\.json: shard name '/tmp/escape' is not of the form shard-NNNNN",
        lambda c, _: _remote_not_written(c),
    ),
    "shards_prepared_dir_missing": (
        lambda c: c.train(f"data.prepared={c.tmp / 'no-shards'}"),
        r"data\.prepared '.*no-shards': no such directory; write it first with dist-ft prepare CONFIG --out",
    ),
    "shards_url_with_credentials": (
        lambda c: c.train(f"data.prepared=s3://AKIAEXAMPLE:{SECRET}@bucket/shards"),
        r"config key 'data\.prepared': a URL with credentials in it is refused .*put them in the environment.*"
        r"DIST_FT_STORAGE_OPTIONS.*\(got 's3://\*\*\*@bucket/shards'\)",
        _no_secret,
    ),
    "data_url_with_credentials": (
        lambda c: c.train(f"data.train=https://user:{SECRET}pass@example.org/train.jsonl"),
        r"config key 'data\.train\.path': a URL with credentials in it is refused .*\(got 'https://\*\*\*@example\.org/train\.jsonl'\)",
        _no_secret,
    ),
    # ------------------------------------------------------------ secrets (#25): never on the terminal, in logs or config.yaml
    "secret_override_value_not_section": (
        lambda c: c.train(f"data.train.path.x=s3://AKIAEXAMPLE:{SECRET}@bucket/x"),
        r"override 'data\.train\.path\.x=s3://\*\*\*@bucket/x': 'data\.train\.path' is a value, not a section",
        _secret_nowhere,
    ),
    "secret_override_without_equals": (
        lambda c: c.train(f"s3://AKIAEXAMPLE:abc/{SECRET}@bucket/x"),
        r"override 's3://\*\*\*@bucket/x': expected key=value",
        _secret_nowhere,
    ),
    "secret_override_wrong_type": (
        lambda c: c.train(f"train.lr=s3://AKIAEXAMPLE:abc/{SECRET}@bucket/x"),
        r"config key 'train\.lr': Input should be a valid number.*\(got 's3://\*\*\*@bucket/x'\)",
        _secret_nowhere,
    ),
    "secret_url_slash_in_secret": (
        lambda c: c.train(f"data.train=s3://AKIAEXAMPLE:abc/{SECRET}+x@bucket/train.jsonl"),
        r"config key 'data\.train\.path': a URL with credentials in it is refused .*\(got 's3://\*\*\*@bucket/train\.jsonl'\)",
        _secret_nowhere,
    ),
    "secret_url_sas_sig": (
        lambda c: c.train(
            f"data.train=https://acct.blob.core.windows.net/c/train.jsonl?sv=2022-11-02&sp=r&sig={SECRET}%3D"
        ),
        r"config key 'data\.train\.path': a URL with a token \(its 'sig=' query parameter\) in it is refused .*"
        r"\(got 'https://acct\.blob\.core\.windows\.net/c/train\.jsonl\?sv=2022-11-02&sp=r&sig=\*\*\*'\)",
        _secret_nowhere,
    ),
    "secret_url_token_query": (
        lambda c: c.train(f"data.prepared=https://example.org/shards?token={SECRET}"),
        r"config key 'data\.prepared': a URL with a token \(its 'token=' query parameter\) in it is refused .*DIST_FT_STORAGE_OPTIONS",
        _secret_nowhere,
    ),
    "secret_config_path": (
        lambda c: ["train", f"s3://AKIAEXAMPLE:abc/{SECRET}@bucket/run.yaml"],
        r"s3:/\*\*\*@bucket/run\.yaml: config file not found",
        _secret_nowhere,
    ),
    "shards_storage_options_not_json": (
        lambda c: c.train(
            f"data.prepared=file://{c.prepared}", env={"DIST_FT_STORAGE_OPTIONS": f"key={SECRET}"}
        ),
        r"DIST_FT_STORAGE_OPTIONS: not valid JSON \(.*\); set it to a JSON object of fsspec storage options",
        _no_secret,
    ),
    "shards_remote_unreachable": (
        lambda c: c.train(
            f"data.prepared=file://{c.tmp / 'gone'}",
            env={"DIST_FT_STORAGE_OPTIONS": json.dumps({"token": SECRET})},
        ),
        r"data\.prepared 'file://.*gone': could not copy the prepared dataset \(FileNotFoundError: .*\); check the URL, and the "
        r"credentials for it in the environment \(or DIST_FT_STORAGE_OPTIONS\)",
        _no_secret,
    ),
    # ------------------------------------------------------------ checkpoints
    "checkpoint_resume_missing": (
        lambda c: c.train("checkpoint.resume=/nonexistent/step-9", "checkpoint.trust_foreign=true"),
        r"checkpoint\.resume '/nonexistent/step-9': no complete checkpoint there",
    ),
    "checkpoint_resume_not_a_checkpoint": (
        lambda c: c.train(f"checkpoint.resume={c.model}", "checkpoint.trust_foreign=true"),
        r"checkpoint\.resume '.*gpt2\d*': no complete checkpoint there",
    ),
    "checkpoint_resume_truncated_file": (
        lambda c: c.train(f"checkpoint.resume={_checkpoint_copy(c)}", "checkpoint.trust_foreign=true"),
        r"checkpoint\.resume '.*ckpt/step-\d+': no complete checkpoint there \(rank-0\.pt: \d+ bytes, expected \d+",
    ),
    "checkpoint_none_complete": (
        lambda c: c.train(f"output.dir={_damaged_run(c)}", "output.overwrite=false"),
        r"output\.dir '.*damaged' holds checkpoints but none is complete \(step-\d+: rank-0\.pt: \d+ bytes, expected \d+ "
        r"\(truncated or replaced\)\); starting over there would mix two runs: set output\.overwrite=true",
    ),
    # ------------------------------------------------------------ the run directory: dist_ft deletes only what it wrote
    "output_dir_foreign_files": (
        lambda c: _foreign(c),
        r"output\.dir '.*project' is not empty and was not written by dist_ft \(no "
        r"\.dist_ft-run\.json in it; it holds \.replaced-1, checkpoints, config\.yaml, final\.old and 5 more\); .*choose "
        r"another output\.dir",
        _untouched,
    ),
    "output_dir_cwd_foreign": (
        lambda c: _foreign(c, cwd=True),
        r"output\.dir '\.' is the current directory, which holds files that are "
        r"not a dist_ft run's \(.*\); give the run a directory of its own, e\.g\. output\.dir=runs/my-run",
        _untouched,
    ),
    "output_dir_home": (
        lambda c: _foreign(c, home=True),
        r"output\.dir '~/' is your home directory; .*output\.dir=runs/my-run",
        _untouched,
    ),
    "output_dir_root": (
        lambda c: c.train("output.dir=/"),
        r"output\.dir '/' is the root directory; a run writes checkpoints",
    ),
    "output_dir_is_a_file": (
        lambda c: c.train(f"output.dir={c.data}"),
        r"output\.dir '.*' is a file, not a directory",
    ),
    "output_dir_holds_model": (
        lambda c: _run_copy(c, lambda d: f"model.path={d / 'final'}"),
        r"output\.dir '.*ours' contains model\.path '.*ours/final', which this run reads",
        _untouched,
    ),
    "output_dir_holds_data": (
        lambda c: _run_copy(c, lambda d: f"data.train={shutil.copy(c.data, d / 'train.jsonl')}"),
        r"output\.dir '.*ours' contains data\.train\.path '.*ours/train\.jsonl', which this run reads",
        _untouched,
    ),
    "output_dir_holds_prepared": (
        lambda c: _run_copy(c, lambda d: f"data.prepared={shutil.copytree(c.prepared, d / 'shards')}"),
        r"output\.dir '.*ours' contains data\.prepared '.*ours/shards', which this run reads",
        _untouched,
    ),
    "output_dir_holds_cache": (
        lambda c: _run_copy(c, lambda d: f"data.cache_dir={d / 'wandb'}"),
        r"output\.dir '.*ours' contains data\.cache_dir '.*ours/wandb', which this run reads",
        _untouched,
    ),
    # ------------------------------------------------------------ preference pairs (data.task dpo)
    "dpo_empty_completion": (
        lambda c: c.train(
            "data.task=dpo", data=c.records({"prompt": "hi", "chosen": " ", "rejected": "no"}, good=PAIRS)
        ),
        r"d\.jsonl:17: the chosen completion is empty, so there is nothing to compare; write it or remove the record",
    ),
    "dpo_missing_rejected": (
        lambda c: c.train("data.task=dpo", data=c.records({"prompt": "hi", "chosen": "yes"}, good=PAIRS)),
        r"d\.jsonl:17: preference record lacks 'rejected' \(keys: chosen, prompt\); give \{prompt, chosen, rejected\}",
    ),
    "dpo_conversations_differ": (
        lambda c: c.train(
            "data.task=dpo",
            data=c.records(
                {
                    "chosen": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "x"}],
                    "rejected": [{"role": "user", "content": "b?"}, {"role": "assistant", "content": "y"}],
                },
                good=PAIRS,
            ),
        ),
        r"d\.jsonl:17: 'chosen' and 'rejected' differ at message 0, before their last message; they must share the prompt turns",
    ),
    "dpo_prompt_tokens_differ": (
        lambda c: c.train(
            "data.task=dpo",
            "model.chat_template=auto",
            data=c.records({"prompt": "hi", "chosen": "apple", "rejected": "no"}, good=[]),
            model=c.model_copy(
                lambda d: _edit_json(
                    d / "tokenizer_config.json", lambda t: t.update(chat_template=SPACE_TEMPLATE)
                )
            ),
        ),
        r"d\.jsonl:1: the prompt's tokens differ between the prompt alone and prompt \+ chosen \(first at token \d+: the tokenizer merges",
    ),
    "dpo_two_end_of_turn": (
        lambda c: c.train(
            "data.task=dpo",
            data=c.records({"prompt": "hi", "chosen": "yes<|im_end|>", "rejected": "no"}, good=PAIRS),
        ),
        r"d\.jsonl:17: the chosen completion holds 2 end-of-turn token\(s\) '<\|im_end\|>' \(exactly one, at its end, is expected\)",
    ),
    "dpo_completion_truncated_away": (
        lambda c: c.train(
            "data.task=dpo",
            data=c.records(
                {"prompt": "apple banana cherry " * 60, "chosen": "red", "rejected": "blue"}, good=PAIRS
            ),
        ),
        r"d\.jsonl:17: the chosen completion starts after data\.max_seq_len 128 tokens, so truncation removes all of it; raise",
    ),
    "dpo_identical_pair": (
        lambda c: c.train(
            "data.task=dpo",
            data=c.records(
                {"prompt": "hi", "chosen": "The apple is red.", "rejected": "The apple is red."}, good=PAIRS
            ),
        ),
        r"d\.jsonl:17: 'chosen' and 'rejected' render to the same \d+ tokens, so the pair prefers nothing; make the rejected reply differ",
    ),
    "dpo_identical_after_truncation": (
        lambda c: c.train(
            "data.task=dpo",
            data=c.records(
                {
                    "prompt": "apple banana cherry " * 20,
                    "chosen": "red " * 80 + "yes",
                    "rejected": "red " * 80 + "no",
                },
                good=PAIRS,
            ),
        ),
        r"d\.jsonl:17: 'chosen' and 'rejected' differ only after data\.max_seq_len 128 tokens, so truncation leaves the same sequence twice",
    ),
    "reward_identical_pair": (
        lambda c: c.train(
            "data.task=reward",
            "data.packing=false",
            data=c.records(  # other shapes, the same rendering
                {
                    "conversations": [{"from": "human", "value": "What color is the apple?"}],
                    "chosen": {"from": "gpt", "value": "The apple is red."},
                    "rejected": "The apple is red.",
                },
                good=PAIRS,
            ),
        ),
        r"d\.jsonl:17: 'chosen' and 'rejected' render to the same \d+ tokens, so the pair prefers nothing",
    ),
    # ------------------------------------------------------------ sequence heads (data.task classify / reward)
    "classify_label_missing": (
        lambda c: c.train(
            "data.task=classify", "data.packing=false", data=c.records({"text": "so so"}, good=REVIEWS)
        ),
        r"d\.jsonl:17: record lacks 'label' \(keys: text\); give every record its class",
    ),
    "classify_single_class": (
        lambda c: c.train("data.task=classify", "data.packing=false", data=c.records(good=REVIEWS[::2])),
        r"d\.jsonl: every training record has label 'positive'; a classifier needs records of at least two classes",
    ),
    "classify_label_unseen_at_eval": (
        lambda c: c.train(
            "data.task=classify",
            "data.packing=false",
            f"data.validation={c.records({'text': 'meh', 'label': 'neutral'}, good=REVIEWS, name='v.jsonl')}",
            data=c.records(good=REVIEWS),
        ),
        r"v\.jsonl:17: label 'neutral' never occurs in the training data \(labels: negative, positive\); fix the label",
    ),
    "classify_packing_on": (
        lambda c: c.train("data.task=classify", data=c.records(good=REVIEWS)),
        r"data\.task classify scores one sequence per row .*so packing cannot be used; set data\.packing: false",
    ),
    # ------------------------------------------------------------ launch environment (refused before the rendezvous)
    "launch_sbatch_without_srun": (
        lambda c: c.train(
            "engine.collective_timeout_minutes=0.2",
            env={"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_ID": "4242", "SLURM_LOCALID": "0"},
        ),
        r"SLURM_NTASKS=8 but this process was not started by srun .*rank 0 would wait forever for 7 ranks .*launch with srun",
    ),
    "launch_rank_out_of_range": (
        lambda c: c.train("engine.collective_timeout_minutes=0.2", env={"WORLD_SIZE": "2", "RANK": "5"}),
        r"RANK=5 with WORLD_SIZE=2: the rank must be below the world size; fix the launcher's environment",
    ),
    "launch_rank_not_a_number": (
        lambda c: c.train("engine.collective_timeout_minutes=0.2", env={"WORLD_SIZE": "2", "RANK": "zero"}),
        r"RANK='zero' is not a non-negative integer; fix the launcher's environment",
    ),
}


def test_there_are_enough_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(
    case, tmp_path, monkeypatch, capfd, gpt2_dir, toy_data, finished_run, prepared
):
    from dist_ft.cli import main

    build, pattern, *after = CASES[case]
    c = Ctx(tmp_path, gpt2_dir, toy_data[0], finished_run, prepared, monkeypatch)
    before = _snapshot(finished_run)
    try:
        argv = build(c)
        t0 = time.monotonic()
        rc = main(argv)
        took = time.monotonic() - t0
    finally:
        for p in c.cleanup:
            p.unlink(missing_ok=True)
    out, err = capfd.readouterr()
    assert_clean_failure(SimpleNamespace(returncode=rc, stderr=err), pattern, None)
    assert took < 60, f"{case}: took {took:.0f} s to fail"
    assert _snapshot(finished_run) == before, f"{case}: the earlier run's output changed"
    for check in after:
        assert check(c, out + err) is not False, case


def test_wandb_key_without_network_logs_offline(tmp_path, monkeypatch, gpt2_dir, toy_data):
    """WANDB_API_KEY set and the W&B host unreachable: the run does not hang or fail; it warns (without the key)
    and logs offline files to sync later."""
    port = free_port()  # a port nothing listens on: the connection is refused, as with no network
    key = "0123456789abcdef0123456789abcdef01234567"
    # (the test session's offline default): the key alone decides, online
    monkeypatch.delenv("WANDB_MODE", raising=False)
    r = run_cli(
        *train_args(tmp_path, gpt2_dir, toy_data[0], "train.max_steps=1", "track.wandb=auto"),
        timeout=300,
        env={"WANDB_API_KEY": key, "WANDB_BASE_URL": f"http://127.0.0.1:{port}"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: W&B")]
    assert len(warnings) == 1 and "logging offline" in warnings[0] and "wandb sync" in warnings[0], r.stderr[
        -3000:
    ]
    assert key not in r.stdout + r.stderr
    assert len(list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_wandb_probe_is_bounded(monkeypatch):
    """A network that swallows packets (a name lookup or connect that never answers) costs the probe's 3 s, never more."""
    import threading

    from dist_ft.track import wandb_unreachable

    gate = threading.Event()

    def never_answers(*args, **kw):
        gate.wait(30)
        raise OSError("released by the test")

    monkeypatch.setattr(socket, "create_connection", never_answers)
    t0 = time.monotonic()
    try:
        why = wandb_unreachable({"WANDB_BASE_URL": "https://api.wandb.ai"}, timeout_s=1.0)
    finally:
        gate.set()
    assert time.monotonic() - t0 < 2.5 and why == "api.wandb.ai:443: no answer within 1 s"


def test_named_chat_templates_use_the_default(tmp_path, gpt2_dir, capfd):
    """Several named templates with one named `default`: it renders the conversations (as transformers picks it), all
    stay in the tokenizer, and a note says so."""
    from dist_ft.config import ModelConfig
    from dist_ft.data.chat import template_text
    from dist_ft.data.shards import tokenizer_identity
    from dist_ft.tokenizer import load_tokenizer

    d = tmp_path / "model"
    shutil.copytree(gpt2_dir, d)
    _named_templates(("default", "tool_use"))(d)
    tok = load_tokenizer(ModelConfig(path=str(d)))
    assert sorted(tok.chat_template) == ["default", "tool_use"] and template_text(tok) == tiny.ZEPHYR_TEMPLATE
    assert tokenizer_identity(tok)["template_sha256"]
    assert (
        "training with the chat template named 'default'; the others (tool_use) are kept"
        in capfd.readouterr().err
    )


def test_the_credentials_never_reach_the_saved_config(tmp_path):
    """The refusal names the key and the fix, and no part of the secret, in every place an error surfaces."""
    from dist_ft.config import load_config
    from dist_ft.errors import UserError

    (tmp_path / "c.yaml").write_text(f"data: {{prepared: 's3://AKIAEXAMPLE:{SECRET}@bucket/x'}}\n")
    with pytest.raises(UserError) as e:
        load_config(tmp_path / "c.yaml")
    assert (
        SECRET not in str(e.value) and "AKIAEXAMPLE" not in str(e.value) and "data.prepared" in str(e.value)
    )
    assert re.search(r"s3://\*\*\*@bucket/x", str(e.value))


def test_storage_options_come_from_the_environment(tmp_path, monkeypatch, prepared):
    """DIST_FT_STORAGE_OPTIONS reaches fsspec as storage options; the manifest is checked before anything is written."""
    import fsspec

    from dist_ft.data.shards import fetch

    seen = []
    url_to_fs = fsspec.core.url_to_fs
    monkeypatch.setattr(
        fsspec.core, "url_to_fs", lambda url, **kw: (seen.append(kw), url_to_fs(url, **kw))[1]
    )
    monkeypatch.setenv("DIST_FT_STORAGE_OPTIONS", json.dumps({"auto_mkdir": True}))
    local = fetch(f"file://{prepared}", tmp_path / "copy", log=lambda *_: None)
    assert seen == [{"auto_mkdir": True}]
    assert sorted(p.name for p in (local / "train").iterdir()) == sorted(
        p.name for p in (prepared / "train").glob("*.*") if not p.name.endswith(".json")
    )


def test_side_logs_are_scrubbed(tmp_path):
    """What a run logs to rank-R.log goes through the scrubber."""
    from dist_ft.track import Tracker

    t = Tracker(tmp_path, 1, total_steps=1, log_every=1, all_ranks=True)
    t.info(f"fetching s3://AKIAEXAMPLE:abc/{SECRET}@bucket/x?sig={SECRET}")
    t.close()
    log = (tmp_path / "rank-1.log").read_text()
    assert SECRET not in log and "s3://***@bucket/x" in log, log
