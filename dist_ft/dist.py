"""Map the launcher's environment to rank / world size / local rank / master, and start torch.distributed.

The only module that reads launcher variables. Supported: deepspeed and torchrun (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), SLURM `srun` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
SLURM_JOB_NODELIST, SLURM_JOB_ID), and a plain single process (none of them).
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # "node[01-04],other" -> "node01": good enough when scontrol is not on PATH
        head = nodelist.split(",")[0]
        if "[" in head:
            base, rng = head.split("[", 1)
            head = base + rng.rstrip("]").split(",")[0].split("-")[0]
        return head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_from(environ: Mapping[str, str]) -> DistEnv:
    """Rank layout from launcher variables; launcher-set RANK/WORLD_SIZE win over SLURM's."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        job = int(environ.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=environ.get("MASTER_ADDR") or _first_slurm_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(environ.get("MASTER_PORT") or 20000 + job % 20000),
        )
    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=int(environ.get("MASTER_PORT") or _free_port()))


def init(backend: str = "auto") -> DistEnv:
    """Export the resolved layout as the variables torch.distributed expects, then init the process group."""
    import deepspeed
    import torch

    env = env_from(os.environ)
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
    )
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return env


def shutdown() -> None:
    """Leave the process group cleanly: all ranks meet, then the group (and its gloo/NCCL threads) is torn
    down before interpreter exit, where a still-running communication thread aborts the process."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _remove_shm_buffers()


def _remove_shm_buffers() -> None:
    """DeepSpeed's CPU shared-memory all-reduce creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (~66 MB per rank) and never unlinks it: every multi-rank CPU run would leak RAM until reboot. After the
    last collective no rank opens them again, so local rank 0 unlinks this job's set."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    import glob

    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_*"
    for path in glob.glob(pattern):
        try:
            os.unlink(path)
        except OSError:
            pass


def all_sum(*values: float) -> list[float]:
    """Sum scalars over all ranks (one collective)."""
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    t = torch.tensor(values, dtype=torch.float64, device=get_accelerator().current_device_name())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.cpu().tolist()
