"""Command-line flags from the fields of a config dataclass, and back (a leaf: argparse and
dataclasses only).

    add_config_flags(parser, RunConfig, "run configuration (override --config)")
    overrides = config_overrides(RunConfig, parser.parse_args())   # only the flags given

One ``--flag`` per field (``reg_strength`` -> ``--reg-strength``), typed from the field's
annotation: ``bool`` -> ``--x / --no-x``; ``X | None`` also takes ``none``; a tuple takes a
comma-separated list (``--seeds 0,1,2``); the help text is the field's ``metadata["help"]``
and its default. A flag not given is not set on the namespace at all, so a flag given with the
default's value still overrides a config file. The run config of ``sparsekern train`` /
``sweep`` and every experiment's config get their flags here.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from functools import cache


@dataclasses.dataclass(frozen=True)
class FieldKind:
    """What a config field holds, from its annotation."""

    base: type  # bool, int, float, str or tuple
    optional: bool  # annotated ``X | None``
    item: type | None = None  # a tuple's element type (float for a bare ``tuple``)


@cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def field_kind(cls, name: str) -> FieldKind:
    """The kind of field ``name`` of the dataclass ``cls``."""
    hint = _hints(cls)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if hint is tuple or typing.get_origin(hint) is tuple:
        items = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return FieldKind(tuple, optional, items[0] if items else float)
    return FieldKind(hint, optional)


def comma_list(kind: type):
    """A parser of ``"1,2, 3"`` into ``(kind("1"), kind("2"), kind("3"))`` (empty items skipped)."""
    def parse(text: str) -> tuple:
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip())

    parse.__name__ = f"comma-separated {kind.__name__} list"  # argparse names the type in its errors
    return parse


def _none_or(parse):
    def parse_optional(text: str):
        return None if text.lower() == "none" else parse(text)

    parse_optional.__name__ = parse.__name__
    return parse_optional


def value_parser(kind: FieldKind):
    """The argparse ``type`` of a (non-bool) field: one flag value -> the field's value."""
    parse = comma_list(kind.item) if kind.base is tuple else kind.base
    return _none_or(parse) if kind.optional else parse


def _shown(default) -> str:
    """A default as it would be typed on the command line (tuples comma-separated)."""
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def add_config_flags(parser: argparse.ArgumentParser, cls, title: str | None = None, exclude=()) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` (but ``exclude``), in an argument group
    called ``title`` (default: the class name); only the flags given are set on the parsed namespace."""
    group = parser.add_argument_group(title or f"{cls.__name__} fields")
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind = field_kind(cls, f.name)
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats help texts: a literal % ("50% of the budget") must be doubled.
        help_text = f"{f.metadata['help']} (default: {_shown(f.default)})".replace("%", "%%")
        if kind.base is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=value_parser(kind), default=argparse.SUPPRESS,
                               metavar=f.name.upper(), help=help_text)


def config_overrides(cls, args: argparse.Namespace) -> dict:
    """``{field: value}`` of the fields of ``cls`` given as flags (see ``add_config_flags``)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


__all__ = ["FieldKind", "add_config_flags", "comma_list", "config_overrides", "field_kind", "value_parser"]
