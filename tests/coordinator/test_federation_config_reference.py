"""federation.toml documented once: the reference page is the generated one, init writes a complete commented file
that loads back to what init chose, and ``fedbridge-admin config check`` validates a file in-process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator import configdoc
from coordinator.admin.cli import app
from coordinator.config import FederationConfig
from coordinator.trust.enrolment import InitOptions, init_federation
from fedcommon.configdoc import undocumented
from fedcommon.tomlconfig import from_dict, load_config, tomllib

_loads = tomllib.loads

MINIMAL = {"federation_id": "f", "base_model": "/srv/base", "state_dir": "state", "registry_dir": "published",
           "tls": {"ca": "ca.pem", "cert": "server.pem", "key": "server.key"}}


def test_committed_reference_page_is_the_generated_one() -> None:
    assert configdoc.main(["--check"]) == 0, f"run `{configdoc.REGENERATE}`"


def test_every_setting_has_a_meaning_and_appears_on_the_page() -> None:
    assert undocumented(FederationConfig) == []
    page = configdoc.page()
    for name in ("max_steps", "target_modules", "exit_when_done", "deadline_s", "listen", "heartbeat_timeout_s"):
        assert f"| `{name}` |" in page, name


def test_starter_loads_back_to_the_values_and_defaults(tmp_path: Path) -> None:
    values = {**MINIMAL, "listen": "0.0.0.0:7443", "lora": {"target_modules": ["q_proj", "v_proj"]},
              "quorum": {"deadline_s": 600.0, "min_at_deadline": 1}, "strategy_params": {"eta": 0.5},
              "strategy": "fedadam",
              "evaluation": {"benchmarks": [{"name": "general_qa", "local_path": "qa"}], "enabled": True},
              "publish": {"site_regions": {"hospital-a": "EU-DE"}}}
    (tmp_path / "federation.toml").write_text(configdoc.starter(values, "header"))
    assert load_config(FederationConfig, tmp_path / "federation.toml") == from_dict(FederationConfig, values,
                                                                                    base_dir=tmp_path)


def test_init_writes_every_section_commented_and_loads_to_what_it_chose(tmp_path: Path, tiny_model_dir: Path) -> None:
    fed = tmp_path / "fed"
    init_federation(fed, InitOptions(federation_id="c", base_model=tiny_model_dir, hosts=("fl.example.org",),
                                     port=7443, min_sites=3))
    text = (fed / "federation.toml").read_text()
    assert "see coordinator/config.py" not in text and "docs/reference/federation-toml.md" in text
    raw = _loads(text)
    tables = {f.name for f in dataclasses.fields(FederationConfig) if dataclasses.is_dataclass(f.type)
              or f.name in ("model", "lora", "training", "tls", "evaluation", "gate", "publish", "dashboard",
                            "secure_aggregation", "records", "privacy", "quorum")}
    assert tables <= set(raw), tables - set(raw)
    assert {"max_steps", "learning_rate"} <= set(raw["training"]) and "deadline_s" in raw["quorum"]
    assert raw["listen"] == "0.0.0.0:7443"
    i = text.splitlines().index('listen = "0.0.0.0:7443"')
    assert "interface" in " ".join(text.splitlines()[i - 4:i])  # the operator is told to set the interface
    chosen = {"federation_id": "c", "base_model": str(tiny_model_dir.resolve()), "base_model_ref": "", "rounds": 3,
              "min_sites": 3, "strategy": "fedavg", "listen": "0.0.0.0:7443", "state_dir": "state",
              "registry_dir": "published", "enrolment_registry": "enrolment.json", "crl": "crl.pem",
              "max_update_norm": 0.0, "tls": {"ca": "ca.pem", "cert": "coordinator/server.pem",
                                             "key": "coordinator/server.key"},
              "lora": {"target_modules": ["all-linear"]},
              "quorum": {"heartbeat_timeout_s": 300.0, "deadline_s": 86400.0, "min_at_deadline": 2}}
    assert load_config(FederationConfig, fed / "federation.toml") == from_dict(FederationConfig, chosen,
                                                                               base_dir=fed.resolve())


def test_config_check_prints_every_setting_marking_file_and_default(tmp_path: Path) -> None:
    path = tmp_path / "federation.toml"
    path.write_text('federation_id = "f"\nbase_model = "/srv/base"\nstate_dir = "s"\nregistry_dir = "r"\n'
                    '[tls]\nca = "a"\ncert = "b"\nkey = "c"\n[training]\nmax_steps = 50\n')
    r = CliRunner().invoke(app, ["config", "check", str(path)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert any(line.startswith("training.max_steps") and "= 50" in line and line.endswith("# file") for line in lines)
    assert any(line.startswith("training.learning_rate") and line.endswith("# default") for line in lines)
    assert any(line.startswith("quorum.deadline_s") and line.endswith("# default") for line in lines)


@pytest.mark.parametrize("body,where", [
    ('federation_id = "f"\n', "field 'base_model': required but missing"),
    ('[training]\nmax_stepz = 1\n', "field 'training.max_stepz': unknown field"),
    ('[lora]\nrank = "eight"\n', "field 'lora.rank': must be an integer"),
    ('rounds = [\n', "invalid TOML"),
])
def test_config_check_refuses_a_bad_file_in_one_line(tmp_path: Path, body: str, where: str) -> None:
    path = tmp_path / "federation.toml"
    base = 'federation_id = "f"\nbase_model = "/b"\nstate_dir = "s"\nregistry_dir = "r"\n[tls]\nca = "a"\ncert = "b"\n' \
           'key = "c"\n'
    path.write_text(body if "base_model" in where else base + body)
    r = CliRunner().invoke(app, ["config", "check", str(path)])
    assert r.exit_code == 2
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert str(path) in r.output and where in r.output
