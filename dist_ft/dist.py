"""Map the launcher's environment to rank / world size / local rank / master / device, and start
torch.distributed.

The only module that reads launcher variables. Supported: deepspeed, torchrun and `accelerate launch`
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), SLURM `srun` (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID), and a plain single process (none of them).

Each rank picks its GPU once, before the first collective (`device_index`), and every tensor a
collective touches lives there. Waits for work that one rank does alone (tokenizing, checkpoint
fsync, universal conversion, export, W&B start) go through the rendezvous store (`wait_for_all`,
in `rendezvous.py`, with a heartbeat per rank so a dead rank stops them), never through a collective,
so no collective timeout applies to honest work of any length.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .rendezvous import (  # noqa: F401 - dist's API
    gather_on_main,
    report_failure,
    start_heartbeat,
    stop_heartbeat,
    wait_for_all,
)

if TYPE_CHECKING:
    import torch  # imported lazily at run time: `import dist_ft.dist` must not load torch


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
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
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
            master_addr=environ.get("MASTER_ADDR")
            or _first_slurm_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(environ.get("MASTER_PORT") or 20000 + job % 20000),
        )
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr="127.0.0.1",
        master_port=int(environ.get("MASTER_PORT") or _free_port()),
    )


def slurm_job(environ: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """The SLURM job this process runs in ("" outside SLURM) and how often it was requeued
    (SLURM_RESTART_COUNT: a requeued job keeps its id and counts up)."""
    return environ.get("SLURM_JOB_ID", ""), int(environ.get("SLURM_RESTART_COUNT") or 0)


LAUNCH_INTS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
)


def check_launch(environ: Mapping[str, str]) -> None:
    """Refuse launcher variables that cannot work, before the rendezvous, where a rank would wait for peers
    that never come: non-integers, a rank outside the world, and the SLURM batch script itself (it has
    SLURM_NTASKS and SLURM_PROCID=0 but is no task of a job step: only srun starts the ranks)."""
    from .errors import UserError

    for k in LAUNCH_INTS:
        # ("" port: pick one)
        if k in environ and not environ[k].strip().isdigit() and (environ[k].strip() or k != "MASTER_PORT"):
            raise UserError(
                f"{k}={environ[k]!r} is not a non-negative integer; fix the launcher's environment "
                f"(or unset {k} to run one process)"
            )
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world, names = int(environ["RANK"]), int(environ["WORLD_SIZE"]), ("RANK", "WORLD_SIZE")
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        rank, world, names = (
            int(environ["SLURM_PROCID"]),
            int(environ["SLURM_NTASKS"]),
            ("SLURM_PROCID", "SLURM_NTASKS"),
        )
        step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", ""))
        # batch, extern and interactive steps are special ids
        if world > 1 and not (step.isdigit() and int(step) < 0xFFFFFFF0):
            raise UserError(
                f"SLURM_NTASKS={world} but this process was not started by srun (no job step: SLURM_STEP_ID "
                f"is {'unset' if not step else repr(step)}), so rank 0 would wait forever for {world - 1} "
                "ranks that never start; launch with srun, e.g. `srun python launch/train.py CONFIG` in the "
                "batch script (as slurm/job.sh does)"
            )
    else:
        return
    if world < 1 or rank >= world:
        raise UserError(
            f"{names[0]}={rank} with {names[1]}={world}: the rank must be below the world size; fix the "
            f"launcher's environment (or unset {names[0]} and {names[1]} to run one process)"
        )


def device_index(local_rank: int, visible_gpus: int) -> int | None:
    """The CUDA device of a rank: its node-local rank modulo the GPUs this process can see; None on CPU.

    Covers every launcher layout: 8 tasks on a node that sees 8 GPUs (local rank i -> GPU i), SLURM
    `--gpus-per-task=1` (each task sees one GPU: always 0), torchrun / deepspeed / accelerate (LOCAL_RANK)."""
    if visible_gpus <= 0:
        return None
    return local_rank % visible_gpus


def _device_id_supported(torch) -> bool:
    """`init_process_group(device_id=...)` binds NCCL to the rank's GPU eagerly (torch >= 2.3); it hangs in
    2.6.0 < torch < 2.7.1 (pytorch#153960), so it is not passed there."""
    import inspect

    return "device_id" in inspect.signature(torch.distributed.init_process_group).parameters and not (
        "2.6.0" < torch.__version__ < "2.7.1"
    )


@dataclass(frozen=True)
class DevicePlan:
    index: int | None  # CUDA device of this rank; None on CPU
    backend: str  # nccl | gloo
    exported: dict  # variables set for torch.distributed and DeepSpeed
    bind_device: bool  # pass device_id to init_process_group (NCCL binds this rank's GPU eagerly)


def plan_devices(
    env: DistEnv, visible_gpus: int, backend: str = "auto", device_id_ok: bool = True
) -> DevicePlan:
    """What `init` does for a rank, decided without touching a device (unit-tested per launcher layout)."""
    index = device_index(env.local_rank, visible_gpus)
    if backend == "auto":
        backend = "nccl" if index is not None else "gloo"
    exported = dict(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
        # DeepSpeed takes LOCAL_RANK as the device index (engine, zero.Init): with one visible GPU per
        # task that index is 0 whatever the task's local rank
        LOCAL_RANK=str(env.local_rank if index is None else index),
    )
    # binding makes torch split every later group from this one; a 1-rank job has no peer for that
    # (DeepSpeed#8248)
    bind = index is not None and backend == "nccl" and env.world_size > 1 and device_id_ok
    return DevicePlan(index, backend, exported, bind)


def init(backend: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Pick this rank's device and make it current before any collective, export the layout as the variables
    torch.distributed and DeepSpeed read, then start the process group (each collective then times out after
    `timeout_minutes`). DeepSpeed's layer on top of the group is started by `engine.init_distributed`."""
    import torch

    check_launch(os.environ)
    env = env_from(os.environ)
    plan = plan_devices(
        env,
        torch.cuda.device_count() if torch.cuda.is_available() else 0,
        backend,
        _device_id_supported(torch),
    )
    if plan.index is not None:
        torch.cuda.set_device(plan.index)  # NCCL and every tensor of a collective live on the current device
    os.environ.update(plan.exported)
    timeout = timedelta(minutes=timeout_minutes)
    if not torch.distributed.is_initialized():
        kw: dict[str, Any] = {}
        if plan.bind_device and plan.index is not None:  # (plan_devices binds only a rank with a GPU)
            kw["device_id"] = torch.device("cuda", plan.index)
        torch.distributed.init_process_group(backend=plan.backend, timeout=timeout, **kw)
    # a rank dead for longer than a collective would wait stops every store wait
    start_heartbeat(timeout.total_seconds())
    return env


def device() -> torch.device:
    """The device this rank computes and communicates on (set by `init`)."""
    import torch

    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def patient_sum(what: str, value: float) -> float:
    """`all_sum` of one value after `wait_for_all`: for a result (e.g. a failure count) of work some ranks do
    alone."""
    wait_for_all(what)
    return all_sum(value)[0]


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (one collective; rank 0 decides, the others follow)."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() < 2:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, device=device())
    return box[0]


def shutdown() -> None:
    """Leave the process group cleanly: all ranks meet, then the group (and its gloo/NCCL threads) is torn
    down before interpreter exit, where a still-running communication thread aborts the process."""
    import torch.distributed as dist

    if dist.is_initialized():
        wait_for_all("shutdown")  # rank 0 may still be exporting or answering sample prompts
        stop_heartbeat()
        dist.destroy_process_group()
    _remove_shm_buffers()


def _remove_shm_buffers() -> None:
    """DeepSpeed's CPU shared-memory all-reduce creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (~66 MB per rank) and never unlinks it:
    every multi-rank CPU run would leak RAM until reboot. After the last collective no rank opens them again,
    so local rank 0 unlinks this job's set."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    import glob

    pattern = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
        f"{os.environ.get('MASTER_PORT')}_*"
    )
    for path in glob.glob(pattern):
        try:
            os.unlink(path)
        except OSError:
            pass


def all_sum(*values) -> list[float]:
    """Sum scalars (Python numbers or 0-d tensors, e.g. a loss still on the GPU) over all ranks: one
    collective on this rank's device, and one host sync to read the result."""
    import torch
    import torch.distributed as dist

    dev = device()
    t = torch.stack(
        [
            v.detach().to(dev, torch.float64)
            if torch.is_tensor(v)
            else torch.tensor(float(v), dtype=torch.float64, device=dev)
            for v in values
        ]
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.cpu().tolist()


def all_sum_tensor(t):
    """`t` summed elementwise over all ranks (in place, on this rank's device), e.g. a vector each rank filled
    in part."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t
