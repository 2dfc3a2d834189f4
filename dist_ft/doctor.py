"""`dist-ft doctor [CONFIG] [--json]`: what a bug report needs and what will go wrong before a long job.

Versions (python, torch, CUDA, NCCL, DeepSpeed and which of its ops this machine can build, transformers,
peft, datasets), the devices (GPUs with compute capability and bf16; the CPU's native bf16; what
`engine.precision: auto` picks), the launch as `dist.py` reads it (rank, world, local rank, master, the device
plan, a launch that cannot work), SLURM's variables, free disk in output.dir and the caches, and whether W&B's
host answers. Nothing here writes, starts a process group or prints a secret (an API key is reported as set
or not). `problems` lists what would fail or surprise a run."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

SLURM_KEYS = (
    "SLURM_JOB_ID",
    "SLURM_JOB_NAME",
    "SLURM_JOB_NUM_NODES",
    "SLURM_JOB_NODELIST",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_CPUS_PER_TASK",
    "SLURM_GPUS_ON_NODE",
    "SLURM_RESTART_COUNT",
)
LOW_DISK_GB = 20.0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import torch

    nccl = None
    if torch.cuda.is_available():
        try:
            nccl = ".".join(str(x) for x in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001 - a build without NCCL
            nccl = None
    out = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": nccl,
    }
    for dist in ("dist-ft", "deepspeed", "transformers", "peft", "datasets", "accelerate", "wandb"):
        out[dist] = _version(dist)
    return out


def deepspeed_ops() -> dict[str, bool]:
    """Which DeepSpeed ops this machine can build (DeepSpeed's own compatibility check, as `ds_report`)."""
    try:
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
    except Exception:  # noqa: BLE001 - DeepSpeed missing or broken: reported as no ops
        return {}
    out = {}
    for name, builder in sorted(ALL_OPS.items()):
        try:
            out[name] = bool(builder.is_compatible(verbose=False))
        except Exception:  # noqa: BLE001 - a builder that cannot even check
            out[name] = False
    return out


def devices() -> dict:
    import torch

    from .precision import cpu_has_native_bf16, resolve

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gb": round(p.total_memory / 2**30, 1),
                    "bf16": p.major >= 8,
                }
            )
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {
        "gpus": gpus,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cpu_cores": cores,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "precision_auto": resolve("auto"),
    }


def launch(environ: Mapping[str, str], visible_gpus: int) -> tuple[dict, list[str]]:
    from . import dist
    from .errors import UserError

    problems = []
    try:
        dist.check_launch(environ)
        env = dist.env_from(environ)
    except (UserError, ValueError) as e:
        return {"error": str(e)}, [f"launch: {e}"]
    plan = dist.plan_devices(env, visible_gpus)
    info = {
        "rank": env.rank,
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "master": f"{env.master_addr}:{env.master_port}",
        "backend": plan.backend,
        "device": "cpu" if plan.index is None else f"cuda:{plan.index}",
        "launcher": "torchrun/deepspeed"
        if "RANK" in environ
        else "slurm"
        if "SLURM_PROCID" in environ
        else "none (one process)",
    }
    if env.world_size > 1 and 1 < visible_gpus <= env.local_rank:
        problems.append(
            f"launch: local rank {env.local_rank} but {visible_gpus} GPUs visible: ranks would share a GPU"
        )
    return info, problems


def _free_gb(path: Path) -> float | None:
    p = path.expanduser()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return round(shutil.disk_usage(p).free / 2**30, 1)
    except OSError:
        return None


def disk(cfg) -> dict:
    paths = {
        "cache (shards)": Path(os.environ.get("DIST_FT_CACHE") or "~/.cache/dist_ft"),
        "hugging face cache": Path(os.environ.get("HF_HOME") or "~/.cache/huggingface"),
    }
    if cfg is not None:
        paths["output.dir"] = Path(cfg.output.dir)
        paths["cache (shards)"] = cfg.data.cache_path()
    return {k: {"path": str(v), "free_gb": _free_gb(v)} for k, v in paths.items()}


def wandb_host(environ: Mapping[str, str], timeout: float = 3.0) -> dict:
    url = environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    parsed = urlparse(url)
    host, port = parsed.hostname or "api.wandb.ai", parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            reachable = True
    except OSError:
        reachable = False
    return {
        "host": f"{host}:{port}",
        "reachable": reachable,
        "api_key_set": bool(environ.get("WANDB_API_KEY")),
        "mode": environ.get("WANDB_MODE") or ("online" if environ.get("WANDB_API_KEY") else "offline"),
    }


def report(config: str | None = None, overrides: list[str] | None = None, environ=os.environ) -> dict:
    import torch

    cfg = None
    if config:
        from .config import load_config

        cfg = load_config(config, overrides or [])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    launched, problems = launch(environ, visible)
    with contextlib.redirect_stdout(sys.stderr):  # (DeepSpeed logs to stdout as it loads: --json stays JSON)
        ops = deepspeed_ops()
    out: dict = {
        "versions": versions(),
        "deepspeed_ops": ops,
        "devices": devices(),
        "launch": launched,
        "slurm": {k: environ[k] for k in SLURM_KEYS if k in environ},
        "disk": disk(cfg),
        "wandb": wandb_host(environ),
    }
    for name, d in out["disk"].items():
        if d["free_gb"] is not None and d["free_gb"] < LOW_DISK_GB:
            problems.append(f"disk: {d['free_gb']} GB free for {name} ({d['path']}): checkpoints may not fit")
    w = out["wandb"]
    if w["api_key_set"] and not w["reachable"] and w["mode"] != "offline":
        problems.append(f"wandb: a key is set but {w['host']} does not answer: runs will log offline")
    if cfg is not None and cfg.engine.precision in ("bf16", "bf16-autocast") and not visible:
        if not out["devices"]["cpu_native_bf16"]:
            problems.append(
                "precision: bf16 on a CPU without native bf16 (AVX512-BF16/AMX) is slow: use auto"
            )
    out["problems"] = problems
    return out


def table(rep: dict) -> str:
    """The report for a terminal: one `key  value` line per fact, by section."""
    lines = []

    def section(title: str, items: dict) -> None:
        lines.append(title)
        width = max((len(str(k)) for k in items), default=0)
        for k, v in items.items():
            lines.append(f"  {str(k):<{width}}  {v}")

    section("versions", rep["versions"])
    ops = rep["deepspeed_ops"]
    section("deepspeed ops (buildable here)", {k: "yes" if v else "no" for k, v in ops.items()})
    dev = dict(rep["devices"])
    gpus = dev.pop("gpus")
    section("devices", dev)
    for g in gpus:
        lines.append(
            f"  cuda:{g['index']}  {g['name']}  cc {g['capability']}  {g['memory_gb']} GB  bf16 {g['bf16']}"
        )
    section("launch (as dist-ft train reads it)", rep["launch"])
    section("slurm", rep["slurm"] or {"(none)": "not inside a SLURM job"})
    section("disk", {k: f"{v['free_gb']} GB free  {v['path']}" for k, v in rep["disk"].items()})
    section("wandb", rep["wandb"])
    section("problems", {str(i + 1): p for i, p in enumerate(rep["problems"])} or {"(none)": "found nothing"})
    return "\n".join(lines)


def main(config: str | None, overrides: list[str], as_json: bool) -> None:
    import json

    rep = report(config, overrides)
    print(json.dumps(rep, indent=2) if as_json else table(rep))
    sys.stdout.flush()
