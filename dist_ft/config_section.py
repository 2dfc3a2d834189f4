"""The base of every config section: config.py's own and each task's settings (`task_settings/`). It sits below
both, so a task's settings model shares it without importing config (which composes those models into `Config`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: an unknown key is an error (with a did-you-mean), and an assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
