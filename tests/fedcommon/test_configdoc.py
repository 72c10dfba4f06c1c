"""The generic config documenter: docstring fields, commented starters that load back, placeholders, resolved lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedcommon.configdoc import (
    field_docs,
    find_placeholders,
    reference_markdown,
    resolved_settings,
    starter_toml,
    undocumented,
)
from fedcommon.tomlconfig import from_dict, load_config, tomllib

_loads = tomllib.loads


@dataclass(frozen=True)
class Item:
    """One item.

    Attributes:
        name: The item's name.
        size: How big. Second sentence.
    """

    name: str
    size: int = 1


@dataclass(frozen=True)
class Inner:
    """The inner table.

    Attributes:
        rate: A rate, over
            two lines.
        tags: Some tags.
    """

    rate: float = 1e-5
    tags: tuple[str, ...] = ("a",)


@dataclass(frozen=True)
class Root:
    """A root config.

    Attributes:
        who: Required name.
        where: An optional path.
        params: Free-form table.
        inner: The inner table.
        items: The items.
        undocumented_here: x
    """

    who: str
    where: Path | None = None
    params: dict = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    items: tuple[Item, ...] = ()
    undocumented_here: bool = False


def test_field_docs_joins_continuation_lines() -> None:
    assert field_docs(Inner) == {"rate": "A rate, over two lines.", "tags": "Some tags."}
    assert undocumented(Root) == []


def test_undocumented_names_a_field_without_meaning() -> None:
    @dataclass(frozen=True)
    class Bare:
        """No attributes section."""

        x: int = 0

    assert undocumented(Bare) == ["x"]


def test_starter_writes_every_setting_with_a_comment_and_loads_back(tmp_path: Path) -> None:
    values = {"who": "me", "params": {"k": 2, "s": "v"}, "inner": {"rate": 0.5},
              "items": [{"name": "one"}, {"name": "two", "size": 3}]}
    text = starter_toml(Root, values, header="top line")
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert load_config(Root, path) == from_dict(Root, values, base_dir=tmp_path)
    assert text.startswith("# top line\n")
    lines = text.splitlines()
    for name in ("who", "params", "undocumented_here", "rate", "tags", "size"):
        i = next(n for n, line in enumerate(lines) if line.startswith(f"{name} ="))
        assert lines[i - 1].startswith("# "), name  # each setting has its comment right above it
    assert "# where =" in text and "[inner]" in text and text.count("[[items]]") == 2
    assert "# How big." in text and "Second sentence" not in text  # the first sentence only


def test_starter_with_defaults_only_is_valid_toml_and_shows_empty_arrays_commented() -> None:
    text = starter_toml(Root, {"who": "x"})
    assert _loads(text)["inner"] == {"rate": 1e-5, "tags": ["a"]}
    assert "# [[items]]" in text


def test_missing_required_value_becomes_a_placeholder() -> None:
    text = starter_toml(Root, {})
    assert find_placeholders(_loads(text)) == ["who"]


def test_find_placeholders_walks_tables_and_lists() -> None:
    data = {"a": "<FILL IN: x>", "t": {"b": "ok", "c": "/p/<FILL IN: y>"}, "l": ["z", "<FILL IN: w>"]}
    assert find_placeholders(data) == ["a", "t.c", "l[1]"]


def test_resolved_settings_marks_file_and_default() -> None:
    data = {"who": "me", "inner": {"rate": 2.0}}
    got = {n: (v, g) for n, v, g in resolved_settings(from_dict(Root, data), data)}
    assert got["who"] == ("me", True) and got["inner.rate"] == (2.0, True)
    assert got["inner.tags"] == (["a"], False) and got["where"] == (None, False) and got["items"] == ([], False)


def test_reference_lists_type_default_and_meaning() -> None:
    page = reference_markdown(Root, "T", "intro", "regen")
    assert "| `rate` | number | `1e-05` | A rate, over two lines. |" in page
    assert "| `who` | string | required | Required name. |" in page
    assert "## `[[items]]` (one table per entry)" in page and "## `[inner]`" in page
