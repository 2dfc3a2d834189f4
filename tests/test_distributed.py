"""Real multi-process runs on CPU ranks (gloo): deepspeed and torchrun launchers, ZeRO 0-3, offload.

Tolerance: losses agree with the single-process run to 2e-5 and weights to 2e-5. Not bitwise,
because the 2-rank all-reduce sums gradients in a different order than one process does (fp32
rounding); everything else - data order, global batch, loss normalization - is identical.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from helpers import REPO, free_port, run_cli
from safetensors.torch import load_file

TOL = 2e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gpt2_dir):
    tmp = tmp_path_factory.mktemp("dist")
    cfg = tiny.run_config(
        tmp,
        gpt2_dir,
        160,
        "max_steps: 8, micro_batch_size: 2, grad_accum: 2, lr: 3.0e-3, warmup_steps: 2",
        "precision: fp32",
    )
    # one process with the same global batch: 4 rows x 2 accumulation steps
    r = run_cli("train", str(cfg), "train.micro_batch_size=4", f"output.dir={tmp / 'single'}")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, cfg


def _launch(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def _deepspeed(cfg: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    port = free_port()
    r = _launch(
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            "2",
            "--master_port",
            str(port),
            "launch/train.py",
            str(cfg),
            f"output.dir={out}",
            *overrides,
        ]
    )
    # DeepSpeed's CPU shm all-reduce buffers (~66 MB per rank) are unlinked when the job ends, not leaked
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return r


def _assert_matches_single(tmp: Path, out: Path, tol: float = TOL) -> None:
    ref, got = tiny.losses(tmp / "single"), tiny.losses(out)
    assert len(got) == len(ref) == 8
    assert max(abs(a - b) for a, b in zip(ref, got, strict=False)) <= tol, (ref, got)
    w_ref, w = (
        load_file(tmp / "single" / "final" / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    assert w.keys() == w_ref.keys()
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], atol=tol, rtol=0)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_on_two_ranks_match_one_process(setup, stage):
    tmp, cfg = setup
    out = tmp / f"zero{stage}"
    r = _deepspeed(cfg, out, f"engine.zero_stage={stage}", f"output.log_all_ranks={stage == 1}")
    # per-rank debugging logs only when asked for
    assert (out / "rank-1.log").exists() == (out / "metrics-rank-1.jsonl").exists() == (stage == 1)
    assert f"world 2 | ZeRO {stage} | fp32 | global batch = 2 micro x 2 accum x 2 ranks = 8 rows" in r.stdout
    assert r.stdout.count("step      8 | loss") == 1  # only rank 0 prints
    _assert_matches_single(tmp, out)
    mem = next(
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "mem_params_bytes" in line
    )
    psi = mem["mem_formula_params_bytes"] * (2 if stage == 3 else 1) / 4  # fp32: 4 bytes per parameter
    # measured per-rank bytes against the ZeRO formula (fp32: 4Ψ params, 4Ψ grads, 8Ψ Adam m+v, each /N when sharded)
    assert mem["mem_params_bytes"] == pytest.approx(mem["mem_formula_params_bytes"], rel=0.02)
    if stage != 1:  # stage 1 keeps only the reduced gradient partition at the boundary (measured 2Ψ of 4Ψ)
        assert mem["mem_grads_bytes"] == pytest.approx(mem["mem_formula_grads_bytes"], rel=0.02)
    # DeepSpeed keeps an fp32 master partition at stages 1-2
    ds_master = 4 * psi / 2 if stage in (1, 2) else 0
    assert mem["mem_optimizer_bytes"] == pytest.approx(
        mem["mem_formula_optimizer_bytes"] + ds_master, rel=0.02
    )
    if stage == 3:  # the consolidated export reloads through from_pretrained
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(out / "final")
        torch.testing.assert_close(
            m.state_dict()["transformer.wte.weight"],
            load_file(out / "final" / "model.safetensors")["transformer.wte.weight"],
        )


@pytest.mark.parametrize("stage,params", [(2, False), (3, True)])
def test_cpu_offload(setup, stage, params):
    """Optimizer states (and with ZeRO-3 the parameters too) kept in CPU memory by DeepSpeed's offload (ZeRO-3
    offloads both at once here: the optimizer alone at ZeRO-3 takes the same DeepSpeedCPUAdam path as at 2)."""
    tmp, cfg = setup
    out = tmp / f"offload{stage}{'-params' if params else ''}"
    _deepspeed(
        cfg,
        out,
        f"engine.zero_stage={stage}",
        "engine.offload_optimizer=true",
        f"engine.offload_params={params}",
    )
    # DeepSpeedCPUAdam's fused arithmetic rounds slightly differently
    _assert_matches_single(tmp, out, tol=5e-5)


def test_torchrun_matches_deepspeed_launcher(setup):
    tmp, cfg = setup
    out = tmp / "torchrun"
    _launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "launch/train.py",
            str(cfg),
            f"output.dir={out}",
            "engine.zero_stage=2",
        ]
    )
    _assert_matches_single(tmp, out)


def test_torchrun_two_nodes_on_localhost(setup):
    tmp, cfg = setup
    out, port = tmp / "two_nodes", free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(n),
                "--nproc_per_node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "two-nodes",
                "launch/train.py",
                str(cfg),
                f"output.dir={out}",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    _assert_matches_single(tmp, out)


def test_deepspeed_hostfile_two_nodes_on_localhost(setup):
    """The multi-node form, `deepspeed --hostfile`, as two "nodes" on this machine (--no_ssh: each node
    starts its own ranks, as a cluster launcher would, instead of DeepSpeed ssh-ing into the hosts)."""
    tmp, cfg = setup
    out, port = tmp / "hostfile", free_port()
    hostfile = tmp / "hostfile.txt"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deepspeed.launcher.runner",
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(n),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "launch/train.py",
                str(cfg),
                f"output.dir={out}",
                "engine.zero_stage=1",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    assert "world 2 | ZeRO 1" in outs[0][0]
    _assert_matches_single(tmp, out)
