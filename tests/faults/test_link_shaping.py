"""Latency, jitter and loss between the sites and the coordinator: both sites in one network namespace, the
coordinator in another, every packet between them through a shaped link (:mod:`bench.linkemu`: kernel netem where
the kernel has it, else the userspace TUN emulator; the case prints which ran). The federation completes over it,
nothing is lost or counted twice, and the published adapter equals the fault-free run's. Needs root (skipped
otherwise); the namespaces are removed again. (Slow.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faultkit
import pytest

from bench import linkemu
from sandbox import netns

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RATE_BPS, RTT_S, JITTER_S, LOSS = 20e6, 0.080, 0.020, 0.01  # a long, jittery, lossy WAN path


def test_latency_jitter_loss(reference: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    reason = netns.unavailable_reason()
    if reason or not os.path.exists("/dev/net/tun"):
        pytest.skip(f"a shaped link needs namespaces and TUN: {reason or '/dev/net/tun is missing'}")
    prefix = f"fbj{os.getpid() % 100000}"
    link = linkemu.make_link(prefix, RATE_BPS, RTT_S, LOSS, jitter_s=JITTER_S)
    with link:
        print(f"link: {link.describe}")
        # Prepare: the reference federation, its coordinator behind the link (certificate for its link address)
        fed = faultkit.prepare(tmp_path / "fed", tiny_model_dir, csr_enrolment=True,
                               coordinator_host=linkemu.COORD_IP, coordinator_port=50051)
        fed.wrap = {"coordinator": link.exec_in("coord"), **{s.name: link.exec_in("site") for s in fed.sites}}
        # Execute: the whole federation over the link
        with fed:
            fed.start_coordinator()
            for s in fed.sites:
                fed.start_site(s)
            faultkit.finish(fed, timeout=600)
        stats = link.stats()
    # Assert: nothing lost or doubled; the same adapter; the link really dropped packets (userspace: counted)
    faultkit.assert_each_update_once(fed)
    faultkit.assert_same_adapter(faultkit.published(fed), reference.adapter)
    if stats:
        assert stats["up"]["lost"] + stats["down"]["lost"] > 0, stats
        print(f"link stats: {stats}")
    assert not [ns for ns in netns.list_namespaces() if ns.startswith(prefix)]
