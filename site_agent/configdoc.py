"""``python -m site_agent.configdoc``: regenerate docs/reference/site-toml.md and policy-toml.md from
:mod:`site_agent.config` and :mod:`site_agent.policy`, and write the kit's commented starter ``site.toml``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fedcommon.configdoc import reference_markdown, starter_toml, write_pages
from site_agent.config import SiteConfig
from site_agent.policy import SitePolicy

DOCS = Path(__file__).resolve().parent.parent / "docs" / "reference"
REGENERATE = "python -m site_agent.configdoc"
SITE_INTRO = """\
`site.toml` is a site agent's own config: its coordinator, key material, base model and private data. `fedbridge-site
install-bundle` writes one into the kit with `<FILL IN: ...>` placeholders for what only the site knows (its copy of
the base model, its training file); `fedbridge-site run` and `preflight` refuse to start while one remains, naming
the field. `fedbridge-site config check FILE` checks a file and prints every setting with its resolved value,
marking which came from the file and which are defaults. Relative paths resolve against the file's folder."""
POLICY_INTRO = """\
`policy.toml` is what a site accepts from its coordinator; the file named by `policy` in `site.toml`. Every task is
checked against it before anything trains, and a refusal names the rule. With no file the defaults accept any task
(the base model is still pinned by the task's manifest hash). `fedbridge-site install-bundle` writes one that pins
the federation's base model, CA and coordinator host. `fedbridge-site config check --policy FILE` checks a file."""


def pages() -> dict[Path, str]:
    """The reference pages' Markdown, by path."""
    return {DOCS / "site-toml.md": reference_markdown(SiteConfig, "`site.toml` reference", SITE_INTRO, REGENERATE),
            DOCS / "policy-toml.md": reference_markdown(SitePolicy, "`policy.toml` reference", POLICY_INTRO,
                                                        REGENERATE)}


def site_starter(values: dict[str, Any], header: str) -> str:
    """The commented starter ``site.toml`` holding ``values`` (the rest at their defaults)."""
    return starter_toml(SiteConfig, values, header)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the pages (``--check``: exit 1 if a committed page differs)."""
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    changed = write_pages(pages(), check=check)
    for p in changed:
        print(f"{p}: {'differs from the generated page; run ' + REGENERATE if check else 'written'}")
    return 1 if check and changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
