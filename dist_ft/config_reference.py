"""`dist-ft config --reference`: every config key as a Markdown table (the README's config reference; a test
keeps the two in sync)."""

from __future__ import annotations

from pydantic import BaseModel

from .config import Config
from .config_section import section_of


def reference_markdown() -> str:
    """Markdown table of every config key, its type, default and doc (kept in sync with README by a test). A
    union's `|` is escaped: it would end the table cell otherwise."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            sub = section_of(ann)
            key = f"{prefix}{name}"
            if sub is not None:
                walk(sub, key + ".")
                continue
            typ = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            typ = typ.replace("|", "\\|")
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            rows.append(f"| `{key}` | `{typ}` | `{default}` | {f.description} |")

    walk(Config, "")
    return "\n".join(rows) + "\n"
