"""One way to declare a recipe field: a default plus help text kept in the field's metadata.

Every section of the recipe is a dataclass whose fields are declared with :func:`param`, so that
``igrpo config show --help-fields`` and error messages can quote what a field means.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any


def param(default: Any = dataclasses.MISSING, *, help: str, choices: tuple[Any, ...] | None = None,
          default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with help text (and, optionally, the allowed values).

    ``choices`` is checked when a recipe is validated; ``help`` says what the field does, when
    it applies and how to turn it off.
    """
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_docs(section: Any, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """``(dotted key, value, help)`` for every leaf field of ``section`` and its nested sections, in order."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from field_docs(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f.metadata.get("help", "")


def choice_errors(section: Any, prefix: str, *, recursive: bool = True) -> list[str]:
    """One message per field of ``section`` (and, if ``recursive``, of its nested sections) whose
    value is not among the field's declared ``choices``."""
    errs: list[str] = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if recursive and dataclasses.is_dataclass(value):
            errs += choice_errors(value, f"{prefix}.{f.name}")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            errs.append(f"{prefix}.{f.name} = {value!r}: must be one of {list(f.metadata['choices'])}.")
    return errs
