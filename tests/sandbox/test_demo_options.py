"""``fedbridge demo --base-model DIR --chat-template FILE``: the options reach the federation the demo lays out.

The demo itself runs minutes; tests/integration/test_real_base.py runs a federation laid out the same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcommon.tomlconfig import load_toml
from sandbox import localfed
from sandbox.cli import app
from sandbox.demo import DemoConfig


def test_demo_refuses_a_folder_that_is_no_model_and_a_missing_template(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a model directory"):
        DemoConfig(base_model=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--chat-template .*no such file"):
        DemoConfig(base_model=tmp_path, chat_template=tmp_path / "missing.jinja")
    r = CliRunner().invoke(app, ["demo", "--base-model", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "not a model directory" in " ".join(r.output.split())


def test_localfed_writes_the_template_and_the_base(tmp_path: Path) -> None:
    base, template = tmp_path / "base", tmp_path / "chat.jinja"
    base.mkdir()
    template.write_text("{{ messages }}")
    fed = localfed.prepare(tmp_path / "fed", base, n_sites=1, rounds=1, n_train=2, n_heldout=1,
                           chat_template=template, base_model_ref="my/base")
    cfg = load_toml(fed.federation_toml)
    assert cfg["model"] == {"chat_template": str(template)} and cfg["base_model"] == str(base)
    assert cfg["base_model_ref"] == "my/base" and "lora" not in cfg  # the default, all-linear, fits any base
