"""DeepSpeed engine: the only module that knows ZeRO stages, precision and offload.

The loop calls `build`, `loss_sum`, `backward`, `step` and `full_state_dict`; none of them branch
on anything the loop has to know about.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from .config import Config
from .errors import UserError
from .loss import linear_cross_entropy


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


def zero3_loading(cfg: Config, precision: str):
    """For ZeRO-3, an HfDeepSpeedConfig that makes `from_pretrained` build the model under zero.Init, so
    each rank only ever holds its shard; keep the returned object alive while the model loads."""
    if cfg.engine.zero_stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    import torch.distributed as tdist

    conf = ds_config(cfg, precision)
    conf["train_batch_size"] = cfg.train.micro_batch_size * cfg.train.grad_accum * tdist.get_world_size()
    return HfDeepSpeedConfig(conf)


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and norms are not decayed
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build(cfg: Config, model, total_steps: int, precision: str, load_universal: bool = False):
    """`load_universal`: the engine will load a DeepSpeed universal checkpoint (another world size / ZeRO stage)."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    t = cfg.train
    sched = partial(lr_lambda, warmup=t.warmup_steps, total=total_steps, schedule=t.schedule, min_ratio=t.min_lr_ratio)
    config = ds_config(cfg, precision)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=_param_groups(model, t.weight_decay), config=config,
        lr_scheduler=lambda opt: LambdaLR(opt, sched))
    return engine


# config attributes of models that transform the output layer's logits (softcapping, scaling): the fused loss
# would skip that, so these take the plain path
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _fusable(model, head, chunk: int) -> bool:
    if not chunk or not isinstance(head, torch.nn.Linear):
        return False
    return all(getattr(model.config, a, None) in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS)


def loss_sum(engine, batch: dict, chunk: int = 4096) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's loss-bearing targets (fp32), a 0-d tensor on the device.

    The output layer runs only on positions that carry loss: with a 50k vocabulary it is much of a small
    model's compute and nearly all of its activation memory, and in chat SFT a third or more of the
    positions (prompts, system turns, padding) carry no loss. With `chunk` > 0 the output layer and the
    loss are fused and run `chunk` positions at a time (`loss.py`): tokens x vocab logits never exist
    whole. The call goes through the output layer module itself, so ZeRO-3's hooks gather its weight.
    Works with any engine or plain HF model. Nothing here waits for the device (no host sync)."""
    model = getattr(engine, "module", engine)
    dev = engine.device
    kw = {k: batch[k].to(dev, non_blocking=True) for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    index = batch["loss_index"].to(dev, non_blocking=True)
    targets = batch["targets"].to(dev, non_blocking=True).flatten().index_select(0, index)
    head = model.get_output_embeddings()

    def kept(hidden: torch.Tensor) -> torch.Tensor:
        return hidden.flatten(0, -2).index_select(0, index)

    if _fusable(model, head, chunk):
        fused = []

        def fused_head(hidden: torch.Tensor) -> torch.Tensor:  # runs inside the head module's call (and its hooks)
            fused.append(linear_cross_entropy(kept(hidden), head.weight, head.bias, targets, chunk))
            return fused[-1]

        head.forward = fused_head
        try:
            out = engine(**kw, use_cache=False).logits
        finally:
            del head.forward
        # the same numbers, maybe re-wrapped (ZeRO-3's backward hook returns a detached view of the output); a
        # model that softcaps or scales its logits would return new ones, and the fused loss would be wrong for it
        if out.shape != () or out.data_ptr() != fused[-1].data_ptr():
            raise RuntimeError(f"{type(model).__name__} changes its output layer's result before returning it; set engine.loss_chunk_tokens=0")
        return out
    handle = head.register_forward_pre_hook(lambda _, args: (kept(args[0]),)) if head is not None else None
    try:
        logits = engine(**kw, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if handle is None:
        logits = kept(logits)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def step(engine, on_boundary=None) -> float | None:
    """engine.step() for one micro-batch; at an optimizer boundary returns the pre-clip global grad norm.
    `on_boundary(engine)` runs at a boundary just before the optimizer step (memory accounting)."""
    boundary = engine.is_gradient_accumulation_boundary()
    norm = None
    if boundary and on_boundary is not None:
        on_boundary(engine)
    if boundary and engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        # DeepSpeed clips but does not record the norm on this path; gradients are already all-reduced here
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
    engine.step()
    if boundary and norm is None:
        n = engine.get_global_grad_norm()
        norm = float(n) if n is not None else None
    return norm


def lr(engine) -> float:
    return engine.get_lr()[0]


def full_state_dict(engine) -> dict | None:
    """Consolidated model weights on rank 0 (None elsewhere). All ranks must call it (ZeRO-3 gathers)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if engine.global_rank == 0:
        return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    return None
