"""Memory and throughput accounting: the ZeRO model-state formula (measured bytes come from the engine), RSS/GPU memory, MFU."""

from __future__ import annotations

import functools

import torch

# dense bf16/fp16 tensor-core peak FLOP/s per GPU (vendor datasheets), most specific name first (the device
# name is matched by substring: "NVIDIA H100 PCIe" must not take the SXM figure); MFU is not shown for others/CPU
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "GH200": 989e12, "H200": 989e12, "H100": 989e12, "H800": 989e12,
              "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12}


def expected_model_state_bytes(n_params: int, stage: int, world: int, precision: str, n_trainable: int | None = None) -> dict:
    """Per-rank bytes by the ZeRO paper: mixed precision 2Ψ params + 2Ψ grads + 12Ψ optimizer (fp32 master,
    m, v); in fp32, 4Ψ + 4Ψ + 8Ψ (m, v; DeepSpeed adds a 4Ψ/N fp32 master partition at stages 1-2). Gradients
    and optimizer states exist only for the `n_trainable` parameters (an adapter's), all weights are held."""
    kp, kg, ko = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    t = n_params if n_trainable is None else n_trainable
    return {"params": kp * n_params / (world if stage >= 3 else 1),
            "grads": kg * t / (world if stage >= 2 else 1),
            "optimizer": ko * t / (world if stage >= 1 else 1)}


def device_memory_mb() -> dict:
    if torch.cuda.is_available():
        return {"gpu_alloc_mb": torch.cuda.memory_allocated() / 2**20, "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    import psutil

    return {"rss_mb": psutil.Process().memory_info().rss / 2**20}


def process_age_s() -> float:
    """Seconds since this process started (time-to-first-step and friends); called every step."""
    import time

    return time.time() - _process_start()


@functools.cache
def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def flops_per_token(model_config, n_params: int, seq_len: int) -> float:
    """6N + 12·L·H·Q·T (PaLM appendix B): dense matmuls plus attention over a T-token context."""
    c = model_config
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", 0)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", 1)
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", 0)
    return 6 * n_params + 12 * layers * heads * (hidden // max(heads, 1)) * seq_len


def peak_flops(device_name: str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of the named GPU (default: this rank's); None on CPU or an unknown GPU."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def format_table(expected: dict, measured: dict) -> str:
    mb = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f} MB"  # noqa: E731
    return " | ".join(f"{k} {mb(measured[k])} (formula {mb(expected[k])})" for k in ("params", "grads", "optimizer"))
