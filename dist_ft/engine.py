"""The one DeepSpeed boundary: nothing outside this module (and `engine_state.py`, its checkpoint and
memory half) imports DeepSpeed or reads its objects.

`Engine.build` turns our config into a DeepSpeed engine (ZeRO 0-3, offload, fp32/bf16/bf16-autocast/fp16: see
`precision.py`) and hands back a small wrapper: call it like the model, then `backward`, `step` (returns the
grad norm at an optimizer boundary), `save` / `load` (incl. DeepSpeed's universal checkpoints for another
world size or ZeRO stage), `full_state_dict` for export, `take_model_states` (measured bytes per rank),
`close`. The loop calls these and never branches on ZeRO stage, precision or offload.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from . import dist, engine_sp, engine_state, hub, offload, optim
from . import precision as precision_
from .config import Config
from .errors import UserError


def _bf16_gradients(cfg: Config) -> dict:
    """bf16 gradients are summed over micro-batches and ranks in fp32: DeepSpeed's default is the model's
    dtype, whose 8-bit mantissa drops a micro-batch's contribution below 1/256 of the running sum. ZeRO 1-3
    accumulate in fp32 (`grad_accum_dtype`; ZeRO-1 then runs DeepSpeed's BF16_Optimizer); every stage reduces
    in fp32 (`communication_data_type`). DeepSpeed has no fp32 accumulator at ZeRO-0 (a NotImplementedError),
    so there accumulating micro-batches is refused; one micro-batch per step needs none."""
    if cfg.engine.zero_stage == 0:
        if cfg.train.grad_accum > 1:
            raise UserError(
                "engine.precision bf16 with engine.zero_stage 0 and train.grad_accum > 1: DeepSpeed would "
                "sum the micro-batches' gradients in bf16 (it has no fp32 accumulator at ZeRO-0), losing the "
                "small ones. Use engine.zero_stage: 1 (an fp32 accumulator; on one rank the same memory as "
                "0), train.grad_accum: 1 or engine.precision: bf16-autocast (fp32 gradients)"
            )
        return {"communication_data_type": "fp32"}
    return {"communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}}


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
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": t.eps,
                "weight_decay": t.weight_decay,
                # torch's AdamW on CPU / without offload; DeepSpeedCPUAdam when states live on the CPU
                "torch_adam": not e.offload_optimizer,
            },
        },
        # sequence parallelism: DeepSpeed's batch arithmetic counts data-parallel ranks (world / this)
        **({"sequence_parallel_size": e.sequence_parallel} if e.sequence_parallel > 1 else {}),
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        **(_bf16_gradients(cfg) if precision == "bf16" else {}),
        **precision_.autocast_section(precision),
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
    readers = tdist.get_world_size() // cfg.engine.sequence_parallel
    conf["train_batch_size"] = cfg.train.micro_batch_size * cfg.train.grad_accum * readers
    alive = HfDeepSpeedConfig(conf)  # transformers holds only a weak reference: it is on while this lives
    try:
        yield
    finally:
        del alive


def init_distributed(backend: str = "auto", timeout_minutes: float = 30.0) -> dist.DistEnv:
    """The process group on this rank's own device (`dist.init`), then DeepSpeed's communication layer on
    it."""
    from datetime import timedelta

    import deepspeed

    env = dist.init(backend, timeout_minutes)
    deepspeed.init_distributed(
        dist_backend=torch.distributed.get_backend(),
        auto_mpi_discovery=False,
        verbose=False,
        timeout=timedelta(minutes=timeout_minutes),
    )
    return env


@contextmanager
def gathered(*params):
    """Inside the block, ZeRO-3-partitioned `params` are whole on every rank (for reading); others are
    untouched."""
    import deepspeed

    parts = [p for p in params if hasattr(p, "ds_id")]
    if not parts:
        yield
        return
    with deepspeed.zero.GatheredParameters(parts):
        yield


def whole_params(model, frozen_only: bool = True):
    """(name, whole tensor) of each frozen parameter (or, not `frozen_only`, each parameter) of a model loaded
    for an engine, in name order, one at a time (under ZeRO-3 each is gathered from its partitions while it is
    looked at: every rank must iterate alike)."""
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not (frozen_only and p.requires_grad):
            with gathered(p):
                yield name, p.data


class Engine:
    """A DeepSpeed engine behind the few calls the loop, evaluation, checkpoints and export make."""

    def __init__(self, ds_engine, precision: str, sequence_parallel: int = 1, attention=None):
        self._ds, self.precision = ds_engine, precision
        self.sequence_parallel, self._attention = sequence_parallel, attention
        # over how many ranks DeepSpeed averages the gradients (the loop scales the loss to undo it)
        self.ranks_averaged = engine_sp.ranks_averaged(ds_engine.zero_optimization_stage(), sequence_parallel)
        # the groups DeepSpeed kept (it drops empty ones), in order
        self.group_names = [g["name"] for g in self._groups()]
        self._model_states: dict | None = (
            None  # bytes this rank holds for params / grads / optimizer, once measured
        )
        self._states_taken = False
        self.offload_activations = False  # model.activation_offload (offload.py)

    @classmethod
    def build(
        cls,
        cfg: Config,
        model,
        total_steps: int,
        precision: str,
        load_universal: bool = False,
        fresh: bool = True,
        passes: int = 1,
    ) -> Engine:
        """`load_universal`: the engine will load a DeepSpeed universal checkpoint (another world size / ZeRO
        stage). `fresh`: no checkpoint will be loaded into it (the masters are set from the model's files).
        `passes`: optimizer steps per training step (the task's): the schedule's warmup and length count
        optimizer steps."""
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        t = cfg.train
        sched = partial(
            optim.lr_lambda,
            warmup=t.warmup_steps * passes,
            total=total_steps * passes,
            schedule=t.schedule,
            min_ratio=t.min_lr_ratio,
        )
        config = ds_config(cfg, precision)
        leaves = {type(m) for m in model.modules() if type(m).__name__ == "TrainableTokensLayer"}
        # peft reads its base embedding's weight directly: fetch it with the layer
        if leaves and cfg.engine.zero_stage == 3:
            deepspeed.utils.set_z3_leaf_modules(model, list(leaves))
        if load_universal:
            config["checkpoint"] = {"load_universal": True}
        # decay by real shape (ZeRO-3: ds_shape)
        groups = optim.build(model.named_parameters(), t.weight_decay)
        # DeepSpeed casts them to bf16 below
        fp32 = precision_.fp32_sources(model, precision, cfg.engine.zero_stage)
        # ZeRO-3 partitioned the loaded weights in bf16: theirs are read from the model's files on a fresh
        # start (a resume loads its own masters)
        from_files: Iterable = ()
        if fresh and cfg.engine.zero_stage == 3 and precision in ("bf16", "fp16"):
            from_files = precision_.file_fp32(model, hub.safetensors_files(cfg.model))
        if cfg.model.tiled_mlp and not engine_sp.tile_mlps(model, cfg.model.tiled_mlp):
            raise UserError(
                "model.tiled_mlp: this model has no decoder-layer module named `mlp` to tile; set "
                "model.tiled_mlp: 0"
            )
        mpu, attention = engine_sp.register(model, cfg) if cfg.engine.sequence_parallel > 1 else (None, None)
        ds, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            config=config,
            lr_scheduler=lambda opt: LambdaLR(opt, sched),
            mpu=mpu,
        )
        # the fp32 masters start from the fp32 weights, not their bf16 rounding
        engine_state.set_masters(ds, itertools.chain(fp32, from_files))
        del fp32
        engine = cls(ds, precision, cfg.engine.sequence_parallel, attention)
        engine.offload_activations = cfg.model.activation_offload
        # from_pretrained hands the model over in eval mode: dropout would be off for the whole run
        engine.train()
        return engine

    @classmethod
    def frozen(cls, cfg: Config, model, precision: str) -> Engine:
        """`model` frozen in an engine of its own, forward only (no optimizer): GRPO's KL reference under full
        fine-tuning. ZeRO-3 partitions it like the policy (its bytes / world per rank); at ZeRO 0-2 each rank
        holds it whole, in the run's precision (bf16: 2 B/param)."""
        import deepspeed

        for p in model.parameters():
            p.requires_grad_(False)
        config = {k: v for k, v in ds_config(cfg, precision).items() if k not in ("optimizer", "data_types")}
        config["zero_optimization"] = {
            **config["zero_optimization"],
            "stage": 3 if cfg.engine.zero_stage == 3 else 0,
        }
        config["zero_optimization"].pop("offload_optimizer", None)
        ds, *_ = deepspeed.initialize(model=model, config=config)
        engine = cls(ds, precision)
        engine.eval()
        return engine

    # ---- the model
    @property
    def module(self):
        return self._ds.module

    @property
    def device(self) -> torch.device:
        return self._ds.device

    def __call__(self, **inputs):
        with offload.activations_on_host(self.offload_activations):
            return self._ds(**inputs)

    def train(self) -> None:
        self._ds.train()

    def eval(self) -> None:
        self._ds.eval()

    @property
    def n_params(self) -> int:
        # full sizes under ZeRO-3
        return sum(getattr(p, "ds_numel", p.numel()) for p in self._ds.module.parameters())

    @property
    def n_trainable(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self._ds.module.parameters() if p.requires_grad)

    def trainable_fp32(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter, whole and in fp32 (the optimizer's master copy where there is one), on
        CPU, on every rank. All ranks must call it (ZeRO-3 gathers)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out, zero0 = (
            {},
            engine_state.zero0_masters(self._ds),
        )  # ZeRO-0 bf16: DeepSpeed's getter has no masters there
        for n, p in self._ds.module.named_parameters():
            if p.requires_grad:
                # None: fp32 ZeRO-0 (the parameter)
                master = zero0[id(p)] if id(p) in zero0 else safe_get_full_fp32_param(p)
                out[n] = (p.data if master is None else master).detach().float().cpu().clone()
        return out

    @property
    def steps_done(self) -> int:
        """Optimizer steps taken (restored with a checkpoint)."""
        return self._ds.global_steps

    @property
    def zero_stage(self) -> int:
        return self._ds.zero_optimization_stage()

    def sequence_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over this rank's sequence-parallel group, differentiably (torch's autograd all-reduce:
        the gradient is summed back, so each rank's shard gets the whole sequence's): per-sequence sums of
        shards, e.g. a preference pair's log-probs. `t` itself at sp=1."""
        return engine_sp.sequence_sum(t) if self.sequence_parallel > 1 else t

    def plain_attention(self):
        """`with engine.plain_attention():` the plain attention kernel again (for another model in this
        process, e.g. generating with the exported one)."""
        return engine_sp.plain_attention(self._attention)

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
        if (
            boundary
            and ds.zero_optimization_stage() == 0
            and not (ds.bfloat16_enabled() or ds.fp16_enabled())
        ):
            # DeepSpeed clips but does not record the norm on this path; gradients are already all-reduced
            # here
            grads = [p.grad for p in ds.module.parameters() if p.grad is not None]
            norm = float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            )
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
        groups, sched = self._groups(), self._ds.lr_scheduler
        optim.apply(
            groups,
            self.group_names,
            lr=lr,
            lr_factor=sched.lr_lambdas[0](sched.last_epoch),
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
        )  # by the groups' names: DeepSpeed drops empty groups
        sched.base_lrs = [lr] * len(groups)
        sched._last_lr = [g["lr"] for g in groups]

    def _groups(self) -> list[dict]:
        """The optimizer's parameter groups (ZeRO / BF16_Optimizer wrap the torch / DeepSpeed Adam); none for
        a frozen engine."""
        opt = self._ds.optimizer
        return getattr(getattr(opt, "optimizer", opt), "param_groups", [])

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
