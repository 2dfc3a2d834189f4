"""Settings of `tasks/reward.py` (the config's `reward:` section)."""

from __future__ import annotations

from pydantic import Field

from ..config_section import Section


class RewardConfig(Section):
    margin: float = Field(
        0.0,
        description="Reward models (data.task: reward): the Bradley-Terry loss is -log sigmoid(r_chosen - "
        "r_rejected - margin).",
    )
