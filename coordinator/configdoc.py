"""``python -m coordinator.configdoc``: regenerate docs/reference/federation-toml.md from :mod:`coordinator.config`,
and write the commented starter ``federation.toml`` that ``fedbridge-admin init`` puts in a new federation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from coordinator.config import FederationConfig
from fedcommon.configdoc import reference_markdown, starter_toml, write_pages

PAGE = Path(__file__).resolve().parent.parent / "docs" / "reference" / "federation-toml.md"
REGENERATE = "python -m coordinator.configdoc"
INTRO = """\
`federation.toml` is the coordinator's config: what it serves, where it keeps state, and what it asks every site
to train. `fedbridge-admin init` writes a complete, commented one; `fedbridge-admin config check FILE` checks a file
and prints every setting with its resolved value, marking which came from the file and which are defaults. Relative
paths resolve against the file's folder. Unknown settings are refused, naming the file and the field."""

LISTEN_NOTE = ("init writes 0.0.0.0 (every interface) so that sites can reach the coordinator; set it to the one "
               "interface sites connect to (the address of the --host name) if the machine has others. Left out of a "
               "hand-written file, listen is 127.0.0.1:0: loopback on a free port, reachable by no other machine.")


def page() -> str:
    """The reference page's Markdown."""
    return reference_markdown(FederationConfig, "`federation.toml` reference", INTRO, REGENERATE)


def starter(values: dict[str, Any], header: str) -> str:
    """The commented starter ``federation.toml`` holding ``values`` (the rest at their defaults)."""
    return starter_toml(FederationConfig, values, header, notes={"listen": LISTEN_NOTE})


def main(argv: list[str] | None = None) -> int:
    """Rewrite the page (``--check``: exit 1 if the committed page differs)."""
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    changed = write_pages({PAGE: page()}, check=check)
    for p in changed:
        print(f"{p}: {'differs from the generated page; run ' + REGENERATE if check else 'written'}")
    return 1 if check and changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
