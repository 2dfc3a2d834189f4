"""The GPU path's rank logic, proven on CPU ranks: one device per rank from each launcher's layout, ranks
that follow rank 0's resume decision, and waits for one rank's work that no collective timeout cuts short.
(The GPU itself is exercised by tests/gpu/, which skips without CUDA.)"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import tiny
from helpers import REPO, free_port, train_cmd

from dist_ft.dist import DistEnv, device_index, env_from, plan_devices

SLURM = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "77"}


@pytest.mark.parametrize(
    "name,environ,visible,index",
    [
        # srun, 8 tasks per node, each task sees the node's 8 GPUs (--gpus-per-node=8): local id -> that GPU
        ("srun 8 tasks x 8 GPUs", {**SLURM, "SLURM_LOCALID": "5"}, 8, 5),
        # srun --gpus-per-task=1: each task sees exactly one GPU (CUDA_VISIBLE_DEVICES set per task): always 0
        ("srun --gpus-per-task=1", {**SLURM, "SLURM_LOCALID": "5"}, 1, 0),
        # srun --gpus-per-task=2: each task sees its own pair; local id 3 -> the first of its pair... modulo 2
        ("srun --gpus-per-task=2", {**SLURM, "SLURM_LOCALID": "3"}, 2, 1),
        (
            "deepspeed --num_gpus 8",
            {
                "RANK": "15",
                "WORLD_SIZE": "16",
                "LOCAL_RANK": "7",
                "MASTER_ADDR": "n1",
                "MASTER_PORT": "29500",
            },
            8,
            7,
        ),
        (
            "torchrun --nproc_per_node 4",
            {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"},
            4,
            2,
        ),
        ("accelerate launch (torchrun env)", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 2, 1),
        # torchrun inside an srun allocation: the launcher's own RANK/LOCAL_RANK win over SLURM's
        (
            "torchrun under srun",
            {**SLURM, "SLURM_LOCALID": "0", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"},
            4,
            3,
        ),
        ("CPU, 2 ranks", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 0, None),
        ("CPU, single process", {}, 0, None),
    ],
)
def test_one_device_per_rank_for_each_launcher(name, environ, visible, index):
    env = env_from(environ)
    assert device_index(env.local_rank, visible) == index, name
    plan = plan_devices(env, visible)
    assert plan.index == index
    assert plan.backend == ("gloo" if index is None else "nccl")
    # DeepSpeed (engine and zero.Init) builds "cuda:<LOCAL_RANK>": it must be the device index, not the local rank
    assert plan.exported["LOCAL_RANK"] == str(env.local_rank if index is None else index)
    assert plan.exported["RANK"] == str(env.rank) and plan.exported["WORLD_SIZE"] == str(env.world_size)
    # NCCL is bound to the rank's GPU at init (device_id) for multi-rank jobs; never for gloo
    assert plan.bind_device == (index is not None and env.world_size > 1)


def test_device_binding_is_skipped_where_torch_cannot_do_it():
    env = DistEnv(rank=1, world_size=2, local_rank=1, master_addr="h", master_port=1)
    assert plan_devices(env, 2).bind_device
    assert not plan_devices(
        env, 2, device_id_ok=False
    ).bind_device  # torch without device_id, or 2.6 < torch < 2.7.1
    assert not plan_devices(
        DistEnv(0, 1, 0, "h", 1), 1
    ).bind_device  # 1 rank: nothing to bind to (DeepSpeed#8248)
    assert plan_devices(env, 2, backend="gloo").backend == "gloo"  # engine.dist_backend overrides auto


# ---------------------------------------------------------------- rank 0 decides the resume point


def _fake_checkpoint(out: Path, step: int, config_yaml: str) -> None:
    d = out / "checkpoints" / f"step-{step}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(config_yaml)
    (d / "manifest.json").write_text(
        json.dumps({"step": step, "world_size": 2, "zero_stage": 2, "files": {}})
    )
    (d / "COMPLETE").write_text("ok\n")


def _resume_on_rank(rank: int, port: int, dirs: list[str], result: str) -> None:
    import torch.distributed as tdist

    from dist_ft.config import load_config
    from dist_ft.errors import UserError
    from dist_ft.resume import resume_plan

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    got = []
    for d in dirs:
        cfg = load_config(Path(d) / "cfg.yaml", [f"output.dir={d}-rank{rank}"])
        try:
            plan = resume_plan(cfg, rank, 2)
            got.append([str(plan.path), plan.reshard])
        except UserError as e:
            got.append(["error", str(e)])
    Path(f"{result}-{rank}.json").write_text(json.dumps(got))
    tdist.destroy_process_group()


def test_every_rank_resumes_where_rank_0_decides(tmp_path, gpt2_dir):
    """Each rank sees its own view of the output directory (as a node with a stale listing of a shared
    filesystem would): rank 0 has step-3 and step-6, rank 1 only step-3. Both must resume from rank 0's
    step-6; and a checkpoint rank 0 refuses is refused on every rank with rank 0's reason."""
    import torch.multiprocessing as mp

    from dist_ft.config import dump_config, load_config

    base = tiny.run_config(tmp_path, gpt2_dir, 16, "max_steps: 8, micro_batch_size: 2", "zero_stage: 2")
    cases = []
    for name, rank0_yaml_extra in (("agree", []), ("refuse", ["train.seed=7"])):
        d = tmp_path / name
        d.mkdir()
        (d / "cfg.yaml").write_text(base.read_text())
        ok = dump_config(load_config(base, [f"output.dir={d}-rank0"]))
        _fake_checkpoint(Path(f"{d}-rank0"), 3, ok)
        _fake_checkpoint(
            Path(f"{d}-rank0"),
            6,
            dump_config(load_config(base, [f"output.dir={d}-rank0", *rank0_yaml_extra])),
        )
        _fake_checkpoint(Path(f"{d}-rank1"), 3, ok)  # the stale view
        cases.append(str(d))
    mp.spawn(_resume_on_rank, args=(free_port(), cases, str(tmp_path / "result")), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1))
    assert r0[0] == r1[0] == [f"{cases[0]}-rank0/checkpoints/step-6", False]
    assert r0[1][0] == r1[1][0] == "error" and r0[1][1] == r1[1][1]
    assert "config differs from the checkpoint in train.seed" in r1[1][1]


# ---------------------------------------------------------------- waits for one rank's work


def test_two_ranks_survive_rank_0_working_alone_past_the_collective_timeout(tmp_path, gpt2_dir):
    """The collective timeout is 3 s; rank 0 spends 8 s alone inside a checkpoint save (as on a slow
    filesystem) while rank 1 waits, then W&B start, shard building and export also run on one rank while the
    other waits. The waits go through the rendezvous store, so the job finishes; with a collective barrier
    it fails after 3 s (checked when this test was written)."""
    cfg = tiny.run_config(
        tmp_path,
        gpt2_dir,
        48,
        "max_steps: 4, micro_batch_size: 2, lr: 3.0e-3",
        "precision: fp32, zero_stage: 2, collective_timeout_minutes: 0.05",
        "checkpoint: {every_steps: 2}\n",
    )
    out = tmp_path / "out"
    r = subprocess.run(
        train_cmd(cfg, out, 2),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DIST_FT_TEST_PAUSE_IN_SAVE": "2:8"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    slow = re.search(r"saved checkpoint \S+step-2 in ([\d.]+) s", r.stdout)
    assert slow and float(slow.group(1)) >= 8.0 > 0.05 * 60  # rank 0 really worked alone past the timeout
    assert len(tiny.losses(out)) == 4 and (out / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_mfu_peak_of_each_gpu(name, peak):
    from dist_ft.perf import peak_flops

    assert peak_flops(name) == peak


def test_flash_attention_falls_back_to_sdpa_where_it_cannot_run(capsys, monkeypatch):
    """Without the flash-attn package flash_attention_2 is refused (install it or use sdpa); with it but no GPU, sdpa runs."""
    import importlib.util

    import torch

    from dist_ft import model
    from dist_ft.errors import UserError

    assert model.attn_implementation("sdpa") == "sdpa" and model.attn_implementation("eager") == "eager"
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the fallback is for machines without one")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else find_spec(name, *a)
    )
    with pytest.raises(
        UserError,
        match=r"flash_attention_2 needs the flash-attn package, which is not installed; pip install flash-attn",
    ):
        model.attn_implementation("flash_attention_2")
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "flash_attn" else find_spec(name, *a),
    )
    assert model.attn_implementation("flash_attention_2") == "sdpa"
    assert "flash_attention_2 is unavailable (there is no CUDA GPU); using sdpa" in capsys.readouterr().err
