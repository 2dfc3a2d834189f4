"""The optimizer's settings, for the engine: AdamW's parameter groups (named), the LR schedule, and the
settings a resumed run puts over a checkpoint's. Nothing here imports DeepSpeed.

Weight decay: a parameter with two or more real dimensions (linear and attention matrices, embeddings, the
output layer, LoRA's A and B) is decayed; a 1-D one (biases, LayerNorm / RMSNorm weights) never is, as in
nanoGPT. "Real" because under ZeRO-3 (`zero.Init`) every parameter is a 1-D placeholder whose shape is in
`ds_shape`: reading `p.ndim` there put every weight in the no-decay group and trained with no decay at all.

Each group carries its `name`. DeepSpeed drops an empty group (e.g. an adapter with no 1-D parameters), so a
group's index says nothing about what it is: settings are applied by name.
"""

from __future__ import annotations

import math

DECAY, NO_DECAY = "decay", "no_decay"


def real_ndim(p) -> int:
    """Dimensions of the parameter itself, not of its ZeRO-3 placeholder."""
    shape = getattr(p, "ds_shape", None)
    return p.ndim if shape is None else len(shape)


def build(named_parameters, weight_decay: float) -> list[dict]:
    """The two named groups over the trainable parameters; either may be empty (DeepSpeed drops those)."""
    decay: list = []
    no_decay: list = []
    for _, p in named_parameters:
        if p.requires_grad:
            (decay if real_ndim(p) >= 2 else no_decay).append(p)
    return [
        {"name": DECAY, "params": decay, "weight_decay": weight_decay},
        {"name": NO_DECAY, "params": no_decay, "weight_decay": 0.0},
    ]


def weight_decay_of(name: str, weight_decay: float) -> float:
    if name not in (DECAY, NO_DECAY):
        raise ValueError(f"unknown optimizer parameter group {name!r}")
    return weight_decay if name == DECAY else 0.0


def apply(
    groups: list[dict],
    names: list[str],
    *,
    lr: float,
    lr_factor: float,
    betas,
    eps: float,
    weight_decay: float,
) -> None:
    """Put the config's AdamW settings on the optimizer's `groups` (after a checkpoint restored the saved
    ones), the group at index i being `names[i]` (recorded when the engine was built: a checkpoint saved
    before the groups had names restores groups without them). `lr_factor`: the schedule's multiplier now."""
    if len(names) != len(groups):
        raise ValueError(f"{len(groups)} optimizer parameter groups, {len(names)} names")
    for name, g in zip(names, groups, strict=True):
        g.update(
            name=name,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay_of(name, weight_decay),
            initial_lr=lr,
            lr=lr * lr_factor,
        )


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then decay to
    min_ratio."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay
