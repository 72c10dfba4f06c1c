"""site.toml and policy.toml documented once: the reference pages are the generated ones, the kit's site.toml names
what the operator must fill in, the agent refuses to start on a placeholder, and ``fedbridge-site config check``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.trust.enrolment import InitOptions, enroll_csr, init_federation
from fedcommon.configdoc import undocumented
from site_agent import configdoc
from site_agent.cli import app
from site_agent.config import SiteConfig, load_site_config
from site_agent.enrol import init_site, install_bundle
from site_agent.policy import SitePolicy


def test_committed_reference_pages_are_the_generated_ones() -> None:
    assert configdoc.main(["--check"]) == 0, f"run `{configdoc.REGENERATE}`"


def test_every_setting_has_a_meaning() -> None:
    assert undocumented(SiteConfig) == [] and undocumented(SitePolicy) == []
    page = configdoc.pages()[configdoc.DOCS / "site-toml.md"]
    assert "| `heldout` |" in page and "## `[dp]`" in page


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A site kit as the operator gets it: init, enrolment by the CA holder, install-bundle (all in-process)."""
    root = tmp_path_factory.mktemp("kit")
    fed = root / "fed"
    init_federation(fed, InitOptions(federation_id="c", base_model=tiny_model_dir, hosts=("127.0.0.1",)))
    kit = root / "kit"
    csr = init_site(kit, "hospital-a")
    _, bundle = enroll_csr(fed, root / "fed-ca", csr.read_bytes(), region="EU-DE")
    (root / "a.bundle.json").write_bytes(bundle)
    install_bundle(kit, root / "a.bundle.json")
    return kit


def test_kit_site_toml_names_what_to_fill_in_and_mentions_heldout(kit: Path) -> None:
    text = (kit / "site.toml").read_text()
    assert 'base_model = "<FILL IN:' in text and 'train = "<FILL IN:' in text
    assert "heldout" in text and "site_agent/config.py" not in text and "docs/reference/site-toml.md" in text
    cfg = load_site_config(kit / "site.toml")  # loads (the kit's own files are filled in) but is not ready
    assert cfg.name == "hospital-a" and cfg.tls.signing_key == kit / "signing.key"


@pytest.mark.parametrize("command", [["run"], ["preflight", "--timeout", "1"]])
def test_agent_refuses_to_start_while_a_placeholder_remains(kit: Path, command: list[str]) -> None:
    r = CliRunner().invoke(app, [*command, "--config", str(kit / "site.toml")])
    assert r.exit_code == 2, r.output
    flat = " ".join(r.output.split())
    assert "field 'base_model'" in flat and "placeholder" in flat and "data.train" in flat and "Traceback" not in flat


def test_config_check_passes_a_filled_in_kit_and_marks_file_and_default(kit: Path, tmp_path: Path) -> None:
    text = (kit / "site.toml").read_text()
    filled = tmp_path / "site.toml"
    filled.write_text(re.sub(r'^base_model = ".*"$', 'base_model = "/models/base"',
                             text.replace('"<FILL IN: path to your private training jsonl>"', '"/data/train.jsonl"'),
                             flags=re.M))
    r = CliRunner().invoke(app, ["config", "check", str(filled)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert any(line.startswith("data.train") and "/data/train.jsonl" in line and line.endswith("# file")
               for line in lines)
    assert any(line.startswith("data.heldout") and "(unset)" in line and line.endswith("# default") for line in lines)
    assert any(line.startswith("dp.noise_multiplier") and line.endswith("# file") for line in lines)  # the kit writes it
    r = CliRunner().invoke(app, ["config", "check", str(kit / "site.toml")])
    assert r.exit_code == 2 and "field 'base_model'" in r.output


@pytest.mark.parametrize("body,policy,where", [
    ('name = "a"\n', False, "field 'coordinator': required but missing"),
    ('max_steps = "ten"\n', True, "field 'max_steps': must be an integer"),
    ('allowed_modez = []\n', True, "field 'allowed_modez': unknown field"),
])
def test_config_check_refuses_a_bad_file_in_one_line(tmp_path: Path, body: str, policy: bool, where: str) -> None:
    path = tmp_path / "x.toml"
    path.write_text(body)
    r = CliRunner().invoke(app, ["config", "check", str(path), *(["--policy"] if policy else [])])
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1 and str(path) in r.output and where in r.output, r.output


def test_config_check_policy_lists_every_rule(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("max_steps = 100\n")
    r = CliRunner().invoke(app, ["config", "check", "--policy", str(path)])
    assert r.exit_code == 0, r.output
    assert "max_steps" in r.output and "# file" in r.output and "require_secure_aggregation" in r.output
