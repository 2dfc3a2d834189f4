"""Settings of `tasks/dpo.py` (the config's `dpo:` section)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config_section import Section


class DpoConfig(Section):
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="`sigmoid`: DPO's -log sigmoid(beta * margin); `ipo`: (margin - 1/(2 beta))^2 on "
        "per-token mean log-probs.",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the pull toward the reference (higher: stay closer); rewards are beta x "
        "log-ratio.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="sigmoid loss: assumed probability that a pair's preference label is flipped "
        "(conservative DPO).",
    )
