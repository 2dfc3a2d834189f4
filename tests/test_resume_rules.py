"""The resume rules are declared on the config's fields (`on_resume`, config_section.py) and read by resume.settings(): a
renamed or added field changes these sets here, in a unit test, instead of silently changing what a resume accepts."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from dist_ft import precision as prec
from dist_ft.checkpoint import Manifest
from dist_ft.config import APPLIED, FREE, MUST_MATCH, RESHARD, RESOLVED, RESUME_KINDS, Config, dump_config
from dist_ft.errors import UserError
from dist_ft.resume import resume_plan, settings

pytestmark = pytest.mark.unit


def _keys(rule: str) -> set[str]:
    return {s.key for s in settings() if s.rule == rule}


def test_every_setting_has_a_known_rule_and_every_field_is_covered():
    got = settings()
    assert {s.rule for s in got} <= set(RESUME_KINDS)
    leaves = {f"{sec}.{name}" for sec, f in Config.model_fields.items() for name in f.annotation.model_fields}
    assert {s.key for s in got} == leaves


def test_exactness_settings_must_match():
    assert _keys(RESHARD) == {"train.micro_batch_size", "train.grad_accum", "engine.zero_stage"}
    must = _keys(MUST_MATCH)
    assert {
        "train.seed",
        "model.path",
        "model.peft",
        "data.train",
        "data.max_seq_len",
        "data.packing",
        "data.seed",
        "data.task",
    } <= must
    assert not must & {
        "data.cache_dir",
        "data.num_proc",
        "data.verify_shards",
    }  # where shards live does not change them
    assert all(k.split(".")[0] in ("model", "data", "train", "engine", "grpo") for k in must)
    # what GRPO samples and optimizes (μ decides the schedule too); how often it writes a table does not
    assert {"grpo.num_iterations", "grpo.group_size", "grpo.rewards", "grpo.loss"} <= must
    assert "grpo.samples_every" not in must


def test_optimizer_and_schedule_settings_are_applied():
    assert _keys(APPLIED) == {
        f"train.{k}"
        for k in (
            "lr",
            "betas",
            "eps",
            "weight_decay",
            "warmup_steps",
            "schedule",
            "min_lr_ratio",
            "max_grad_norm",
            "max_steps",
            "epochs",
        )
    }
    assert {"checkpoint.every_steps", "output.dir", "track.wandb", "data.cache_dir"} <= _keys(FREE)


def test_rules_compare_typed_values():
    a = Config.model_validate({"data": {"train": "x.jsonl"}})
    b = a.model_copy(update={"train": a.train.model_copy(update={"lr": 1.0})})
    lr = next(s for s in settings() if s.key == "train.lr")
    assert lr.of(a) == 2e-5 and lr.of(b) == 1.0


# ---------------------------------------------------------------- the precision a resume continues in


def _checkpoint(out, saved_precision: str, recorded: str) -> None:
    """A complete checkpoint as far as resume's decision reads one: config.yaml, a manifest that lists it (and
    records `recorded`, "" as manifests did before they recorded it) and the COMPLETE marker."""
    step = out / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    cfg = Config.model_validate(
        {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output": {"dir": str(out)}}
    )
    cfg.engine.precision = saved_precision
    (step / "config.yaml").write_text(dump_config(cfg))
    files = {"config.yaml": (step / "config.yaml").stat().st_size}
    (step / "manifest.json").write_text(json.dumps(asdict(Manifest(2, 1, 0, files, precision=recorded))))
    (step / "COMPLETE").write_text("ok\n")


def _plan(out, precision: str):
    cfg = Config.model_validate(
        {
            "model": {"path": "m"},
            "data": {"train": "t.jsonl"},
            "output": {"dir": str(out)},
            "engine": {"precision": precision},
        }
    )
    return resume_plan(cfg, 0, 1)


@pytest.fixture
def bf16_native_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)


def test_precision_is_the_resolved_value_recorded_in_the_checkpoint(tmp_path, bf16_native_cpu):
    assert _keys(RESOLVED) == {"engine.precision"}
    # a fresh start resolves engine.precision (auto: bf16-autocast at ZeRO 0-2 on this CPU)
    assert _plan(tmp_path / "fresh", "auto").precision == prec.AUTOCAST
    # a checkpoint trained in bf16 (auto resolved it so then): auto continues in bf16, as does an explicit bf16
    _checkpoint(tmp_path / "a", "auto", "bf16")
    for asked in ("auto", "bf16"):
        plan = _plan(tmp_path / "a", asked)
        assert plan.path is not None and plan.precision == "bf16", asked
    # another explicit precision is refused in one line naming both and the way out
    with pytest.raises(UserError) as e:
        _plan(tmp_path / "a", prec.AUTOCAST)
    msg = str(e.value)
    assert "\n" not in msg and "trained in bf16" in msg and "engine.precision: bf16-autocast" in msg
    assert "set engine.precision to bf16 or auto" in msg
    # a manifest from before the record: the saved config's auto meant bf16 then
    _checkpoint(tmp_path / "old", "auto", "")
    assert _plan(tmp_path / "old", "auto").precision == "bf16"
    with pytest.raises(UserError, match="trained in bf16"):
        _plan(tmp_path / "old", "fp32")
    # ... and an explicit saved value is what it trained in
    _checkpoint(tmp_path / "old32", "fp32", "")
    assert _plan(tmp_path / "old32", "auto").precision == "fp32"


def test_a_recorded_fp16_run_resumes_only_where_fp16_runs(tmp_path, bf16_native_cpu):
    _checkpoint(tmp_path, "auto", "fp16")
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        _plan(tmp_path, "auto")
