"""The one parser of command-line options: every entrypoint's ``--name=value`` (the pretraining config's dotted
keys, fine-tuning's job and recipe, the probes', segmentation's) checked against its field's type, converted, and
an unknown name answered with what it may mean."""

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["coerce", "parse_options", "read_config_file", "suggest"]


def coerce(key: str, value: Any, kind) -> Any:
    """``value`` as the field type ``kind`` (int, float, bool, str, T | None, list[T], tuple[T, ...]), or a
    ValueError that names the key, the type and the value."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return coerce(key, value, next(a for a in args if a is not type(None)))
    if origin in (list, tuple) and isinstance(value, list | tuple):
        if origin is tuple and len(args) != len(value):
            raise ValueError(f"{key} expects {len(args)} values, got {value!r}")
        items = [coerce(f"{key}[{i}]", v, args[i] if origin is tuple else args[0]) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if kind is bool and isinstance(value, str) and value.lower() in _BOOLS:  # fire passes true/false as text
        return _BOOLS[value.lower()]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is bool and isinstance(value, bool) or kind is int and number and float(value).is_integer():
        return int(value) if kind is int else value
    if kind is float and number:
        return float(value)
    if kind is str and (isinstance(value, str) or number):
        return str(value)
    example = {list: " such as [196,196]", tuple: " such as [0.9,0.98]"}.get(origin, "")
    raise ValueError(f"{key} expects {_type_name(kind)}{example}, got {value!r}")


_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def _type_name(kind) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


def suggest(key: str, names) -> list[str]:
    """Up to three of ``names`` that a mistyped ``key`` may mean, best first: the same field in another section
    (``model.epochs`` -> ``optim.epochs``), a field whose name is the key's initials (``learning_rate`` ->
    ``lr``), or a close spelling. Sections are the parts before the last dot."""
    field = key.rpartition(".")[2]
    initials = "".join(word[:1] for word in field.split("_"))
    scored = []
    for name in names:
        last = name.rpartition(".")[2]
        ratio = difflib.SequenceMatcher(None, field, last).ratio()
        score = 2.0 if last == field else 1.5 if last == initials else ratio
        if score >= 0.75:
            scored.append((-score, name))
    return [name for _, name in sorted(scored)[:3]]


def parse_options(options: dict[str, Any], kinds: dict[str, Any], what: str = "options") -> dict[str, Any]:
    """Command-line ``options`` checked against ``kinds`` (name -> field type) and converted (``coerce``); unknown
    names are one error listing them, each with what it may mean."""
    unknown = sorted(set(options) - set(kinds))
    if unknown:
        hints = "".join(
            f"; {k!r}: did you mean {' or '.join(repr(m) for m in close)}?"
            for k in unknown
            if (close := suggest(k, kinds))
        )
        raise ValueError(f"unknown {what} {unknown}{hints} (--help lists them)")
    return {k: coerce(k, v, kinds[k]) for k, v in options.items()}


def read_config_file(path: str | Path, sections, keep=(), ignore=()) -> tuple[dict[str, Any], dict[str, Any]]:
    """A config file (``.yaml``/``.yml`` YAML, else JSON) with the sections of a run's config (``{section: {field:
    value}}``, as ``--print_config`` prints them): ``(its options as dotted keys, its top-level keys in keep)``.
    Keys in ``ignore`` (figures ``--print_config`` derives) are skipped; any other top-level key is an error
    naming it. The options are checked by the caller, as command-line options are (``parse_options``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            tree = yaml.safe_load(path.read_text())
        else:
            tree = json.loads(path.read_text())
    except Exception as err:  # yaml's and json's parse errors: one line naming the file
        raise ValueError(f"config file {path} cannot be parsed ({type(err).__name__}: {err})") from err
    if not isinstance(tree, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    unknown = sorted(set(tree) - set(sections) - set(keep) - set(ignore))
    if unknown:
        raise ValueError(f"config file {path}: unknown sections {unknown}; valid: {sorted(sections)}")
    flat = {}
    for section in sections:
        values = tree.get(section) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path}: section {section!r} must be a mapping of fields")
        flat |= {f"{section}.{name}": value for name, value in values.items()}
    return flat, {k: tree[k] for k in keep if k in tree}
