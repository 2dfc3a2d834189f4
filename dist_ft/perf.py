"""Memory and throughput accounting: the ZeRO model-state formula (measured bytes come from the engine),
RSS/GPU memory, executed FLOPs and MFU."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# dense bf16/fp16 tensor-core peak FLOP/s per GPU (vendor datasheets), most specific name first (the device
# name is matched by substring: "NVIDIA H100 PCIe" must not take the SXM figure);
# MFU is not shown for others/CPU
PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "GH200": 989e12,
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
}


def expected_model_state_bytes(
    n_params: int, stage: int, world: int, precision: str, n_trainable: int | None = None
) -> dict:
    """Per-rank bytes by the ZeRO paper: mixed precision 2Ψ params + 2Ψ grads + 12Ψ optimizer (fp32 master,
    m, v); in fp32, 4Ψ + 4Ψ + 8Ψ (m, v; DeepSpeed adds a 4Ψ/N fp32 master partition at stages 1-2). Gradients
    and optimizer states exist only for the `n_trainable` parameters (an adapter's), all weights are held.
    bf16 at ZeRO 1-3 accumulates gradients in fp32 (`grad_accum_dtype`), so 4Ψ grads there."""
    kp, kg, ko = (
        (4, 4, 8)
        if precision in ("fp32", "bf16-autocast")
        else (2, 4 if precision == "bf16" and stage >= 1 else 2, 12)
    )
    t = n_params if n_trainable is None else n_trainable
    return {
        "params": kp * n_params / (world if stage >= 3 else 1),
        "grads": kg * t / (world if stage >= 2 else 1),
        "optimizer": ko * t / (world if stage >= 1 else 1),
    }


def device_memory_mb() -> dict:
    if torch.cuda.is_available():
        return {
            "gpu_alloc_mb": torch.cuda.memory_allocated() / 2**20,
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20,
        }
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


# executed FLOPs of a training step (MFU's numerator); bench/gpu.py prints this line
FLOP_FORMULA = (
    "FLOPs = (4*N_mm + 2*N_mm_trainable)*tokens + (4*N_head + 2*N_head_trainable)*loss_positions"
    " + 3*4*L*d_attn*sum(n*(n+1)/2 over examples of n tokens)"
)


@dataclass(frozen=True)
class FlopCount:
    """The FLOPs one training step executes, from the model's matmul weights and each example's real length.

    Per real token, forward 2 FLOPs per matmul weight (N_mm: every Linear / Conv1D weight, attention, MLP and
    adapters; the input embedding is a lookup, biases and norms are not matmuls); backward 2 N_mm for the
    activation gradients plus 2 N_mm_trainable for the weight gradients (LoRA: the adapters only). The output
    layer (N_head = vocab x hidden; a tied one counts, it is a matmul) runs only at loss positions (loss.py
    selects them first), with the same three terms. Attention, causal: a token at position i of its example
    attends to i + 1 keys, so an n-token example has n(n+1)/2 (query, key) pairs (plus n x the prefix-tuning
    virtual tokens), each 2 d_attn FLOPs for q.k and 2 for p.v per layer; backward is twice the forward.
    Padding is not counted; activation recomputation (gradient checkpointing) is not either: this is model
    FLOPs, not hardware FLOPs."""

    matmul: int
    matmul_trainable: int
    head: int
    head_trainable: int
    layers: int
    attn_width: int  # query heads x head dim: the inner size of q.k and p.v
    prefix: int = 0  # prefix tuning's virtual tokens, keys every position also attends to

    @classmethod
    def of(cls, model) -> FlopCount:
        """From the model's modules (full shapes under ZeRO-3: `ds_numel`) and config;
        works on the meta device."""
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if get_head is not None else None
        in_head = {id(m) for m in head.modules()} if head is not None else set()
        # (in the output layer, trainable) -> weights
        n = {(h, t): 0 for h in (False, True) for t in (False, True)}
        for name, m in model.named_modules():
            if not isinstance(m, torch.nn.Linear) and type(m).__name__ != "Conv1D":
                continue
            # peft keeps a trained head's frozen original beside the copy that runs
            if "original_module" in name.split("."):
                continue
            size = getattr(m.weight, "ds_numel", m.weight.numel())
            n[id(m) in in_head, False] += size
            n[id(m) in in_head, True] += size if m.weight.requires_grad else 0
        c = model.config
        heads = getattr(c, "num_attention_heads", 0) or getattr(c, "n_head", 1)
        head_dim = (
            getattr(c, "head_dim", 0) or (getattr(c, "hidden_size", 0) or getattr(c, "n_embd", 0)) // heads
        )
        peft = getattr(model, "active_peft_config", None)
        return cls(
            n[False, False],
            n[False, True],
            n[True, False],
            n[True, True],
            getattr(c, "num_hidden_layers", 0) or getattr(c, "n_layer", 0),
            heads * head_dim,
            getattr(peft, "num_virtual_tokens", 0) if getattr(peft, "is_prompt_learning", False) else 0,
        )

    def flops(self, tokens: float, loss_positions: float, causal_pairs: float) -> float:
        """Forward + backward FLOPs over `tokens` real tokens, the output layer at `loss_positions` of them,
        and `causal_pairs` attention (query, key) pairs (the sum of n(n+1)/2 over examples of n tokens)."""
        return (
            (4 * self.matmul + 2 * self.matmul_trainable) * tokens
            + (4 * self.head + 2 * self.head_trainable) * loss_positions
            + 3 * 4 * self.layers * self.attn_width * causal_pairs
        )

    def batch_flops(self, batch) -> float:
        """One micro-batch (`contracts.Batch`): its real example lengths and the positions its loss runs
        the output layer on."""
        pairs = sum(n * (n + 1) // 2 + n * self.prefix for n in batch.lengths)
        return self.flops(batch.n_tokens, batch.loss_index.numel(), pairs)

    def per_token(self, batches) -> float:
        """Executed FLOPs per real token of `batches` (this rank's micro-batches of a step)."""
        return sum(self.batch_flops(b) for b in batches) / max(sum(b.n_tokens for b in batches), 1)


def peak_flops(device_name: str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of the named GPU (default: this rank's); None on CPU or an unknown GPU."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def format_table(expected: dict, measured: dict) -> str:
    mb = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f} MB"  # noqa: E731
    return " | ".join(
        f"{k} {mb(measured[k])} (formula {mb(expected[k])})" for k in ("params", "grads", "optimizer")
    )
