"""Config dataclasses from JSON-like dicts: one parser for run configs (``vla_ds.training.config``),
exported policies' config.json (``VLAPolicy.from_pretrained``) and the memory estimate.
Values are converted to each field's type (``--set`` strings included); a bad value or key
is a :class:`~vla_ds.errors.ConfigError` naming it. No torch, no distributed code."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from typing import Any

import yaml

from vla_ds.errors import ConfigError

logger = logging.getLogger(__name__)


def unknown_key_error(where: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(valid))})"
    return ConfigError(f"unknown config key '{where}{key}'{hint}")


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a JSON/CLI value to a dataclass field's type, or raise ConfigError naming the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], name) if len(inner) == 1 else value
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
            if isinstance(value, annotation):
                return value
            if isinstance(value, str):
                value = yaml.safe_load(value)
            return dataclass_from_dict(annotation, value, name + ".")
        if origin in (tuple, list):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            item_type = args[0] if args else Any
            items = [coerce(v, item_type, name) if item_type is not Any else v for v in value]
            return tuple(items) if origin is tuple else items
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected {getattr(annotation, '__name__', annotation)}") from None
    return value


def dataclass_from_dict(cls: type, d: dict[str, Any], where: str, base: Any = None,
                        unknown: str = "error", source: str = "") -> Any:
    """Instantiate ``cls`` from ``d`` on top of ``base`` (or the defaults), each value converted
    to its field's type. Unknown keys are refused (``unknown="error"``: a user's config, where a
    typo must not pass) or logged and skipped (``"warn"``: a file written by another vla_ds
    version; the warning names ``source``). Messages name ``where`` + the key."""
    if not isinstance(d, dict):
        raise ConfigError(f"'{where.rstrip('.')}' must be a JSON object, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {n: getattr(base, n) for n in names} if base is not None else {}
    skipped = [key for key in d if key not in names]
    if skipped and unknown == "error":
        raise unknown_key_error(where, skipped[0], names)
    if skipped:
        logger.warning("%signoring unknown keys %s", f"{source}: " if source else "",
                       ", ".join(where + k for k in skipped))
    for key, value in d.items():
        if key in names:
            values[key] = coerce(value, hints[key], where + key)
    return cls(**values)
