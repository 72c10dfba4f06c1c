"""Config dataclasses documented once: reference pages, commented starter files and resolved-settings listings.

Each config dataclass documents its fields in its Google-style ``Attributes:`` docstring; that text is the single
source of every setting's meaning. From it and the dataclass itself (types, defaults) this module writes a Markdown
reference page (:func:`reference_markdown`), a complete commented TOML starter file (:func:`starter_toml`) and, for
``config check``, every setting with its resolved value and whether it came from the file (:func:`resolved_settings`).

It knows nothing of the coordinator or the site: each side has a thin entry point that passes its own dataclasses.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from fedcommon.tomlconfig import dumps

# A value the operator must replace before the agent will start: ``"<FILL IN: what goes here>"``.
PLACEHOLDER = re.compile(r"<FILL IN:[^>]*>")


def placeholder(what: str) -> str:
    """The explicit placeholder for a value the operator must fill in (``what`` says what goes there)."""
    return f"<FILL IN: {what}>"


def find_placeholders(data: Any, prefix: str = "") -> list[str]:
    """Dotted names of every value in ``data`` (raw TOML) that still holds a ``<FILL IN: ...>`` placeholder."""
    found: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            found += find_placeholders(v, f"{prefix}{k}.")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += find_placeholders(v, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(data, str) and PLACEHOLDER.search(data):
        found.append(prefix.rstrip("."))
    return found


def field_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` entries of ``cls``'s docstring, by field name (continuation lines joined)."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    inside, current = False, ""
    for line in doc.splitlines():
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):  # the next section
            break
        m = re.match(r"^ {4}(\w+)(?: \([^)]*\))?: ?(.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _item_dataclass(tp: Any) -> type | None:
    """The element dataclass of ``tuple[X, ...]`` (an array of tables), else None."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if args and _is_dataclass_type(args[0]):
            return args[0]
    return None


def type_name(tp: Any) -> str:
    """A short, TOML-minded name of a field type (``integer``, ``list of strings``, ``path (optional)``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in inner) + (" (optional)" if type(None) in args else "")
    if origin is tuple:
        item = args[0] if args else Any
        return "array of tables" if _is_dataclass_type(item) else f"list of {type_name(item)}s"
    if origin is dict or tp is dict:
        return "table"
    if _is_dataclass_type(tp):
        return "table"
    return {int: "integer", float: "number", str: "string", bool: "boolean", Path: "path"}.get(tp, str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _toml_value(v: Any) -> str:
    """One TOML value, inline (tables as inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return dumps({"x": str(v)}).split(" = ", 1)[1].rstrip("\n")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _default_text(f: dataclasses.Field) -> str:
    d = _default(f)
    if d is dataclasses.MISSING:
        return "required"
    if d is None:
        return "unset"
    if dataclasses.is_dataclass(d):
        return "see the table"
    return f"`{_toml_value(list(d) if isinstance(d, tuple) else d)}`"


def _sections(cls: type, prefix: str = "") -> list[tuple[str, type, bool]]:
    """``(dotted name, dataclass, is_array)`` of ``cls`` (root ``""``) and every nested table, depth first."""
    out = [(prefix, cls, False)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            out += _sections(tp, f"{prefix}{f.name}.")
        elif (item := _item_dataclass(tp)) is not None:
            out += [(f"{prefix}{f.name}.", item, True)] + _sections(item, f"{prefix}{f.name}.")[1:]
    return out


def _leaf_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """Fields of ``cls`` that are values, not nested tables."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)
            if not _is_dataclass_type(hints[f.name]) and _item_dataclass(hints[f.name]) is None]


def undocumented(cls: type) -> list[str]:
    """Dotted names of fields (of ``cls`` and its nested tables) that the ``Attributes:`` docstrings do not describe."""
    missing = []
    for prefix, sub, _ in _sections(cls):
        docs = field_docs(sub)
        missing += [f"{prefix}{f.name}" for f in dataclasses.fields(sub) if not docs.get(f.name)]
    return missing


def reference_markdown(cls: type, title: str, intro: str, regenerate: str) -> str:
    """The Markdown reference page of config file ``cls``: one table per TOML table, every setting's type, default
    and meaning. ``regenerate`` is the command that rewrites the page (stated at its top)."""
    lines = [f"# {title}", "", f"<!-- Generated from the config dataclasses by `{regenerate}`; do not edit by hand. -->",
             "", intro.strip(), ""]
    for prefix, sub, is_array in _sections(cls):
        name = prefix.rstrip(".")
        leaves = _leaf_fields(sub)
        if not leaves:
            continue
        summary = (inspect.getdoc(sub) or "").split("\n\n", 1)[0].replace("\n", " ")
        head = "Top level (before any table)" if not name else (f"`[[{name}]]` (one table per entry)" if is_array
                                                                else f"`[{name}]`")
        lines += [f"## {head}", "", summary, "", "| Setting | Type | Default | Meaning |", "|---|---|---|---|"]
        docs = field_docs(sub)
        for f, tp in leaves:
            meaning = docs.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | {type_name(tp)} | {_default_text(f).replace('|', chr(92) + '|')} | {meaning} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _comment(text: str, indent: str = "") -> list[str]:
    """The first sentence of a field's doc as ``#`` comment lines (wrapped at 100 columns)."""
    first = re.split(r"(?<=\.)\s+(?=[A-Z`(])", text.strip(), maxsplit=1)[0] if text else ""
    return [f"{indent}# {line}" for line in textwrap.wrap(first, 98)] if first else []


def starter_toml(cls: type, values: dict[str, Any], header: str = "", notes: dict[str, str] | None = None) -> str:
    """A complete, commented TOML file for ``cls``: every table, every setting with a comment from its doc.

    Args:
        cls: The config dataclass.
        values: The values to write (nested dicts for tables, dotted paths not needed); every other setting is
            written with its default. A setting with no default and no value gets a ``<FILL IN: ...>`` placeholder.
        header: Comment text for the top of the file.
        notes: Extra comment text for a setting, by dotted name (``"listen"``), written after its doc line.

    Returns:
        TOML text that loads back to ``cls`` built from ``values`` and the defaults. Unset optional settings and
        empty arrays of tables are written commented out.
    """
    notes = notes or {}
    out = [f"# {line}".rstrip() for line in header.strip().splitlines()] if header else []

    def table(sub: type, prefix: str, given: dict[str, Any], array: bool) -> None:
        name = prefix.rstrip(".")
        docs = field_docs(sub)
        hints = typing.get_type_hints(sub)
        if name:
            summary = (inspect.getdoc(sub) or "").split("\n", 1)[0]
            out.extend(["", *_comment(summary), f"[[{name}]]" if array else f"[{name}]"])
        for f, _tp in _leaf_fields(sub):
            out.extend(_comment(docs.get(f.name, "")))
            if f"{prefix}{f.name}" in notes:
                out.extend(f"# {line}" for line in textwrap.wrap(notes[f"{prefix}{f.name}"], 98))
            value = given[f.name] if f.name in given else _default(f)
            if value is dataclasses.MISSING:
                value = placeholder(docs.get(f.name, f.name).split(".")[0])
            if value is None:
                out.append(f"# {f.name} =   (unset; a {type_name(hints[f.name]).replace(' (optional)', '')})")
            else:
                out.append(f"{f.name} = {_toml_value(_plain(value))}")
        for f in dataclasses.fields(sub):
            tp = hints[f.name]
            if _is_dataclass_type(tp):
                sub_given = given.get(f.name, {})
                table(tp, f"{prefix}{f.name}.", sub_given if isinstance(sub_given, dict) else {}, False)
            elif (item := _item_dataclass(tp)) is not None:
                entries = given.get(f.name) or []
                if not entries:
                    out.extend(["", *_comment(docs.get(f.name, "")), f"# [[{prefix}{f.name}]]  (none; one table each)"])
                for entry in entries:
                    table(item, f"{prefix}{f.name}.", entry, True)

    table(cls, "", values, False)
    return "\n".join(out).lstrip("\n") + "\n"


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v) if getattr(v, f.name) is not None}
    return v


def resolved_settings(obj: Any, data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, bool]]:
    """Every setting of config ``obj`` as ``(dotted name, resolved value, from the file)``; ``data`` is the raw TOML
    ``obj`` was loaded from (a setting absent there is its default)."""
    out: list[tuple[str, Any, bool]] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        given = isinstance(data, dict) and f.name in data
        if _is_dataclass_type(hints[f.name]):
            out += resolved_settings(value, data.get(f.name, {}) if given else {}, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", _plain(value), given))
    return out


def format_settings(settings: list[tuple[str, Any, bool]]) -> str:
    """``name = value  # file|default`` lines, one per setting."""
    width = max((len(n) for n, _, _ in settings), default=0)
    lines = []
    for name, value, given in settings:
        shown = "(unset)" if value is None else _toml_value(value)
        lines.append(f"{name.ljust(width)} = {shown}  # {'file' if given else 'default'}")
    return "\n".join(lines) + "\n"


def check_page(path: Path, text: str) -> bool:
    """True when the committed page ``path`` holds exactly ``text``."""
    return path.is_file() and path.read_text(encoding="utf-8") == text


def write_pages(pages: dict[Path, str], check: bool = False) -> list[Path]:
    """Write each reference page (or, with ``check``, only list those whose committed text differs); returns the
    pages written or differing."""
    changed = [p for p, text in pages.items() if not check_page(p, text)]
    if not check:
        for p in changed:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(pages[p], encoding="utf-8")
    return changed


def check_report(obj: Any, path: Path) -> str:
    """What ``config check`` prints for the config ``obj`` loaded from ``path``: a header, then every setting."""
    from fedcommon.tomlconfig import load_toml

    settings = resolved_settings(obj, load_toml(path))
    given = sum(1 for _, _, g in settings if g)
    return (f"# {path}: OK, {len(settings)} settings ({given} from the file, {len(settings) - given} defaults)\n"
            + format_settings(settings))
