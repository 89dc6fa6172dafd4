"""Spec strings: ``name``, ``name(1.5)`` or ``name(key=value, ...)``, values may nest.

Strategies, merges, partitions, penalties, constraints and schedules are all written this way
in run files and on the command line, e.g. ``periodic(every=16, merge=trimmed_mean(0.2))``.
Each kind is a dataclass registered by name; this module turns a spec into an instance and
an instance back into its spec.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Mapping

from .errors import ConfigError, expected

_NAME = re.compile(r"\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*", re.DOTALL)


def split_arguments(text: str) -> list[str]:
    """Split on commas that are not inside parentheses or brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def value(text: str) -> Any:
    """A spec value: an int, a float, true/false, none, or else the text itself (a name or a
    nested spec, which the receiving dataclass parses)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse(spec: Any, registry: Mapping[str, type], kind: str, base: type) -> Any:
    """An instance of ``registry[name]`` from ``spec``; an instance of ``base`` passes through.

    Positional arguments fill the dataclass fields in order: ``krum(1)`` is ``krum(f=1)``.
    """
    if isinstance(spec, base):
        return spec
    match = _NAME.fullmatch(spec) if isinstance(spec, str) else None
    if not match or match.group(1) not in registry:
        raise ConfigError(expected(kind, spec, tuple(registry) + (f"a {base.__module__}.{base.__name__}",)))
    cls, args = registry[match.group(1)], match.group(2)
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]
    options: dict[str, Any] = {}
    keyword_seen = False
    for position, item in enumerate(split_arguments(args or "")):
        key, eq, text = item.partition("=")
        if eq and key.strip().isidentifier():
            name, keyword_seen = key.strip(), True
            if name not in accepted:
                raise ConfigError(f"{kind} {cls.name!r} has no option {name!r}; "
                                  f"accepted: {', '.join(accepted) or 'none'}")
        else:
            if keyword_seen or position >= len(accepted):
                raise ConfigError(f"{kind} {spec!r}: write option {item!r} as key=value; "
                                  f"accepted: {', '.join(accepted) or 'none'}")
            name, text = accepted[position], item
        if name in options:
            raise ConfigError(f"{kind} {spec!r}: option {name!r} is given twice")
        options[name] = value(text)
    return cls(**options)


def to_spec(obj: Any) -> str:
    """The spec of a dataclass instance: its name and the options that differ from defaults."""
    changed = []
    for f in dataclasses.fields(obj):
        if not f.init or f.name.startswith("_"):
            continue
        current = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if current != default:
            changed.append(f"{f.name}={current}")
    return f"{obj.name}({', '.join(changed)})" if changed else obj.name


class Spec:
    """A value written as a spec string (a strategy, merge, partition, penalty, constraint or
    schedule): ``spec()`` and ``str()`` give the string that ``parse`` turns back into it."""

    name: ClassVar[str] = ""

    def spec(self) -> str:
        return to_spec(self)

    def __str__(self) -> str:
        return self.spec()
