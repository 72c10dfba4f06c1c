"""A network partition that heals: site-a's host is cut off from the coordinator (iptables DROP both ways in its
network namespace, as a failed WAN link or firewall would: no RST, no FIN) from the moment it joins until its
calls have failed into the cut for a while, then healed. The site's keepalive finds the dead connection, its retries reconnect
once the path is back, the upload resumes, and the federation publishes the same adapter as a fault-free run;
no update is lost or counted twice.
Where the cut lands in site-a's round (its download of the round's adapter, training, its upload) depends on the
machine's speed; each of them retries and resumes the same way.

Each process runs in its own network namespace (:mod:`sandbox.netns`: a coordinator VPC, one VPC per site, a router
between them); the sites are enrolled by CSR against a coordinator certificate for its VPC address. Needs root, ip
and iptables (skipped with the reason otherwise); every namespace is removed again, also on failure. (Slow.)
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import faultkit
import pytest
from b_support import store_count

from sandbox import netns

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # minutes on a busy machine: out of the default run
SITES = faultkit.SITES


def _rules(net: netns.Topology, site: str, op: str) -> None:
    """Insert (``-I``) or delete (``-D``) the DROP rules that cut ``site`` off from the coordinator, both ways."""
    c = net.coordinator.ip
    for rule in (["OUTPUT", "-d", c, "-j", "DROP"], ["INPUT", "-s", c, "-j", "DROP"]):
        where = [rule[0], "1"] if op == "-I" else [rule[0]]
        subprocess.run([*net.exec_prefix(site), "iptables", op, *where, *rule[1:]], check=True, capture_output=True)


def _failed_calls(log: str) -> int:
    """Calls of the site that failed for the network and are retried (UNAVAILABLE, DEADLINE_EXCEEDED, broken streams)."""
    return sum(("UNAVAILABLE" in line or "DEADLINE_EXCEEDED" in line) and ("retrying" in line or "resuming" in line)
               for line in log.splitlines())


def test_partition_heals(reference: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"partition case needs network namespaces: {reason}")
    with netns.Topology(sites=tuple(SITES)) as net:
        made = net.namespaces()
        # Prepare: the federation across the VPCs
        c = net.coordinator
        fed = faultkit.prepare(tmp_path / "fed", tiny_model_dir, csr_enrolment=True, coordinator_host=c.ip,
                               coordinator_port=net.port)
        fed.wrap = {"coordinator": net.exec_prefix("coordinator"), **{s: net.exec_prefix(s) for s in SITES}}
        with fed:
            fed.start_coordinator()
            for s in fed.sites:
                fed.start_site(s)
            faultkit.wait_until(lambda: store_count(fed.state_dir, "SELECT COUNT(*) FROM sites WHERE name='site-a'") == 1,
                                fed, 300, "site-a joined")

            # Execute: cut site-a off as it starts its round; heal once its calls have failed into the cut and
            # site-b's update is in (the rest of the federation carried on meanwhile); everyone must then finish
            _rules(net, "site-a", "-I")
            cut_at, before = time.monotonic(), len(faultkit.log_text(fed, "site-a"))
            faultkit.wait_until(lambda: _failed_calls(faultkit.log_text(fed, "site-a")[before:]) >= 3
                                and store_count(fed.state_dir, "SELECT COUNT(*) FROM updates WHERE site='site-b'") >= 1,
                                fed, 300, "site-a's calls failing in the partition")
            assert store_count(fed.state_dir, "SELECT COUNT(*) FROM updates WHERE site='site-a'") == 0
            _rules(net, "site-a", "-D")
            cut_s = time.monotonic() - cut_at
            faultkit.finish(fed)
        assert "-j DROP" not in net.shown_rules("site-a")
    # Assert: nothing lost or doubled; same adapter; no namespace left
    faultkit.assert_each_update_once(fed)
    faultkit.assert_same_adapter(faultkit.published(fed), reference.adapter)
    assert not set(made) & set(netns.list_namespaces())
    print(f"partition: site-a cut off for {cut_s:.1f}s")
