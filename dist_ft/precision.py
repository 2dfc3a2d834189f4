"""Which precision a run trains in, and what each one means (nothing here imports DeepSpeed; `engine.py` turns
the choice into DeepSpeed's config).

- `fp32`: fp32 weights, gradients and Adam states (16 B/param at ZeRO-0).
- `bf16`: DeepSpeed's bf16 mode: the module's weights are bf16, the optimizer keeps fp32 master copies and
  gradients are summed in fp32 (ZeRO 1-3; refused at ZeRO-0 with grad_accum > 1). 2 + 4 + 12 = 18 B/param at
  ZeRO-0 (2 + 2 + 12 with bf16 gradients), the least at ZeRO 1-3 where the 12 are sharded. The masters start
  from the checkpoint's fp32 weights, not from their bf16 rounding (`fp32_sources`; ZeRO-3: `file_fp32`).
- `bf16-autocast`: fp32 weights, gradients and Adam states, the forward run under `torch.autocast(bfloat16)`
  (DeepSpeed's `torch_autocast`, what HF Trainer / TRL do): 4 + 4 + 8 = 16 B/param plus bf16 copies of the
  weights and activations a matmul casts. Updates smaller than bf16's resolution reach the weights the forward
  uses.
- `fp16`: GPU only, DeepSpeed's dynamic loss scaling.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .errors import UserError

AUTOCAST = "bf16-autocast"


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_has_native_bf16() -> bool:
    """bf16 tensor cores: compute capability 8.0+ (A100, H100, L40S, RTX 30xx+). `is_bf16_supported()` alone
    also says yes on V100 / T4 (7.x), where bf16 is emulated: slow, and no better than fp16 with loss scaling
    there."""
    return torch.cuda.get_device_capability() >= (8, 0) and torch.cuda.is_bf16_supported()


def resolve(requested: str, zero_stage: int = 0, offload_optimizer: bool = False) -> str:
    """The precision a fresh run trains in. `auto`, where bf16 is native (GPU compute capability 8+, CPU with
    AVX512-BF16/AMX): `bf16-autocast` at ZeRO 0-2 (it learns like fp32 at fine-tuning learning rates, at the
    memory and speed of `bf16` there: bench/precision.py), `bf16` at ZeRO-3 or with the optimizer offloaded,
    where memory decides (autocast keeps 4 B/param of weights and unsharded bf16 copies); fp16 with loss
    scaling on older GPUs; else fp32. A resumed run continues in the precision its checkpoint records
    (resume.py)."""
    on_gpu = torch.cuda.is_available()
    if requested == "auto":
        if on_gpu and not gpu_has_native_bf16():
            return "fp16"  # with DeepSpeed's dynamic loss scaling
        # emulated bf16 on CPUs without AVX512-BF16/AMX is many times slower than fp32
        if not on_gpu and not cpu_has_native_bf16():
            return "fp32"
        return "bf16" if zero_stage == 3 or offload_optimizer else AUTOCAST
    if requested == "fp16" and not on_gpu:
        raise UserError(
            "engine.precision: fp16 needs a GPU (the CPU accelerator has no fp16 loss-scaling path); use "
            "fp32 or bf16"
        )
    return requested


def resolved_before_recorded(requested: str) -> str:
    """What a checkpoint written before manifests recorded the precision was trained in: its config's explicit
    value, or what `auto` picked then (bf16 wherever it now picks bf16-autocast)."""
    got = resolve(requested)
    return "bf16" if requested == "auto" and got == AUTOCAST else got


def torch_dtype(precision: str) -> torch.dtype:
    """The dtype of the module's weights while training."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, AUTOCAST: torch.float32}[
        precision
    ]


def autocast_section(precision: str) -> dict:
    """DeepSpeed's `torch_autocast` config: bf16 compute over fp32 weights. No module's gradients are marked
    for bf16 communication (DeepSpeed's default marks nn.Linear's): reductions stay fp32, like the fp32
    accumulators."""
    if precision != AUTOCAST:
        return {}
    return {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}


def fp32_sources(model, precision: str, zero_stage: int) -> list:
    """(parameter, its fp32 tensor) of every trainable fp32 parameter, taken before DeepSpeed casts the module
    to bf16, so the optimizer's fp32 masters can start from these instead of their bf16 rounding. Empty where
    nothing is cast (fp32, autocast). Under ZeRO-3 only what was made after `zero.Init` (adapters; an
    embedding grown from bf16 rows, whose stored rows `file_fp32` then replaces): the parameters it
    partitioned at load are already bf16 (`file_fp32` reads theirs)."""
    if precision not in ("bf16", "fp16"):
        return []
    return [
        (p, p.data)
        for p in model.parameters()
        if p.requires_grad and p.dtype == torch.float32 and not (zero_stage == 3 and hasattr(p, "ds_id"))
    ]


def file_keys(name: str, prefix: str) -> list[str]:
    """Where parameter `name` may be stored in a checkpoint: as named, without or with the model's
    `base_model_prefix` (hub GPT-2 stores `h.0...` for `transformer.h.0...`), outside peft's wrapper."""
    name = name.removeprefix("base_model.model.")
    out = [name]
    if prefix and name.startswith(prefix + "."):
        out.append(name[len(prefix) + 1 :])
    elif prefix:
        out.append(f"{prefix}.{name}")
    return out


def file_fp32(model, files: dict[str, str]) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(ZeRO-3 parameter, its fp32 tensor read from the model's safetensors `files`), one at a time (read as
    iterated, after `deepspeed.initialize`), for every trainable parameter the files hold: `zero.Init`
    partitioned them in bf16, and an embedding grown for new tokens was rebuilt from those bf16 rows. A
    parameter the files lack (an adapter, a new head) is left out; one with more rows than its tensor gets its
    stored rows. The order is the same on every rank (gathering a ZeRO-3 master is collective)."""
    from safetensors import safe_open

    prefix = getattr(model, "base_model_prefix", "") or getattr(
        getattr(model, "base_model", None), "base_model_prefix", ""
    )
    todo = []
    for name, p in model.named_parameters():
        key = next((k for k in file_keys(name, prefix) if k in files), None)
        if p.requires_grad and key is not None:
            todo.append((p, key))

    def read():
        handles: dict = {}
        for p, key in todo:
            if files[key] not in handles:
                handles[files[key]] = safe_open(files[key], "pt")
            t = handles[files[key]].get_tensor(key)
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if t.shape == shape or (
                t.dim() == len(shape) and t.shape[1:] == shape[1:] and t.shape[0] < shape[0]
            ):
                yield p, t.float()

    return read()
