"""Tasks: what is learned. A task is one module here that defines `TASK = Task(...)`; the `Task` fields are
typed callables, so the type checker holds every task to this contract:

- `examples(record, where, data_cfg, tok) -> (examples, SplitStats)`: how a record becomes training examples
  and what that did (the record's counts: examples, tokens, truncated, dropped; summed into the manifest's
  stats). Run once, at prepare time; `where` names the file and line for error messages,
- `collate(items, seq_len, pad_id, packing) -> Batch`: how examples (or rows of them: packed, or a task's
  groups) become a micro-batch,
- `loss(model, batch, chunk) -> LossOut`: the loss summed over the batch's `n_loss` units, plus metric sums (a
  number each, or one per class),
- `eval_metrics(loss_sum, n_loss, MetricSums) -> dict`: what evaluation reports,
- `auto_class`: the transformers Auto class of the model (and head) it trains.
Optional: `group` (examples that stay together in one row: 2 for a preference pair), `packable` (False: one
sequence per row, e.g. a head that pools its last token), `scan(records) -> meta` (read the training records
once before tokenizing, e.g. the label set; `examples` then gets `meta=`, and the manifest keeps it),
`head(meta)` (the model's head kwargs, e.g. num_labels), `reference` (per-example log-probs of the starting
model are computed once before training, `reference.py`), `prepare_model(model)` (e.g. dropout off),
`configure(task, cfg) -> Task` (the task with the run's settings bound, e.g. DPO's beta) and
`rollout(model, batches) -> batches` (online tasks: the step's collated micro-batches made into what the loss
reads, with the model as it is now, before any loss of the step: GRPO samples and scores completions there;
with `live_reference`, setup builds a frozen engine of the starting model and binds it as `reference=`;
`passes`: optimizer steps per training step over the same batches - GRPO's μ - whose schedule counts them).

A task's own settings (the config's `<task>:` section) are a model in `task_settings/<task>.py`, which config
composes as `cfg.<task>` (there, below config, so the import graph stays acyclic); `configure` reads them.
What several tasks share is in `_shared` (record stats, preference-pair examples, head scores) and `_lm` (the
token-level language-modelling pieces); a task never imports another task's module.

The training loop, evaluation and checkpoints call a task only through these; none branches on its name.
Adding a task is adding a module here (and its tests; with settings, their model too); `data.task` accepts
every module name here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..config import Config, DataConfig, task_names
from ..contracts import Batch
from ..data.chat import Example
from ..data.shards.manifest import SplitStats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Meta = dict[str, Any]  # what a task's scan found in the training records (JSON: the manifest keeps it)
# what collate gets per row: an example, or a row's (packed rows, a task's groups)
Item = Example | list[Example]


class Model(Protocol):
    """What a task's loss calls: a transformers model, or the training engine (`engine.Engine`, called like
    one)."""

    @property
    def device(self) -> torch.device: ...

    def __call__(self, **inputs: Any) -> Any: ...


@dataclass
class LossOut:
    sum: torch.Tensor  # 0-d fp32 on the device: the loss summed over the batch's loss units
    # other sums over the same units, the same keys and shapes for every batch: 0-d, or 1-d per class (index =
    # class id). Training logs each summed over the step's micro-batches and ranks / n_loss
    # (`MetricSums.record`); evaluation hands the sums over the validation set to `eval_metrics` (as
    # `MetricSums`)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricSums:
    """A task's metric sums (`LossOut.metrics` added up over batches, and ranks) on the host: one number per
    name (`scalar`), and one per class for the per-class ones (`per_class[name][class id]`)."""

    scalar: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, list[float]] = field(default_factory=dict)

    @staticmethod
    def elements(sums: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Every number of `sums` as a 0-d tensor (still on the device), in the order `read` takes them back:
        what one all-reduce sums over the ranks."""
        return [x for k in sorted(sums) for x in sums[k].reshape(-1).unbind()]

    @classmethod
    def read(cls, sums: Mapping[str, torch.Tensor], values: Sequence[float] | None = None) -> MetricSums:
        """`sums` as typed host numbers: `values` where given (`elements(sums)` after an all-reduce), else
        their own."""
        if values is None:
            own = cls.elements(sums)
            values = torch.stack(own).tolist() if own else []  # one host sync
        flat = list(values)
        scalar, per_class, i = {}, {}, 0
        for k in sorted(sums):
            n = sums[k].numel()
            if sums[k].dim() == 0:
                scalar[k] = flat[i]
            else:
                per_class[k] = flat[i : i + n]
            i += n
        return cls(scalar, per_class)

    def record(self, n: float) -> dict[str, float]:
        """Each sum / `n` under its metrics.jsonl name, in name order: a number by its name, a per-class one
        as `{name}_{class id}`."""
        flat = {
            **self.scalar,
            **{f"{k}_{c}": v for k, vs in self.per_class.items() for c, v in enumerate(vs)},
        }
        return {k: flat[k] / n for k in sorted(flat)}


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str
    examples: Callable[[dict, str, DataConfig, PreTrainedTokenizerBase], tuple[list[Example], SplitStats]]
    collate: Callable[[Sequence[Item], int, int, bool], Batch]
    loss: Callable[[Model, Batch, int], LossOut]
    eval_metrics: Callable[[float, float, MetricSums], dict[str, float]]
    group: int = 1
    packable: bool = True
    scan: Callable[[Iterable[tuple[str, dict]]], Meta] | None = None
    head: Callable[[Meta], dict[str, Any]] | None = None
    reference: bool = False
    prepare_model: Callable[[torch.nn.Module], None] | None = None
    configure: Callable[[Task, Config], Task] | None = None
    rollout: Callable[..., list[Batch]] | None = None
    live_reference: bool = False
    passes: int = 1

    def with_meta(self, meta: Meta) -> Task:
        """This task whose `examples` gets the `meta` its `scan` found (itself where it has no scan: a task
        with a scan takes `meta=` in its examples)."""
        examples: Callable[..., tuple[list[Example], SplitStats]] = self.examples
        return replace(self, examples=partial(examples, meta=meta)) if self.scan else self


names = task_names  # every task this installation has (module names here, found without importing them)


def get(name: str) -> Task:
    if name not in names():
        from ..errors import UserError

        raise UserError(f"data.task '{name}': no such task (have: {', '.join(names())})")
    return importlib.import_module(f"{__name__}.{name}").TASK


def for_config(cfg: Config) -> Task:
    """The task of `cfg` (data.task) with its settings bound."""
    task = get(cfg.data.task)
    return task.configure(task, cfg) if task.configure else task
