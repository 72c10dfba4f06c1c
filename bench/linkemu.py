"""A shaped link between two network namespaces: kernel netem where the kernel has it, else a userspace emulator.

Two namespaces, ``<prefix>-site`` (10.77.0.1) and ``<prefix>-coord`` (10.77.0.2), each with one point-to-point
device to the other. Every IP packet between them crosses the link, so TCP (and gRPC over it) sees real bandwidth,
delay and loss.

- netem (preferred): a veth pair, ``tc qdisc ... netem rate R delay D loss L`` on both ends;
- userspace (a kernel without netem, e.g. one booted with ``nomodule``): one TUN device in each namespace, both
  held open by :class:`TunLink`, which moves every packet from one to the other through, per direction, a random
  loss (Bernoulli, at enqueue, like netem's), a FIFO bottleneck queue of ``queue_bytes`` drained at ``rate_bps``
  (tail drop when full: a router's buffer), then a one-way delay: fixed, or with ``jitter_s`` a uniform random
  ``delay ± jitter`` per packet, never before the packet ahead of it (jitter without reordering, as netem's
  ``delay D J`` with a rate).

``cut(True)`` drops every packet both ways until ``cut(False)``: the link is down, the devices stay up (as when a
middlebox or a WAN link fails; neither end sees a carrier change).

Needs root (namespaces, TUN). Run ``python -m bench.linkemu --selftest`` to see it forward.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import random
import select
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field

SITE_IP, COORD_IP = "10.77.0.1", "10.77.0.2"
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (tried on a throwaway namespace's loopback)."""
    ns = f"fbprobe{os.getpid()}"
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                  check=False).returncode == 0
    except (OSError, subprocess.CalledProcessError):
        return False
    finally:
        sh("ip", "netns", "del", ns, check=False)


TCP_WMEM = "4096 16384 16777216"


def tune_tcp(ns: str) -> None:
    """Endpoint TCP settings of a host tuned for a long fat pipe (per namespace: nothing outside them changes): the
    send-buffer ceiling raised from 4 to 16 MiB (with loss the sender holds several BDPs of unacknowledged data),
    and no slow start after idle."""
    sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.tcp_wmem={TCP_WMEM}", check=False)
    # A connection that was quiet (the channel idles between a site's calls) keeps its congestion window.
    sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_slow_start_after_idle=0", check=False)


@dataclass
class Direction:
    """One way of the userspace link: bottleneck queue, then the delay line."""

    rate_bps: float
    delay_s: float
    loss: float
    queue_bytes: int
    jitter_s: float = 0.0  # each packet's delay is uniform in delay_s +- jitter_s (FIFO kept)
    free_at: float = 0.0  # when the bottleneck finishes sending what it holds
    line: collections.deque = field(default_factory=collections.deque)  # (deliver_at, packet), FIFO
    forwarded: int = 0
    bytes: int = 0
    lost: int = 0
    tail_dropped: int = 0
    cut_dropped: int = 0
    write_dropped: int = 0  # the receiving namespace's stack refused the packet (its backlog was full)

    def offer(self, pkt: bytes, now: float, rng: random.Random, cut: bool) -> None:
        if cut:
            self.cut_dropped += 1
            return
        if self.loss and rng.random() < self.loss:
            self.lost += 1
            return
        if self.rate_bps:
            backlog = max(0.0, self.free_at - now) * self.rate_bps / 8
            if backlog + len(pkt) > self.queue_bytes:
                self.tail_dropped += 1
                return
            self.free_at = max(now, self.free_at) + len(pkt) * 8 / self.rate_bps
            due = self.free_at + self.delay_s
        else:
            due = now + self.delay_s
        if self.jitter_s:
            due = max(now, due + rng.uniform(-self.jitter_s, self.jitter_s), self.line[-1][0] if self.line else 0.0)
        self.line.append((due, pkt))


class TunLink:
    """The userspace emulator (see the module docstring). ``rate_bps`` 0: no rate limit (to measure the emulator)."""

    kind = "userspace TUN emulator"

    def __init__(self, prefix: str, rate_bps: float, rtt_s: float, loss: float, queue_bytes: int | None = None,
                 seed: int = 0, jitter_s: float = 0.0) -> None:
        self.prefix = prefix
        self.site_ns, self.coord_ns = f"{prefix}-site", f"{prefix}-coord"
        queue = queue_bytes or max(64 << 10, int(rate_bps / 8 * rtt_s)) if rate_bps else 1 << 30
        self.up = Direction(rate_bps, rtt_s / 2, loss, queue, jitter_s)  # site -> coordinator
        self.down = Direction(rate_bps, rtt_s / 2, loss, queue, jitter_s)  # coordinator -> site
        self.describe = (f"{self.kind}: {rate_bps / 1e6:g} Mbit/s each way, {rtt_s * 1000:g} ms RTT "
                         f"({rtt_s * 500:g} ms one-way), {loss * 100:g}% random loss each way, FIFO bottleneck "
                         f"queue {queue} bytes (tail drop), "
                         + (f"{jitter_s * 1000:g} ms jitter each way" if jitter_s else "no jitter")
                         if rate_bps else f"{self.kind}: unshaped")
        self._rng = random.Random(seed)
        self._cut = False
        self._stop = threading.Event()
        self._fds: list[int] = []
        self._thread = threading.Thread(target=self._run, name="tunlink", daemon=True)

    def _tun(self, name: str) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        return fd

    def __enter__(self) -> TunLink:
        for ns in (self.site_ns, self.coord_ns):
            sh("ip", "netns", "del", ns, check=False)
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # BBR where the kernel has it: CUBIC's throughput under 0.5 % random loss at 150 ms RTT is a few Mbit/s
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_congestion_control=bbr", check=False)
            tune_tcp(ns)
        for dev, ns, me, peer in ((f"{self.prefix}s", self.site_ns, SITE_IP, COORD_IP),
                                  (f"{self.prefix}c", self.coord_ns, COORD_IP, SITE_IP)):
            self._fds.append(self._tun(dev))
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", me, "peer", peer, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for fd in self._fds:
            os.close(fd)
        for ns in (self.site_ns, self.coord_ns):
            sh("ip", "netns", "del", ns, check=False)

    def cut(self, down: bool) -> None:
        self._cut = down

    def exec_in(self, side: str) -> list[str]:
        """The command prefix that runs a program in the ``site`` or ``coord`` namespace."""
        return ["ip", "netns", "exec", self.site_ns if side == "site" else self.coord_ns]

    @staticmethod
    def _prioritise() -> None:
        """Real-time priority for this thread only: the link is hardware in the world it stands for, and must not
        wait for CPU behind the endpoints it connects (or anyone else's load); else a nice of -10."""
        tid = threading.get_native_id()
        try:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(10))
        except (OSError, AttributeError):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, -10)

    def _run(self) -> None:
        self._prioritise()
        site_fd, coord_fd = self._fds
        routes = {site_fd: (self.up, coord_fd), coord_fd: (self.down, site_fd)}
        while not self._stop.is_set():
            now = time.monotonic()
            due = [d.line[0][0] for d in (self.up, self.down) if d.line]
            timeout = max(0.0, min(due) - now) if due else 0.05
            readable, _, _ = select.select([site_fd, coord_fd], [], [], min(timeout, 0.05))
            now = time.monotonic()
            for fd in readable:
                direction, _ = routes[fd]
                for _ in range(256):  # drain what is there, bounded so the other side is served too
                    try:
                        pkt = os.read(fd, 65535)
                    except BlockingIOError:
                        break
                    direction.offer(pkt, now, self._rng, self._cut)
            now = time.monotonic()
            for direction, out in ((self.up, coord_fd), (self.down, site_fd)):
                line = direction.line
                while line and line[0][0] <= now:
                    _, pkt = line.popleft()
                    try:
                        os.write(out, pkt)
                        direction.forwarded += 1
                        direction.bytes += len(pkt)
                    except OSError:  # the kernel's queue on that device is full: dropped, as a real NIC would
                        direction.write_dropped += 1

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: {k: getattr(d, k) for k in ("forwarded", "bytes", "lost", "tail_dropped", "cut_dropped", "write_dropped")}
                for name, d in (("up", self.up), ("down", self.down))}


class NetemLink:
    """The kernel path: a veth pair between the namespaces with netem on both ends (same interface as TunLink)."""

    kind = "kernel netem"

    def __init__(self, prefix: str, rate_bps: float, rtt_s: float, loss: float, queue_bytes: int | None = None,
                 seed: int = 0, jitter_s: float = 0.0) -> None:
        self.prefix = prefix
        self.site_ns, self.coord_ns = f"{prefix}-site", f"{prefix}-coord"
        jitter = [f"{jitter_s * 1000:g}ms"] if jitter_s else []
        self.args = ["delay", f"{rtt_s * 500:g}ms", *jitter, "loss", f"{loss * 100:g}%"]
        if rate_bps:
            self.args += ["rate", f"{int(rate_bps)}bit"]
        self.args += ["limit", "100000"]
        self.describe = f"{self.kind}: netem {' '.join(self.args)} on both ends of a veth pair"
        self.devs = ((f"{prefix}s", self.site_ns), (f"{prefix}c", self.coord_ns))

    def __enter__(self) -> NetemLink:
        for ns in (self.site_ns, self.coord_ns):
            sh("ip", "netns", "del", ns, check=False)
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_congestion_control=bbr", check=False)
            tune_tcp(ns)
        (s, sns), (c, cns) = self.devs
        sh("ip", "link", "add", s, "netns", sns, "type", "veth", "peer", "name", c, "netns", cns)
        for (dev, ns), ip in zip(self.devs, (SITE_IP, COORD_IP), strict=True):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", *self.args)
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.site_ns, self.coord_ns):
            sh("ip", "netns", "del", ns, check=False)

    def cut(self, down: bool) -> None:
        args = ["delay", self.args[1], "loss", "100%"] if down else self.args
        for dev, ns in self.devs:
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "change", "dev", dev, "root", "netem", *args)

    def exec_in(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.site_ns if side == "site" else self.coord_ns]

    def stats(self) -> dict[str, dict[str, int]]:
        return {}


def make_link(prefix: str, rate_bps: float, rtt_s: float, loss: float, force_userspace: bool = False,
              jitter_s: float = 0.0) -> TunLink | NetemLink:
    """netem where the kernel has it (what the issue asks for), else the userspace emulator."""
    if not force_userspace and netem_available():
        return NetemLink(prefix, rate_bps, rtt_s, loss, jitter_s=jitter_s)
    return TunLink(prefix, rate_bps, rtt_s, loss, jitter_s=jitter_s)


if __name__ == "__main__":
    with make_link("fbself", 50e6, 0.15, 0.0) as link:
        print(link.describe)
        print(sh(*link.exec_in("site"), "ping", "-c", "3", COORD_IP, check=False).stdout)
        print(link.stats())
