"""How a configuration value is checked, and the one line that refuses it.

A field's spec (``_spec``: its default, bounds, choices, whether it is a secret) is read by
``_build``, which turns one TOML table into a section's frozen dataclass. ``_Sources`` remembers
where each value came from (the file, a ``GATEWAY_*`` variable, a command-line option), so that
``_fail`` and ``_unknown`` name the key, the value, its source and what is allowed, in one line
(``ConfigError``); a secret is shown as ``MASK``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

HOUR = 3600.0
DAY = 24 * HOUR


class ConfigError(Exception):
    """A configuration value that cannot be used; the message is one line for the operator."""


_NO_BOUNDS = {"lo": None, "hi": None, "choices": (), "secret": False}


def _spec(default: Any, *, lo: float | None = None, hi: float | None = None,
          choices: tuple[str, ...] = (), secret: bool = False) -> Any:
    """A field with its default and the bounds it is checked against."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "secret": secret}
    return dataclasses.field(default=default, metadata=meta)


def _required(*, choices: tuple[str, ...] = ()) -> Any:
    return dataclasses.field(metadata={**_NO_BOUNDS, "choices": choices})


class _Sources:
    """Remembers where each value came from, for the error message."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.env: dict[str, str] = {}
        self.options: set[str] = set()

    def of(self, path: str) -> str:
        if path in self.options:
            return f"command-line option --{path.rpartition('.')[2]}"
        var = self.env.get(path)
        return f"environment variable {var}" if var else self.file


MASK = "***"
SHOWN_CHARS = 80
# Names that mark a secret in a model's env, command or args: HF_TOKEN, --api-key, PGPASSWORD;
# a whole word, so that --max-num-batched-tokens is no secret.
_SECRET_NAME = re.compile(r"(?<![a-z])(token|secret|api[-_]?keys?|credentials?)(?![a-z])|passw",
                          re.IGNORECASE)


def _show(value: Any) -> str:
    """The value as written (repr, so one line), cut short if it is a whole table."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def _describe(meta: Mapping[str, Any], kind: str) -> str:
    if meta["choices"]:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and hi is not None:
        return f"{kind} from {lo} to {hi}"
    return kind


def _fail(path: str, value: Any, sources: _Sources, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{path} = {_show(value)} (from {sources.of(path)}): must be {allowed}")


def _unknown(path: str, value: Any, source: str, allowed: typing.Iterable[str]) -> typing.NoReturn:
    allowed = list(allowed)
    near = difflib.get_close_matches(path.rpartition(".")[2], allowed, n=1, cutoff=0.85)
    guess = f"did you mean {near[0]}? " if near else ""
    raise ConfigError(f"{path} = {_show(value)} (from {source}): unknown key; {guess}allowed "
                      f"keys: {', '.join(allowed)}")


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}
_LIST_NAMES = {int: "a list of integers", str: "a list of strings"}


def _check_scalar(path: str, value: Any, kind: type, meta: Mapping[str, Any],
                  sources: _Sources) -> Any:
    if kind is float and type(value) is int:
        with contextlib.suppress(OverflowError):  # an int beyond any float stays out of bounds
            value = float(value)
    ok = type(value) is kind and (not meta["choices"] or value in meta["choices"])
    if ok and kind is not str:
        lo, hi = meta["lo"], meta["hi"]
        ok = value == value and (lo is None or lo <= value) and (hi is None or value <= hi)
    if not ok:
        _fail(path, MASK if meta["secret"] else value, sources,
              _describe(meta, _KIND_NAMES[kind]))
    return value


def _check_value(path: str, value: Any, hint: Any, meta: Mapping[str, Any],
                 sources: _Sources) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _check_value(path, value, next(a for a in args if a is not type(None)), meta,
                            sources)
    if origin is tuple and dataclasses.is_dataclass(args[0]):  # an array of tables
        if not isinstance(value, list):
            _fail(path, value, sources, "an array of tables")
        return tuple(_build(args[0], item, f"{path}[{i}]", sources)
                     for i, item in enumerate(value))
    if origin is tuple:
        if not isinstance(value, list):
            _fail(path, MASK if meta["secret"] else value, sources, _LIST_NAMES[args[0]])
        return tuple(_check_scalar(f"{path}[{i}]", item, args[0], meta, sources)
                     for i, item in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            _fail(path, MASK if meta["secret"] else value, sources, "a table of strings")
        return types.MappingProxyType(dict(value))
    value = _check_scalar(path, value, hint, meta, sources)
    if value == "":
        _fail(path, value, sources, "a non-empty string")
    return value


def _build(cls: type, table: Any, prefix: str, sources: _Sources) -> Any:
    if not isinstance(table, dict):
        _fail(prefix, table, sources, "a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    for key, value in table.items():
        if key not in fields:
            _unknown(f"{prefix}.{key}", value, sources.of(f"{prefix}.{key}"), fields)
    values = {}
    for name, field in fields.items():
        path = f"{prefix}.{name}"
        meta = field.metadata or _NO_BOUNDS
        if name in table:
            values[name] = _check_value(path, table[name], hints[name], meta, sources)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path} is missing (from {sources.file}): it is required, "
                              f"{_describe(meta, _KIND_NAMES[hints[name]])}")
    return cls(**values)


def _is_url(url: str, schemes: tuple[str, ...]) -> bool:
    """A URL of one of the schemes with a host (a socket path for unix://)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when the port is not a number in range
    except ValueError:
        return False
    return parts.scheme in schemes and bool(parts.path if parts.scheme == "unix"
                                            else parts.hostname)
