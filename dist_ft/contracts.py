"""The typed values that pass between the pipeline's parts: a micro-batch, what a step measured, and what a
checkpoint restores. Tracker, bench and tests read these fields, never dict keys spelled in several places."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask")


@dataclass
class Batch:
    """One micro-batch, as collated on the host (the loader may pin it; `model_inputs` moves it)."""

    input_ids: torch.Tensor  # [rows, width]
    targets: torch.Tensor  # [rows, width] what each position is scored against (IGNORE = no loss); per task
    # flat positions that carry loss (found on the host: selecting them on a GPU needs no sync)
    loss_index: torch.Tensor
    n_tokens: int  # real tokens (not padding)
    n_loss: int  # loss units the task's loss sums over: loss-bearing tokens for language modelling
    position_ids: torch.Tensor | None = None  # restart at 0 per packed example
    attention_mask: torch.Tensor | None = None  # padded batches only (packed rows use position_ids)
    # task-specific tensors (e.g. which rows form a preference pair)
    extra: dict = field(default_factory=dict)
    lengths: tuple = ()  # every example's token count (packed: each example of each row), for FLOP counting
    # packed rows, for flash-attention's varlen kernel (which reads restarting position_ids only at batch
    # size 1):
    cu_seq_lens: torch.Tensor | None = (
        None  # int32 boundaries over the flattened rows: every example, each row's padding
    )
    max_length: int = 0  # the longest of those segments (a Python int: no device sync)
    # shared prefixes (GRPO's prompts): rows continue prefix row r // (rows / prefixes), computed once
    # (`loss.prefixed_logits`); a row's targets are its own tokens, the first predicted from the prefix's end
    prefix_ids: torch.Tensor | None = None  # [prefixes, width], right-padded
    prefix_mask: torch.Tensor | None = None

    @property
    def n_positions(self) -> int:
        return self.input_ids.numel() + (0 if self.prefix_ids is None else self.prefix_ids.numel())

    def model_inputs(self, device, attn_implementation: str | None = None) -> dict:
        """The model's keyword inputs on `device` (copies are non-blocking from pinned memory). A
        flash-attention implementation also gets the packed rows' boundaries (`cu_seq_lens_q/k`,
        `max_length_q/k`); sdpa and eager build their block-diagonal mask from the position_ids alone."""
        kw = {
            k: getattr(self, k).to(device, non_blocking=True)
            for k in MODEL_INPUTS
            if getattr(self, k) is not None
        }
        if self.cu_seq_lens is not None and "flash" in (attn_implementation or ""):
            kw["cu_seq_lens_q"] = kw["cu_seq_lens_k"] = self.cu_seq_lens.to(device, non_blocking=True)
            kw["max_length_q"] = kw["max_length_k"] = self.max_length
        return kw

    def pin_memory(self) -> Batch:
        pinned = {
            f.name: getattr(self, f.name).pin_memory()
            for f in fields(self)
            if torch.is_tensor(getattr(self, f.name))
        }
        return replace(
            self,
            **pinned,
            extra={k: v.pin_memory() if torch.is_tensor(v) else v for k, v in self.extra.items()},
        )

    def without_loss(self) -> Batch:
        """The same shapes carrying no loss: a rank with no eval rows left still runs the forward pass, so
        collectives (ZeRO-3 gathers) stay in step across ranks."""
        return replace(
            self,
            targets=torch.full_like(self.targets, -100),
            loss_index=self.loss_index[:0],
            n_tokens=0,
            n_loss=0,
        )


@dataclass
class StepMetrics:
    """What one optimizer step measured, summed or averaged over all ranks."""

    loss: float  # mean over the global batch's loss units
    lr: float  # the learning rate this step used
    grad_norm: float | None  # before clipping
    tokens: int  # tokens in the global batch (padding excluded)
    loss_tokens: int  # loss units of the global batch (loss-bearing tokens; pairs, completions)
    padding: float  # fraction of positions that are padding
    tokens_per_s: float  # tokens / step time, over all ranks
    loss_tokens_per_s: float  # loss units / step time, over all ranks
    step_time_s: float  # wall time of the step on rank 0 (sampling included for GRPO)
    mfu: float | None  # model FLOPs utilization; None on CPU / unknown GPUs
    epoch: float  # epochs done after this step
    elapsed_s: float  # since the process started
    skipped_steps: int | None = None  # fp16 loss-scale overflows so far
    memory: dict = field(default_factory=dict)  # rss_mb, or gpu_alloc_mb / gpu_peak_mb
    task: dict = field(default_factory=dict)  # the task's own metrics (e.g. reward accuracy)
    model_states: ModelStates | None = None  # on the step that first measured them
    sources: dict = field(default_factory=dict)  # a mixture's tokens per source (logged as tokens_<name>)

    def record(self) -> dict:
        """The flat JSON object of metrics.jsonl and W&B."""
        nested = ("memory", "task", "model_states", "sources")
        rec = {k: v for k, v in asdict(self).items() if k not in nested}
        if rec["skipped_steps"] is None:
            del rec["skipped_steps"]
        states = self.model_states.record() if self.model_states else {}
        sources = {f"tokens_{k}": v for k, v in self.sources.items()}
        return {**rec, **sources, **self.task, **self.memory, **states}

    @classmethod
    def from_record(cls, rec: dict) -> StepMetrics:
        """A step's metrics read back from metrics.jsonl (memory keys end in _mb; other unknown keys are the
        task's)."""
        own = {f.name for f in fields(cls)} - {"memory", "task", "model_states", "sources"}
        rest = {k: v for k, v in rec.items() if k not in own and k != "step" and not k.startswith("mem_")}
        values: dict[str, Any] = {k: rec.get(k) for k in own}  # the record's JSON values, as read
        return cls(
            **values,
            memory={k: v for k, v in rest.items() if k.endswith("_mb")},
            task={k: v for k, v in rest.items() if not k.endswith("_mb")},
        )


@dataclass
class ModelStates:
    """Bytes one rank holds for parameters, gradients and optimizer state: measured, and by the ZeRO
    formula."""

    n_params: int
    measured: dict  # params / grads / optimizer -> bytes (grads None where not measurable)
    formula: dict
    n_trainable: int | None = None  # where only some parameters train (adapters); None: all of them

    def record(self) -> dict:
        return {
            "params_total": self.n_params,
            "params_trainable": self.n_params if self.n_trainable is None else self.n_trainable,
            **{f"mem_{k}_bytes": v for k, v in self.measured.items()},
            **{f"mem_formula_{k}_bytes": v for k, v in self.formula.items()},
        }


@dataclass
class TrainState:
    """What a checkpoint holds beyond the engine (model, optimizer, LR schedule) and the RNG states."""

    step: int  # optimizer steps done
    data: dict  # the sample stream's position (`SampleStream.state_dict`)
    run_id: str | None = None  # the W&B run a resumed job continues

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(step=d["step"], data=d["data"], run_id=d.get("run_id"))
