"""The resume rules are declared on the config's fields (`on_resume`, config_section.py) and read by resume.settings(): a
renamed or added field changes these sets here, in a unit test, instead of silently changing what a resume accepts."""

from __future__ import annotations

import pytest

from dist_ft.config import APPLIED, FREE, MUST_MATCH, RESHARD, RESUME_KINDS, Config
from dist_ft.resume import settings

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
        "engine.precision",
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
    assert all(k.split(".")[0] in ("model", "data", "train", "engine") for k in must)


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
