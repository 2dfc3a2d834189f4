"""The one DeepSpeed boundary: nothing outside this module (and `engine_state.py`, its checkpoint and
memory half) imports DeepSpeed or reads its objects.

`Engine.build` turns our config into a DeepSpeed engine (ZeRO 0-3, offload, fp32/bf16/fp16) and hands back
a small wrapper: call it like the model, then `backward`, `step` (returns the grad norm at an optimizer
boundary), `save` / `load` (incl. DeepSpeed's universal checkpoints for another world size or ZeRO stage),
`full_state_dict` for export, `take_model_states` (measured bytes per rank), `close`. The loop calls these and
never branches on ZeRO stage, precision or offload.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from . import dist, engine_state
from .config import Config
from .errors import UserError


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str) -> str:
    on_gpu = torch.cuda.is_available()
    if requested == "auto":
        if on_gpu:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        # emulated bf16 on CPUs without AVX512-BF16/AMX is many times slower than fp32
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if requested == "fp16" and not on_gpu:
        raise UserError("engine.precision: fp16 needs a GPU (the CPU accelerator has no fp16 loss-scaling path); use fp32 or bf16")
    return requested


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then decay to min_ratio."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def ds_config(cfg: Config, precision: str) -> dict:
    t, e = cfg.train, cfg.engine
    zero: dict = {"stage": e.zero_stage}
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if e.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # export gathers full weights
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay,
            # torch's AdamW on CPU / without offload; DeepSpeedCPUAdam when states live on the CPU
            "torch_adam": not e.offload_optimizer}},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


@contextmanager
def zero3_init(cfg: Config, precision: str):
    """`with zero3_init(...)`: for ZeRO-3, `from_pretrained` inside builds the model under zero.Init, so each
    rank only ever holds its shard of the weights; a no-op for the other stages."""
    if cfg.engine.zero_stage != 3:
        yield
        return
    import torch.distributed as tdist
    from transformers.integrations import HfDeepSpeedConfig

    conf = ds_config(cfg, precision)
    conf["train_batch_size"] = cfg.train.micro_batch_size * cfg.train.grad_accum * tdist.get_world_size()
    alive = HfDeepSpeedConfig(conf)  # transformers holds only a weak reference: it is on while this lives
    try:
        yield
    finally:
        del alive


def init_distributed(backend: str = "auto", timeout_minutes: float = 30.0) -> dist.DistEnv:
    """The process group on this rank's own device (`dist.init`), then DeepSpeed's communication layer on it."""
    import deepspeed
    from datetime import timedelta

    env = dist.init(backend, timeout_minutes)
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(minutes=timeout_minutes))
    return env


@contextmanager
def gathered(*params):
    """Inside the block, ZeRO-3-partitioned `params` are whole on every rank (for reading); others are untouched."""
    import deepspeed

    parts = [p for p in params if hasattr(p, "ds_id")]
    if not parts:
        yield
        return
    with deepspeed.zero.GatheredParameters(parts):
        yield


def whole_params(model, frozen_only: bool = True):
    """(name, whole tensor) of each frozen parameter (or, not `frozen_only`, each parameter) of a model loaded for an
    engine, in name order, one at a time (under ZeRO-3 each is gathered from its partitions while it is looked at:
    every rank must iterate alike)."""
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not (frozen_only and p.requires_grad):
            with gathered(p):
                yield name, p.data


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and norms are not decayed
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Engine:
    """A DeepSpeed engine behind the few calls the loop, evaluation, checkpoints and export make."""

    def __init__(self, ds_engine, precision: str):
        self._ds, self.precision = ds_engine, precision
        self._model_states: dict | None = None  # bytes this rank holds for params / grads / optimizer, once measured
        self._states_taken = False

    @classmethod
    def build(cls, cfg: Config, model, total_steps: int, precision: str, load_universal: bool = False) -> "Engine":
        """`load_universal`: the engine will load a DeepSpeed universal checkpoint (another world size / ZeRO stage)."""
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        t = cfg.train
        sched = partial(lr_lambda, warmup=t.warmup_steps, total=total_steps, schedule=t.schedule, min_ratio=t.min_lr_ratio)
        config = ds_config(cfg, precision)
        leaves = {type(m) for m in model.modules() if type(m).__name__ == "TrainableTokensLayer"}
        if leaves and cfg.engine.zero_stage == 3:  # peft reads its base embedding's weight directly: fetch it with the layer
            deepspeed.utils.set_z3_leaf_modules(model, list(leaves))
        if load_universal:
            config["checkpoint"] = {"load_universal": True}
        ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=_param_groups(model, t.weight_decay), config=config,
                                           lr_scheduler=lambda opt: LambdaLR(opt, sched))
        engine = cls(ds, precision)
        engine.train()  # from_pretrained hands the model over in eval mode: dropout would be off for the whole run
        return engine

    # ---- the model
    @property
    def module(self):
        return self._ds.module

    @property
    def device(self) -> torch.device:
        return self._ds.device

    def __call__(self, **inputs):
        return self._ds(**inputs)

    def train(self) -> None:
        self._ds.train()

    def eval(self) -> None:
        self._ds.eval()

    @property
    def n_params(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self._ds.module.parameters())  # full sizes under ZeRO-3

    @property
    def n_trainable(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self._ds.module.parameters() if p.requires_grad)

    def trainable_fp32(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter, whole and in fp32 (the optimizer's master copy where there is one), on CPU, on
        every rank. All ranks must call it (ZeRO-3 gathers)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for n, p in self._ds.module.named_parameters():
            if p.requires_grad:
                master = safe_get_full_fp32_param(p)  # None at ZeRO-0, where the module's parameter is the master
                out[n] = (p.data if master is None else master).detach().float().cpu().clone()
        return out

    @property
    def zero_stage(self) -> int:
        return self._ds.zero_optimization_stage()

    # ---- one micro-batch at a time
    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss)

    def step(self) -> float | None:
        """engine.step() for one micro-batch; at an optimizer boundary returns the pre-clip global grad norm.
        At the second boundary (gradients exist and Adam has made its states) it measures the model states."""
        ds = self._ds
        boundary = ds.is_gradient_accumulation_boundary()
        norm = None
        if boundary and self._model_states is None and ds.global_steps == 1:
            self._model_states = engine_state.model_state_bytes(ds)
        if boundary and ds.zero_optimization_stage() == 0 and not (ds.bfloat16_enabled() or ds.fp16_enabled()):
            # DeepSpeed clips but does not record the norm on this path; gradients are already all-reduced here
            grads = [p.grad for p in ds.module.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        ds.step()
        if boundary and norm is None:
            n = ds.get_global_grad_norm()
            norm = float(n) if n is not None else None
        return norm

    def take_model_states(self) -> dict | None:
        """The measured model-state bytes, once (None before they are measured and after they were taken)."""
        if self._model_states is None or self._states_taken:
            return None
        self._states_taken = True
        return self._model_states

    @property
    def lr(self) -> float:
        return self._ds.get_lr()[0]

    @property
    def skipped_steps(self) -> int | None:
        """fp16 steps skipped on loss-scale overflow; None for the other precisions."""
        return self._ds.skipped_steps if self.precision == "fp16" else None

    # ---- state
    def save(self, directory: Path) -> None:
        """Every rank writes its part of the engine state (model, optimizer, ZeRO partitions, LR schedule)."""
        engine_state.save(self._ds, Path(directory))

    def load(self, directory: Path) -> None:
        engine_state.load(self._ds, Path(directory))

    def apply_optimizer_settings(self, lr: float, betas, eps: float, weight_decay: float) -> None:
        """After `load`: put the config's AdamW settings over the checkpoint's (DeepSpeed restores the saved
        ones); Adam's moments and the step count stay. The schedule's shape always comes from the config (its
        lambda is not saved), so the current LR is recomputed from the new peak."""
        opt = self._ds.optimizer
        groups = getattr(opt, "optimizer", opt).param_groups  # ZeRO wraps the torch / DeepSpeed Adam
        sched = self._ds.lr_scheduler
        factor = sched.lr_lambdas[0](sched.last_epoch)
        for i, g in enumerate(groups):  # group 0 is decayed, group 1 (biases, norms) never (`_param_groups`)
            g.update(betas=tuple(betas), eps=eps, weight_decay=weight_decay if i == 0 else 0.0, initial_lr=lr, lr=lr * factor)
        sched.base_lrs = [lr] * len(groups)
        sched._last_lr = [g["lr"] for g in groups]

    to_universal = staticmethod(engine_state.to_universal)

    def full_state_dict(self) -> dict | None:
        """Consolidated model weights on rank 0 (None elsewhere). All ranks must call it (ZeRO-3 gathers)."""
        if self.zero_stage == 3:
            return self._ds._zero3_consolidated_16bit_state_dict()
        if self._ds.global_rank == 0:
            return {k: v.detach().cpu() for k, v in self._ds.module.state_dict().items()}
        return None

    def close(self) -> None:
        self._ds.destroy()  # stops the optimizer's helper threads (ZeRO-3 offload) before the group goes
