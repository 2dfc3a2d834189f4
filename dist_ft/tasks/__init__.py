"""Tasks: what is learned. A task is one module here that defines `TASK = Task(...)`:

- `examples(record, where, data_cfg, tok) -> (examples, counters)`: how a record becomes training examples
  (run once, at prepare time; `where` names the file and line for error messages),
- `collate(items, seq_len, pad_id, packing) -> Batch`: how examples (or packed rows of them) become a micro-batch,
- `loss(model, batch, chunk) -> LossOut`: the loss summed over the batch's `n_loss` units, plus metric sums,
- `eval_metrics(loss_sum, n_loss, metric_sums) -> dict`: what evaluation reports,
- `auto_class`: the transformers Auto class of the model (and head) it trains.
Optional: `group` (examples that stay together in one row: 2 for a preference pair), `packable` (False: one
sequence per row, e.g. a head that pools its last token), `scan(records) -> meta` (read the training records once
before tokenizing, e.g. the label set; `examples` then gets `meta=`, and the manifest keeps it), `head(meta)` (the
model's head kwargs, e.g. num_labels), `reference` (per-example log-probs of the starting model are computed once
before training, `reference.py`), `prepare_model(model)` (e.g. dropout off) and `configure(task, cfg) -> Task` (the
task with the run's settings bound, e.g. DPO's beta).

The training loop, evaluation and checkpoints call a task only through these; none branches on its name.
Adding a task is adding a module here (and its tests); `data.task` accepts every module name here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Optional

import torch

from ..config import task_names
from ..contracts import Batch


@dataclass
class LossOut:
    sum: torch.Tensor  # 0-d fp32 on the device: the loss summed over the batch's loss units
    # other sums over the same units, the same keys for every batch: training logs each summed over the step's
    # micro-batches and ranks / n_loss; evaluation hands the sums over the validation set to `eval_metrics`
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str
    examples: Callable[[dict, str, Any, Any], tuple[list, dict]]
    collate: Callable[[list, int, int, bool], Batch]
    loss: Callable[[Any, Batch, int], LossOut]
    eval_metrics: Callable[[float, float, dict], dict]
    group: int = 1
    packable: bool = True
    scan: Optional[Callable[[Any], dict]] = None
    head: Optional[Callable[[dict], dict]] = None
    reference: bool = False
    prepare_model: Optional[Callable[[Any], None]] = None
    configure: Optional[Callable[["Task", Any], "Task"]] = None

    def with_meta(self, meta: dict) -> "Task":
        """This task whose `examples` gets the `meta` its `scan` found (itself where it has no scan)."""
        return replace(self, examples=partial(self.examples, meta=meta)) if self.scan else self


names = task_names  # every task this installation has (module names here, found without importing them)


def get(name: str) -> Task:
    if name not in names():
        from ..errors import UserError

        raise UserError(f"data.task '{name}': no such task (have: {', '.join(names())})")
    return importlib.import_module(f"{__name__}.{name}").TASK


def for_config(cfg) -> Task:
    """The task of `cfg` (data.task) with its settings bound."""
    task = get(cfg.data.task)
    return task.configure(task, cfg) if task.configure else task
