"""Preflight: every check passes on a good kit, and each broken part fails its own row only."""

from __future__ import annotations

import json
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from coordinator.trust.pki import create_dev_pki
from sandbox.synthetic import make_site_datasets
from site_agent.cli import app
from site_agent.config import SiteConfig, SiteData, SiteTls
from site_agent.preflight import run_preflight

SECRET = "Patient 4471 Jane Roe"


@pytest.fixture()
def kit(tmp_path: Path, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    pki = create_dev_pki(tmp_path / "pki", ["s1"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    creds = grpc.ssl_server_credentials([(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
                                        root_certificates=pki.ca_cert.read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    site = make_site_datasets(tmp_path / "data", n_sites=1, n_train=4, n_heldout=2)[0]
    k = pki.sites["s1"]
    cfg = SiteConfig(name="s1", coordinator=f"localhost:{port}", base_model=tiny_model_dir,
                     tls=SiteTls(ca=k.ca, cert=k.cert, key=k.key, signing_key=k.signing_key),
                     data=SiteData(train=site.train_path, heldout=site.heldout_path), work_dir=tmp_path / "work")
    yield cfg, pki, tmp_path
    server.stop(None)


def _by_name(rows):  # type: ignore[no-untyped-def]
    return {r.name: r for r in rows}


def test_a_good_kit_passes_every_check(kit) -> None:  # type: ignore[no-untyped-def]
    # Execute
    rows = _by_name(run_preflight(kit[0], connect_timeout_s=10))

    # Assert
    assert list(rows) == ["policy", "certificates", "signing key", "coordinator", "base model", "data", "disk", "gpu",
                          "training step"]
    assert all(r.ok for r in rows.values()), [r for r in rows.values() if not r.ok]
    assert rows["training step"].detail.startswith("sft: loss")


def test_each_broken_part_fails_its_own_row(kit) -> None:  # type: ignore[no-untyped-def]
    # Prepare: bad data on line 2, a policy pinning another base model, and a coordinator that is not there
    cfg, pki, tmp = kit
    bad = tmp / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                   + "\n" + json.dumps({"messages": [{"role": "robot", "content": SECRET}]}) + "\n")
    policy = tmp / "policy.toml"
    policy.write_text(f'allowed_base_models = ["{"0" * 64}"]\n')
    broken = SiteConfig(**{**cfg.__dict__, "data": SiteData(train=bad), "policy": policy,
                           "coordinator": "localhost:1"})

    # Execute
    rows = _by_name(run_preflight(broken, connect_timeout_s=1, dry_step=False))

    # Assert
    assert {n for n, r in rows.items() if not r.ok} == {"coordinator", "base model", "data"}
    assert "bad.jsonl:2: field 'messages[0].role'" in rows["data"].detail and SECRET not in rows["data"].detail
    assert "allowed base models" in rows["base model"].detail


def test_a_certificate_from_another_ca_fails(kit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    cfg, _, _ = kit
    other = create_dev_pki(tmp_path / "other", ["s1"]).sites["s1"]
    swapped = SiteConfig(**{**cfg.__dict__, "tls": SiteTls(ca=cfg.tls.ca, cert=other.cert, key=other.key,
                                                           signing_key=cfg.tls.signing_key)})

    # Execute
    rows = _by_name(run_preflight(swapped, connect_timeout_s=1, dry_step=False))

    # Assert
    assert not rows["certificates"].ok and rows["policy"].ok and rows["data"].ok


def test_cli_prints_the_table_and_exits_non_zero_on_failure(kit) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    cfg, _, tmp = kit
    site_toml = tmp / "site.toml"
    site_toml.write_text(f'name = "s1"\ncoordinator = "localhost:1"\nbase_model = "{cfg.base_model}"\n'
                         f'work_dir = "{cfg.work_dir}"\n[tls]\nca = "{cfg.tls.ca}"\ncert = "{cfg.tls.cert}"\n'
                         f'key = "{cfg.tls.key}"\nsigning_key = "{cfg.tls.signing_key}"\n'
                         f'[data]\ntrain = "{cfg.data.train}"\n')

    # Execute
    result = CliRunner().invoke(app, ["preflight", "--config", str(site_toml), "--timeout", "1"])

    # Assert
    assert result.exit_code == 1
    assert "coordinator" in result.output and "FAIL" in result.output and "PASS" in result.output


GPT2_TEMPLATE = ("{% for m in messages %}{{ m['role'] + '\\n' + m['content'] + '<|endoftext|>' + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'assistant\\n' }}{% endif %}")


def test_training_step_fails_where_run_would(kit) -> None:  # type: ignore[no-untyped-def]
    """GPT-2 ships no chat template: preflight's step fails with run's own refusal; the federation's file fixes it."""
    import dataclasses
    import os

    from sandbox.families import build_family_model
    from site_agent.agent import SiteRefusal, make_trainer

    cfg, _, tmp = kit
    gpt2 = build_family_model("gpt2", cache_dir=os.environ.get("FEDBRIDGE_CACHE") or tmp / "cache")
    cfg = dataclasses.replace(cfg, base_model=gpt2)
    with pytest.raises(SiteRefusal) as run_error:  # what `run` raises on its first task
        make_trainer("sft", gpt2, cfg.data.train, tmp / "w")
    rows = _by_name(run_preflight(cfg, connect_timeout_s=10))
    assert not rows["training step"].ok and str(run_error.value) in rows["training step"].detail
    assert not rows["base model"].ok and "has no chat template" in rows["base model"].detail
    template = tmp / "gpt2.jinja"
    template.write_text(GPT2_TEMPLATE)
    rows = _by_name(run_preflight(cfg, connect_timeout_s=10, chat_template=template))
    assert rows["training step"].ok and rows["base model"].ok, rows


def test_cli_in_a_narrow_terminal_lists_every_bad_row_whole(kit) -> None:  # type: ignore[no-untyped-def]
    """Through the real command as a subprocess, 40 columns wide: each bad row's file:line is printed uncut."""
    import os
    import subprocess
    import sys

    # Prepare: a long path and two bad rows (lines 2 and 3)
    cfg, _, tmp = kit
    bad = tmp / ("a-long-folder-name-for-the-site-data-" * 2) / "train.jsonl"
    bad.parent.mkdir()
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    bad.write_text(good + "\n" + json.dumps({"messages": [{"role": "robot", "content": SECRET}]}) + "\n"
                   + json.dumps({"messages": SECRET}) + "\n")
    site_toml = tmp / "site.toml"
    site_toml.write_text(f'name = "s1"\ncoordinator = "localhost:1"\nbase_model = "{cfg.base_model}"\n'
                         f'work_dir = "{cfg.work_dir}"\n[tls]\nca = "{cfg.tls.ca}"\ncert = "{cfg.tls.cert}"\n'
                         f'key = "{cfg.tls.key}"\nsigning_key = "{cfg.tls.signing_key}"\n[data]\ntrain = "{bad}"\n')
    root = Path(__file__).resolve().parents[2]

    # Execute
    r = subprocess.run([sys.executable, "-m", "site_agent", "preflight", "--config", str(site_toml), "--timeout", "1"],
                       cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "40", "PYTHONPATH": str(root)})

    # Assert
    out = r.stdout.splitlines()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "4471" not in r.stdout + r.stderr
    start = out.index("FAIL data:")
    assert out[start + 1:start + 3] == [f"  DataProblems: {bad}:2: field 'messages[0].role': must be one of system, "
                                        f"user, assistant",
                                        f"  {bad}:3: field 'messages': must be a list of messages, got string"]
    assert "FAIL training step:" in out
