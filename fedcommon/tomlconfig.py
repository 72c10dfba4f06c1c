"""Load TOML files into frozen config dataclasses, with errors that name the file and the field.

Both ends of the wire read TOML (``federation.toml`` at the coordinator, ``site.toml`` and ``policy.toml`` at a
site), so the loader lives beside the protocol. It never executes anything from the file.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the file and the field."""


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, not a config file") from None
    except OSError as e:  # unreadable (permissions, a FIFO...): still the one line naming the file
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: invalid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


def load_config(cls: type[T], path: str | Path, base_dir: Path | None = None) -> T:
    """Read ``path`` into dataclass ``cls``. Relative paths in ``Path`` fields resolve against the file's folder."""
    p = Path(path)
    return from_dict(cls, load_toml(p), source=str(p), base_dir=base_dir or p.resolve().parent)


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<config>", prefix: str = "",
              base_dir: Path | None = None) -> T:
    """Build dataclass ``cls`` from ``data``, checking names and types field by field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: field '{prefix.rstrip('.') or '<root>'}': must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: field '{prefix}{unknown[0]}': unknown field (known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, source, f"{prefix}{name}", base_dir)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: field '{prefix}{missing[0]}': required but missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: {'[' + prefix.rstrip('.') + '] ' if prefix else ''}{e}") from None


def _convert(tp: Any, value: Any, source: str, field: str, base_dir: Path | None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, source, field, base_dir)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: field '{field}': bad value")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, f"{field}.", base_dir)  # type: ignore[arg-type]
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: field '{field}': must be a path string")
        p = Path(value).expanduser()
        return p if p.is_absolute() or base_dir is None else (base_dir / p)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: field '{field}': must be a list")
        inner = args[0] if args else Any
        return tuple(_convert(inner, v, source, f"{field}[{i}]", base_dir) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: field '{field}': must be a table")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: field '{field}': must be a number, got {type(value).__name__}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: field '{field}': must be an integer, got {type(value).__name__}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{source}: field '{field}': must be a {tp.__name__}, got {type(value).__name__}")
        return value
    raise ConfigError(f"{source}: field '{field}': unsupported type {tp}")


def to_dict(obj: Any) -> Any:
    """Plain TOML/JSON-able form of a config dataclass (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if getattr(obj, f.name) is not None}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(data: dict[str, Any]) -> str:
    """Write a TOML document from plain values (str, int, float, bool, lists of those, nested tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (str, Path)):
            s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            return f'"{s}"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def table(d: dict[str, Any], name: str, out: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if not (isinstance(v, dict) and v and k != "strategy_params")}
        nested = {k: v for k, v in d.items() if k not in scalars}
        if name:
            out.append(f"\n[{name}]")
        out.extend(f"{k} = {value(v)}" for k, v in scalars.items() if v is not None)
        for k, v in nested.items():
            table(v, f"{name}.{k}" if name else k, out)

    lines: list[str] = []
    table(to_dict(data), "", lines)
    return "\n".join(lines).lstrip("\n") + "\n"
