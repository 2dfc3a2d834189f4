"""Checkpoint durability across nodes (#26 item 5): each rank fsyncs the files it wrote, reports them, and rank 0
builds the manifest from the reports after checking them on disk. One 2-rank ZeRO-2 run saves step 2 (os.fsync
spied on in every process through a sitecustomize) and fails to save step 4, where rank 1's file changes after
rank 1 described it."""

import json
import os
from pathlib import Path

import pytest
import tiny
from helpers import run_cmd, train_cmd

SPY = """
import os
_fsync = os.fsync


def _spy(fd):
    n = fd if isinstance(fd, int) else fd.fileno()
    try:
        path = os.readlink(f"/proc/self/fd/{n}")
    except OSError:
        path = "?"
    with open(os.path.join(os.environ["DIST_FT_FSYNC_SPY"], f"rank-{os.environ.get('RANK', '-')}.log"), "a") as f:
        f.write(path + "\\n")
    return _fsync(fd)


if os.environ.get("DIST_FT_FSYNC_SPY"):
    os.fsync = _spy
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, gpt2_dir):
    tmp = tmp_path_factory.mktemp("durable")
    cfg = tiny.run_config(
        tmp,
        gpt2_dir,
        32,
        "max_steps: 4, micro_batch_size: 2, lr: 3.0e-3",
        "precision: fp32, zero_stage: 2",
        "checkpoint: {every_steps: 2}\n",
    )
    spy, out = tmp / "spy", tmp / "out"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(SPY)
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(spy), os.environ.get("PYTHONPATH")])),
        "DIST_FT_FSYNC_SPY": str(spy),
        "DIST_FT_TEST_CORRUPT_IN_SAVE": "4:1",
    }
    r = run_cmd(train_cmd(cfg, out, 2), env)
    synced = {rank: (spy / f"rank-{rank}.log").read_text().splitlines() for rank in (0, 1)}
    return r, out, synced


def _files_in(paths: list[str], folder: Path) -> set[str]:
    return {
        str(Path(p).relative_to(folder))
        for p in paths
        if Path(p).is_relative_to(folder) and Path(p).name and Path(p) != folder
    }


def test_each_rank_fsyncs_the_files_it_wrote(run):
    r, out, synced = run
    final, tmp = out / "checkpoints" / "step-2", out / "checkpoints" / "step-2.tmp"
    manifest = json.loads((final / "manifest.json").read_text())
    by = {
        rank: {f for f in _files_in(paths, tmp) if not (tmp / f).is_dir() and (final / f).is_file()}
        for rank, paths in synced.items()
    }
    # rank 1 fsynced exactly its own files: its optimizer partition and its rank state (rank 0 could not: other node)
    assert by[1] == {"ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank-1.pt"}, by[1]
    # rank 0 no longer fsyncs what rank 1 wrote
    assert not any("rank_1" in f or "rank-1" in f for f in by[0]), by[0]
    assert {
        "rank-0.pt",
        "ds/mp_rank_00_model_states.pt",
        "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "config.yaml",
        "manifest.json",
        "COMPLETE",
    } <= by[0]
    # every file of the published checkpoint was fsynced by the rank that wrote it, and is in the manifest from a report
    assert by[0] | by[1] == set(manifest["files"]) | {"manifest.json", "COMPLETE"}
    assert not by[0] & by[1]
    assert set(manifest["sha256"]) >= {
        "rank-0.pt",
        "rank-1.pt",
        "config.yaml",
    }  # small files: hashed in the reports


def test_a_report_that_disagrees_with_disk_publishes_nothing(run):
    from dist_ft.checkpoint import validate

    r, out, _ = run
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and errors, r.stderr[-3000:]
    want = "checkpoint step-4: rank 1 wrote and fsynced rank-1.pt ("  # rank 0's error (rank 1 quotes it when it stops too)
    assert any(
        want in line and "but rank 0 finds it 100 bytes, expected" in line and "not published" in line
        for line in errors
    ), errors
    assert not (out / "checkpoints" / "step-4").exists()
    partial = out / "checkpoints" / "step-4.tmp"
    assert (
        partial.is_dir() and not (partial / "COMPLETE").exists() and not (partial / "manifest.json").exists()
    )
    assert validate(out / "checkpoints" / "step-2") is not None  # the previous checkpoint stays the latest
    assert not (out / "final").exists()
