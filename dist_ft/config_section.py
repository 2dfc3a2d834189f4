"""The base of every config section: config.py's own (`config_model.py`, `config_data.py`, `config_run.py`)
and each task's settings (`task_settings/`), with what the sections' fields share: their resume rules and the
refusal of URLs with credentials. It sits below all of them, so a task's settings model shares it without
importing config (which composes those models into `Config`)."""

from __future__ import annotations

from typing import Any, ClassVar, get_args

from pydantic import BaseModel, ConfigDict

from .redact import url_secret

# What changing a setting between a checkpoint and its resume does (resume.py reads it from the fields; a
# section's `resume_default` applies to fields without their own, `free` where the section sets none):
MUST_MATCH = "must_match"  # breaks an exact resume: refused
# must match, unless the run reshards (another world size or ZeRO stage, the global batch kept)
RESHARD = "reshard"
APPLIED = "applied"  # applied over the checkpoint's value (the Adam moments and step count kept) and logged
FREE = "free"  # does not change what the continued run computes
# the value it resolved to (recorded in the checkpoint's manifest) must match; `auto` follows the checkpoint
RESOLVED = "resolved"
RESUME_KINDS = (MUST_MATCH, RESHARD, APPLIED, FREE, RESOLVED)


def section_of(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds, through Optional, unions, lists and Annotated (`data.train`: one
    source or a list of them); None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = section_of(arg)
        if found is not None:
            return found
    return None


def on_resume(kind: str) -> dict[str, Any]:
    """A field's resume rule, as `Field(..., json_schema_extra=on_resume(APPLIED))`."""
    assert kind in RESUME_KINDS, kind
    return {"on_resume": kind}


class Section(BaseModel):
    """A config section: an unknown key is an error (with a did-you-mean), and an assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    resume_default: ClassVar[str] = FREE


def no_credentials(cls, v: str | None) -> str | None:
    """Field validator of a path or URL setting (`field_validator("path")(no_credentials)`): the config is
    saved in config.yaml, logs and W&B, so it must hold no secret."""
    what = url_secret(v) if v else None
    if what is not None:
        held = "credentials" if what == "credentials" else f"a token (its '{what}=' query parameter)"
        raise ValueError(
            f"a URL with {held} in it is refused (the config is saved in config.yaml, logs and W&B); remove "
            "them from it and put them in the environment: the storage's own variables, or "
            'DIST_FT_STORAGE_OPTIONS=\'{"key": ..., "secret": ...}\''
        )
    return v
