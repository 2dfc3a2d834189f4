"""DeepSpeed engine state on disk, and what the engine holds in memory: the half of the engine boundary that
reads DeepSpeed's checkpoint layout and optimizer internals (`engine.py` is the other half).

`save`/`load` write and read `<dir>/ds/` (DeepSpeed's own layout, marked as convertible to a universal
checkpoint); `to_universal` converts such a folder with DeepSpeed's `ds_to_universal` for another world
size or ZeRO stage.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

from . import fsio
from .errors import UserError

TAG = "ds"  # the engine state's folder inside a checkpoint
# DeepSpeed looks the common state up as mp_rank_00_* (ZeRO 1-2) or zero_pp_rank_0_mp_rank_00_* (ZeRO-3)
_COMMON_STATE = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def has_frozen(engine) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


def save(engine, directory: Path) -> None:
    """This rank's part of the engine state. Every file this rank writes is announced (`fsio.wrote`), so the
    caller can fsync and vouch for its own files: DeepSpeed writes its state files through its checkpoint
    engine (seen here by wrapping its `save`: model states on data-parallel rank 0, or on every rank under
    ZeRO-3; each rank's optimizer partition) and copies its recovery scripts (global rank 0, ZeRO >= 1) beside
    `ds/`."""
    # the marker lets DeepSpeed's ds_to_universal convert this checkpoint for another world size / stage;
    # frozen weights (an adapter's base) are not saved: they come from the model's source on resume
    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    writer = engine.checkpoint_engine
    own, inner = "save" in vars(writer), writer.save

    def save_and_announce(state_dict, path, *args, **kwargs):
        result = inner(state_dict, path, *args, **kwargs)
        fsio.wrote(path)
        return result

    writer.save = save_and_announce
    try:
        engine.save_checkpoint(
            str(directory),
            tag=TAG,
            client_state=info,
            save_latest=False,
            exclude_frozen_parameters=has_frozen(engine),
        )
    finally:
        if own:
            writer.save = inner
        else:
            del writer.save
    if engine.global_rank == 0:
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            if (Path(directory) / script).is_file():
                fsio.wrote(Path(directory) / script)


def load(engine, directory: Path) -> None:
    load_path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_module_strict=not has_frozen(engine))
    if load_path is None:
        raise UserError(f"{directory}: DeepSpeed could not load the engine state")


def to_universal(src: Path, dst: Path) -> None:
    """Convert the engine state saved in `src` to DeepSpeed's universal format (per-parameter fp32 weights and
    optimizer states, independent of world size and ZeRO stage) in `dst`, which the caller publishes."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(src / TAG),
            "--output_folder",
            str(dst / TAG),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise UserError(
            f"{src}: converting to a universal checkpoint for the new world size / ZeRO stage failed: "
            f"{(r.stderr.strip().splitlines() or ['?'])[-1]}"
        )
    # provide both names of the common state, so any stage can load what any stage saved
    have = [n for n in _COMMON_STATE if (dst / TAG / n).is_file()]
    if not have:
        raise UserError(f"{src}: the universal conversion wrote no model states file")
    for n in _COMMON_STATE:
        if n not in have:
            shutil.copyfile(dst / TAG / have[0], dst / TAG / n)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def model_state_bytes(engine) -> dict:
    """Bytes this rank holds for parameters, gradients and optimizer state. Call at an accumulation
    boundary before `engine.step()` (gradients are freed or reused after it), after the first optimizer
    step (Adam creates its states lazily)."""
    stage, opt = engine.zero_optimization_stage(), engine.optimizer
    params = list(engine.module.parameters())
    own = {id(p) for p in params}
    if stage == 3:
        p_bytes = _nbytes(p.ds_tensor for p in params)
        grads = getattr(opt, "grad_partitions_flat_buffer", None)
        g_bytes = _nbytes([grads]) if grads is not None else None
    else:
        p_bytes = _nbytes(params)
        buf = getattr(opt, "grads_in_partition", None)
        averaged = getattr(opt, "averaged_gradients", None)
        masters = getattr(opt, "single_partition_of_fp32_groups", None) or []
        # BF16_Optimizer (bf16 ZeRO-1): fp32 grads
        bf16_accumulators = getattr(opt, "fp32_groups_gradients_flat", None)
        if torch.is_tensor(buf):
            g_bytes = _nbytes([buf])
        elif bf16_accumulators:
            g_bytes = _nbytes(bf16_accumulators)
        elif averaged and any(averaged.values()):
            g_bytes = _nbytes(g for gs in averaged.values() for g in (gs or []))
        elif any(m.grad is not None for m in masters):  # CPU offload: gradients live on the master partitions
            g_bytes = _nbytes(m.grad for m in masters)
        else:
            g_bytes = _nbytes(p.grad for p in params)
    inner = getattr(opt, "optimizer", opt)
    o_bytes = _nbytes(v for st in inner.state.values() for v in st.values())
    # fp32 master partitions
    o_bytes += _nbytes(p for g in inner.param_groups for p in g["params"] if id(p) not in own)
    return {"params": p_bytes, "grads": g_bytes, "optimizer": o_bytes}


def zero0_masters(engine) -> dict:
    """id(module parameter) -> its fp32 master (a view into the optimizer's) under ZeRO-0 bf16 / fp16, where
    DeepSpeed's FP16_UnfusedOptimizer (torch's AdamW) or FP16_Optimizer (fused Adam, flat groups) holds them;
    {} elsewhere."""
    from torch._utils import _unflatten_dense_tensors

    opt = engine.optimizer
    lp_groups = getattr(opt, "fp16_groups", None)
    if engine.zero_optimization_stage() != 0 or lp_groups is None:
        return {}
    if getattr(opt, "fp32_groups_flat", None) is not None:
        hp_groups = [
            _unflatten_dense_tensors(flat, lp)
            for flat, lp in zip(opt.fp32_groups_flat, lp_groups, strict=True)
        ]
    else:
        hp_groups = opt.fp32_groups
    return {
        id(p): hp
        for lp, hp_group in zip(lp_groups, hp_groups, strict=True)
        for p, hp in zip(lp, hp_group, strict=True)
    }


def set_masters(engine, sources: Iterable) -> None:
    """Put each (parameter, fp32 tensor) of `sources` into the optimizer's fp32 master copy of that parameter:
    ZeRO 1-2 and BF16_Optimizer through DeepSpeed's `safe_set_full_fp32_param`, ZeRO-3 its partition,
    ZeRO-0's FP16 optimizers (bf16 / fp16 without ZeRO) directly."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    zero0 = zero0_masters(engine)
    if zero0:
        # its init ran one Adam step on zero gradients (to create the states): undo its step count (else the
        # first real update is 0.74 lr, bias-corrected as step 2) and its weight decay (below)
        inner = engine.optimizer.optimizer
        for st in inner.state.values():
            if "step" in st:
                st["step"] = torch.zeros_like(st["step"]) if torch.is_tensor(st["step"]) else 0
    for p, v in sources:
        if id(p) in zero0:
            zero0[id(p)].data.copy_(v.view_as(zero0[id(p)]))
            continue
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(v.shape) != shape:  # the stored rows of a grown embedding: the new rows keep their draw
            whole = safe_get_full_fp32_param(p)
            whole[: v.shape[0]] = v
            v = whole
        if hasattr(p, "ds_id"):
            _set_zero3_master(p, v.to(engine.device))
        else:
            safe_set_full_fp32_param(p, v.to(engine.device))


def _set_zero3_master(p, value: torch.Tensor) -> None:
    """This rank's slice of `value` into ZeRO-3's fp32 partition of `p`. DeepSpeed's `set_full_hp_param`
    (0.19.8) reads a whole partition from the value on every rank, past its end on the last rank when the
    partitions are padded (a parameter whose size the world does not divide): here the slice stops at the
    end."""
    opt = p._z3_optimizer
    part, group = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False)
    start = part.numel() * opt._get_param_partition_rank(p)
    mine = value.flatten()[start : start + part.numel()]
    part.data[: mine.numel()].copy_(mine)
    if opt._swappable_optimizer_subgroup(group):
        opt._optimizer_states_and_gradient_swap_out(group)
