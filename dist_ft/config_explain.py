"""Pydantic validation errors of a config, told as one line each: the key, what is wrong, and a
did-you-mean."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from .config_data import UNION_TAGS
from .config_section import section_of
from .redact import scrub


def _fields_at(loc: tuple, root) -> list[str]:
    """Field names valid at the parent of `loc` (for did-you-mean)."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = section_of(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def explain(err: ValidationError, source: str, root) -> str:
    """One line per validation error of `root` (the Config class): the key, what is wrong, and a
    did-you-mean."""
    lines = []
    for e in err.errors():
        loc = tuple(
            p for p in e["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in UNION_TAGS))
        )
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc, root), n=1, cutoff=0.5)
            hint = (
                f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?"
                if close
                else f"; valid keys here: {', '.join(_fields_at(loc, root))}"
            )
            lines.append(f"{source}: unknown config key '{key}'{hint}")
        elif not loc:  # a rule across sections: its message names the keys
            lines.append(f"{source}: {e['msg'].replace('Value error, ', '')}")
        elif e["type"] == "model_type":
            lines.append(
                f"{source}: config key '{key}' must be a section (a mapping such as {loc[-1]}: {{...}}), "
                f"got {e.get('input')!r}"
            )
        elif e["type"] == "missing":
            lines.append(f"{source}: missing required config key '{key}'")
        else:
            got = e.get("input")
            msg = e["msg"].replace("Value error, ", "")
            lines.append(f"{source}: config key '{key}': {msg} (got {got!r})")
    return scrub("; ".join(lines))  # a refused URL's credentials or tokens are never echoed
