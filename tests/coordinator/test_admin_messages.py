"""Small operator-facing faults: the evals hint names its config section, and the starter federation.toml holds
every [records] field that export-records asks for."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.admin import commands
from coordinator.admin.cli import app
from coordinator.config import RecordsSpec
from coordinator.release.records import build_record
from coordinator.trust.enrolment import InitOptions, init_federation
from fedcommon.tomlconfig import load_toml


def test_evals_with_no_evaluation_names_the_config_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "_run", lambda *a, **k: {"evaluations": []})

    result = CliRunner().invoke(app, ["evals", "--coordinator", "localhost:1"])

    assert result.exit_code == 0, result.output
    assert "no evaluation has run (is [evaluation] enabled = true in federation.toml?)" in result.output
    assert "(is  enabled?)" not in result.output


def test_starter_federation_toml_has_every_records_field_export_records_asks_for(tmp_path: Path,
                                                                               tiny_model_dir: Path) -> None:
    from coordinator.config import load_federation_config

    # Prepare
    fed = tmp_path / "fed"
    init_federation(fed, InitOptions(federation_id="fed", base_model=tiny_model_dir, hosts=("localhost",)))

    # Execute
    starter = load_toml(fed / "federation.toml")["records"]
    record = build_record(load_federation_config(fed / "federation.toml"))

    # Assert: every "set [records].X" the record asks for names a key the operator can find and fill in
    assert set(starter) == {f.name for f in dataclasses.fields(RecordsSpec)}
    asked = {v.split("[records].")[1].split(" ")[0] for v in _strings(record) if "NOT SET (set [records]." in v}
    assert "data_subjects" in asked and asked <= set(starter)


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []
