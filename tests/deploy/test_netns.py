"""The multi-host federation in network namespaces (sandbox.netns): a coordinator VPC and three institution VPCs,
firewalled so each site reaches only the coordinator's gRPC port; the demo federation runs across them to
publication, a site that dials another site is blocked, and no namespace survives the run, even a failed one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import netns


@pytest.fixture(scope="module")
def can_netns() -> Iterator[None]:
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"multi-host run needs network namespaces: {reason}")
    yield


def mine() -> list[str]:
    """This process's namespaces still on the machine."""
    return [ns for ns in netns.list_namespaces() if ns.startswith(f"{netns.PREFIX}{os.getpid()}-")]


def test_the_demo_federation_runs_across_the_vpcs_and_a_site_cannot_reach_another(can_netns: None,
                                                                                   tmp_path: Path) -> None:
    lines: list[str] = []
    result = netns.run(tmp_path / "run", rounds=2, steps=3, say=lines.append)
    out = "\n".join(lines)
    # The federation ran across the namespaces to publication ...
    assert result.codes == {"site-a": 0, "site-b": 0, "site-c": 0, "coordinator": 0}, out
    assert len(result.published) == 1 and (Path(result.published[0]) / "adapter").is_dir(), out
    # ... each site reached the coordinator's port, and nothing else got through
    by = {(p.src, p.dst, p.port, p.firewall): p for p in result.probes}
    for s in ("site-a", "site-b", "site-c"):
        assert by[(s, "coordinator", netns.GRPC_PORT, "on")].ok, out
    blocked = [by[("site-a", "site-b", netns.SITE_SERVICE_PORT, "on")], by[("site-b", "site-a", netns.SITE_SERVICE_PORT, "on")],
               by[("site-a", "coordinator", netns.PROBE_PORT, "on")], by[("router", "coordinator", netns.PROBE_PORT, "on")],
               by[("router", "site-a", netns.SITE_SERVICE_PORT, "on")]]
    assert not any(p.ok for p in blocked), out
    # the rules are what blocks: the same connect goes through with the two sites' firewalls off
    assert by[("site-a", "site-b", netns.SITE_SERVICE_PORT, "off")].ok, out
    assert not by[("site-a", "site-b", netns.SITE_SERVICE_PORT, "on again")].ok, out
    assert all(p.passed for p in result.probes) and result.ok, out
    # the certificate the sites verified names the coordinator's VPC address, and the rules say what was loaded
    from cryptography import x509

    san = x509.load_pem_x509_certificate(result.server_cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [result.coordinator_ip], out
    assert "-P OUTPUT DROP" in result.rules["site-a"] and f"--dport {netns.GRPC_PORT}" in result.rules["site-a"], out
    assert result.namespaces == [] and mine() == [], out


def test_a_failing_run_leaves_no_namespace_and_a_dead_runs_namespaces_go(can_netns: None) -> None:
    # A body that raises: the namespaces go anyway.
    with pytest.raises(RuntimeError, match="boom"), netns.Topology(sites=("site-a", "site-b")) as net:
        made = net.namespaces()
        assert set(made) <= set(netns.list_namespaces())
        raise RuntimeError("boom")
    assert not set(made) & set(netns.list_namespaces())
    # A killed earlier run's namespace (its pid is gone) is removed by the next run; a live one's is kept.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = f"{netns.PREFIX}{dead.pid}-coord", f"{netns.PREFIX}{os.getpid()}-keep"
    for ns in (stale, live):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        netns.remove_stale()  # (a run in another test process may have removed it first: either way it is gone)
        names = netns.list_namespaces()
        assert stale not in names and live in names
    finally:
        for ns in (stale, live):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert mine() == []


def test_without_root_it_says_why_and_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from typer.testing import CliRunner

    from sandbox.cli import app

    monkeypatch.setattr(netns.sys, "platform", "linux")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert netns.unavailable_reason() == "network namespaces need root (ip netns add)"
    assert netns.main(["--workdir", "unused"]) == 2
    assert "error: cannot run the multi-host federation here: network namespaces need root" in capsys.readouterr().err
    r = CliRunner().invoke(app, ["netns-demo"])
    assert r.exit_code == 2 and "need root" in r.output and "Traceback" not in r.output
    with pytest.raises(netns.NetnsUnavailable, match="need root"):
        netns.Topology().up()
