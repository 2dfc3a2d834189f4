"""The task contract (dist_ft/tasks): typed record stats, per-class metric sums that keep their logged names, each
task's settings composed into the config, and no task importing another's module. In-process: unit tier."""

import ast
import pkgutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_ft import task_settings, tasks
from dist_ft.config import Config, DataConfig, ModelConfig, load_config
from dist_ft.config_section import Section
from dist_ft.data.chat import IGNORE, Example
from dist_ft.data.shards.manifest import SplitStats
from dist_ft.tasks import LossOut, MetricSums, classify
from dist_ft.tokenizer import load_tokenizer

pytestmark = pytest.mark.unit

CHAT = {
    "messages": [
        {"role": "user", "content": "What color is the apple?"},
        {"role": "assistant", "content": "Red, mostly."},
    ]
}


def test_every_task_is_a_task_and_every_settings_model_is_composed_into_the_config():
    for name in tasks.names():
        assert isinstance(tasks.get(name), tasks.Task) and tasks.get(name).name == name
    owned = [m.name for m in pkgutil.iter_modules(task_settings.__path__)]
    assert {"dpo", "reward"} <= set(owned)
    for name in owned:
        assert name in tasks.names(), f"task_settings/{name}.py: no task {name} owns it"
        model = Config.model_fields[name].annotation  # composed as cfg.<task>
        assert issubclass(model, Section) and model.__module__ == f"dist_ft.task_settings.{name}"
    cfg = load_config(None, ["data.train=x.jsonl", "dpo.beta=0.25", "dpo.loss=ipo", "reward.margin=0.5"])
    assert (cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.label_smoothing, cfg.reward.margin) == (0.25, "ipo", 0.0, 0.5)
    with pytest.raises(Exception, match="unknown config key 'dpo.betta'; did you mean 'dpo.beta'"):
        load_config(None, ["data.train=x.jsonl", "dpo.betta=1"])


def test_no_task_imports_another_tasks_module():
    """What tasks share is in tasks/_shared.py or tasks/_lm.py, never in a sibling task."""
    pkg = Path(tasks.__path__[0])
    names = set(tasks.names())
    for name in names:
        tree = ast.parse((pkg / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported = {node.module} if node.module else {a.name for a in node.names}
                assert not imported & names, f"tasks/{name}.py imports task {imported & names}"


def test_examples_return_the_records_typed_stats(gpt2_dir):
    tok = load_tokenizer(ModelConfig(path=str(gpt2_dir)))
    sft = tasks.get("sft")
    exs, stats = sft.examples(CHAT, "r:1", DataConfig(train="x"), tok)
    assert stats == SplitStats(records=1, examples=1, tokens=len(exs[0].input_ids), loss_tokens=exs[0].n_loss)
    n = len(exs[0].input_ids)
    cut, stats = sft.examples(CHAT, "r:1", DataConfig(train="x", max_seq_len=n - 1), tok)
    assert cut[0].input_ids == exs[0].input_ids[: n - 1]
    assert stats == SplitStats(records=1, examples=1, tokens=n - 1, loss_tokens=cut[0].n_loss, truncated=1)
    _, stats = sft.examples(CHAT, "r:1", DataConfig(train="x", max_seq_len=n - 1, overlong="drop"), tok)
    assert stats == SplitStats(records=1, dropped_overlong=1)
    # the answer starts after 8 tokens
    _, stats = sft.examples(CHAT, "r:1", DataConfig(train="x", max_seq_len=8), tok)
    assert stats == SplitStats(records=1, truncated=1, dropped_no_loss_after_truncation=1)
    # summed as the manifest sums them, written with the same keys
    assert (stats + stats).to_json() == {
        "records": 2,
        "examples": 0,
        "tokens": 0,
        "loss_tokens": 0,
        "truncated": 2,
        "dropped_overlong": 0,
        "dropped_no_loss_after_truncation": 2,
    }


def _old_classify_metrics(logits, y):
    """The encoding before per-class sums were typed: a 0-d sum per class under `true_{c}` / `pred_{c}` / `tp_{c}`."""
    pred = logits.argmax(-1)
    m = {"accuracy": (pred == y).double().sum()}
    for c in range(logits.shape[1]):
        m[f"true_{c}"], m[f"pred_{c}"] = (y == c).double().sum(), (pred == c).double().sum()
        m[f"tp_{c}"] = ((pred == c) & (y == c)).double().sum()
    return m


def _old_classify_eval(loss_sum, n, sums):
    classes = sorted(int(k[5:]) for k in sums if k.startswith("true_"))
    f1 = [
        2 * sums[f"tp_{c}"] / (sums[f"true_{c}"] + sums[f"pred_{c}"])
        for c in classes
        if sums[f"true_{c}"] + sums[f"pred_{c}"] > 0
    ]
    out = {
        "val_loss": loss_sum / max(n, 1),
        "val_accuracy": sums["accuracy"] / max(n, 1),
        "val_macro_f1": sum(f1) / max(1, len(f1)),
    }
    return {**out, **{f"val_count_{c}": int(sums[f"true_{c}"]) for c in classes}}


class _Head:
    """A sequence head whose output is fixed logits."""

    device = torch.device("cpu")

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, **inputs):
        return SimpleNamespace(logits=self.logits)


@pytest.mark.parametrize("n_classes", [3, 12])  # 12: class 10 sorts before class 2 by name, as logged
def test_classify_per_class_sums_are_typed_and_logged_under_the_same_names(n_classes):
    g = torch.Generator().manual_seed(n_classes)
    rows = 40
    y = torch.randint(0, n_classes - 1, (rows,), generator=g)  # the last class never occurs: no F1 for it
    logits = torch.randn(rows, n_classes, generator=g)
    model = _Head(logits)
    items = [Example([5, 6, int(c)], [IGNORE, IGNORE, int(c)]) for c in y]
    out = classify.loss(model, classify.collate(items, 64, 0, False), 0)
    assert (
        isinstance(out, LossOut)
        and out.metrics["true"].shape == (n_classes,)
        and out.metrics["accuracy"].dim() == 0
    )
    old = _old_classify_metrics(logits, y)

    # training's step: summed over micro-batches (here one twice) and ranks, then / loss units, by name
    sums = {k: 2 * v.double() for k, v in out.metrics.items()}
    reduced = [float(v) for v in MetricSums.elements(sums)]  # what the all-reduce hands back
    record = MetricSums.read(sums, reduced).record(2 * rows)
    want = {k: float(2 * v) / (2 * rows) for k, v in sorted(old.items())}
    assert list(record) == list(want) and record == want

    # evaluation: the same numbers as the name-parsing eval_metrics gave
    got = classify.eval_metrics(12.5, rows, MetricSums.read(out.metrics))
    assert got == _old_classify_eval(12.5, rows, {k: float(v) for k, v in old.items()})
    assert list(got)[3:] == [f"val_count_{c}" for c in range(n_classes)]


def test_metric_sums_read_scalars_and_per_class_vectors():
    sums = {"b": torch.tensor(2.0, dtype=torch.float64), "a": torch.tensor([1.0, 3.0], dtype=torch.float64)}
    assert [float(x) for x in MetricSums.elements(sums)] == [
        1.0,
        3.0,
        2.0,
    ]  # names in order, a vector's items in order
    assert MetricSums.read(sums) == MetricSums(scalar={"b": 2.0}, per_class={"a": [1.0, 3.0]})
    assert MetricSums.read(sums, [10.0, 30.0, 20.0]) == MetricSums(
        scalar={"b": 20.0}, per_class={"a": [10.0, 30.0]}
    )
    assert MetricSums.read({}) == MetricSums() and MetricSums().record(3) == {}
