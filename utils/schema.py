"""The strict pydantic base every config schema uses, and the one-line form of its validation errors."""

from __future__ import annotations

import difflib
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, each field's docstring is its documentation, and assignments are
    validated like loading."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


def all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``model``, sections included (``train``, ``train.lr``, ...)."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = field.annotation
        for cand in getattr(sub, "__args__", (sub,)):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                keys += all_keys(cand, f"{prefix}{name}.")
    return keys


def one_line(err: ValidationError, model: type[BaseModel], noun: str = "config key") -> str:
    """The first problem of ``err`` (raised validating ``model``) as one line: the dotted key and what is wrong;
    for an unknown key the closest valid one (or the valid keys of that section)."""
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"])  # a newline in it is escaped by UserError, like every message
    if e["type"] == "extra_forbidden":
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        options = [k for k in all_keys(model) if k.startswith(parent) and "." not in k[len(parent):]]
        close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(options)}"
        return f"unknown {noun} '{key}'{hint}"
    if e["type"] == "missing":
        return f"missing {noun} '{key}'"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{key}: {msg}" if key else msg


def validate(model: type[BaseModel], raw: dict, error: type[Exception], noun: str = "config key"):
    """``model.model_validate(raw)``, any problem raised as ``error`` with ``one_line``'s message."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise error(one_line(e, model, noun)) from None


MAX_TOKENS = 2**24  # 16M tokens: the bound on any length or position count in a config
Length = Annotated[int, Field(ge=2, le=MAX_TOKENS)]
"""A context length in tokens."""
Depth = Annotated[float, Field(ge=0.0, le=1.0)]
"""A relative depth in a prompt: 0 is the start, 1 the end."""
