"""A multi-host federation on one machine: a coordinator VPC and institution VPCs in Linux network namespaces.

Topology (one run; ``X`` is picked per run, ``P`` the run's prefix ``fbnet<pid>-<n>``)::

                        P-rtr  ("the internet": forwards between the VPCs, no firewall)
          r0 10.X.0.1/24   r1 10.X.1.1/24   r2 10.X.2.1/24   r3 10.X.3.1/24
              |                |                |                |        (veth pairs)
    P-coord eth0 10.X.0.2   P-site-a 10.X.1.2   P-site-b 10.X.2.2   P-site-c 10.X.3.2

Every VPC has one veth into the router namespace and a default route through it, so each pair of hosts is routable
and only the firewalls (iptables, in each VPC) decide what gets through, like security groups:

* an institution VPC: OUTPUT drops everything but loopback, replies on established connections, and new TCP
  connections to the coordinator's address and gRPC port; INPUT drops everything but loopback and replies. A site
  only ever dials out, to that one port.
* the coordinator VPC: INPUT drops everything but loopback, replies, and TCP to the gRPC port from the institution
  subnets; OUTPUT allows only loopback and replies (the coordinator never dials anyone).

The namespaces are connected only to each other, never to the host's network, so two runs in parallel (or a run and
a host with the same 10.X subnets) cannot see each other; the per-run names keep their namespaces apart.
:class:`Topology` always tears down what it made (context manager, ``atexit``), and removes namespaces a killed
earlier run left (``fbnet<pid>-*`` whose pid is gone).

:func:`run` lays out the demo federation (:mod:`sandbox.localfed`, sites enrolled by the real CSR path against a
coordinator certificate for its VPC address), runs the coordinator and each site agent in its own namespace, checks
the isolation with TCP connects, and waits for publication. ``python -m sandbox.netns`` (or ``fedbridge netns-demo``)
runs it and prints the topology, the firewall rules, the checks and the result. Needs root, ``ip`` (iproute2) and
``iptables`` (``deploy/setup.sh`` installs it).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PY = sys.executable
PREFIX = "fbnet"
GRPC_PORT = 50051
PROBE_PORT = 50052  # a stand-in for any other service on the coordinator's host (ssh, a database, ...)
SITE_SERVICE_PORT = 8080  # a stand-in service inside an institution, that another institution must not reach
OPEN = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"  # firewall off
_STALE = re.compile(rf"^{PREFIX}(\d+)-")
_SERIAL = itertools.count()

# Run with `python -S -c`: stdlib only, so a probe starts in tens of milliseconds.
_CONNECT = """
import json, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print(json.dumps({"ok": True, "error": ""}))
except OSError as e:
    print(json.dumps({"ok": False, "error": type(e).__name__ + ": " + (e.strerror or str(e) or "timed out")}))
"""
_LISTEN = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""


class NetnsUnavailable(RuntimeError):
    """This machine cannot make the namespaces (not root, or no ``ip`` / ``iptables``)."""


def unavailable_reason() -> str | None:
    """Why :class:`Topology` cannot run here, or ``None`` when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "iptables", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (deploy/setup.sh installs iptables; iproute2 gives ip)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-S"], capture_output=True, text=True)
        if r.returncode != 0:
            return f"iptables does not work inside a network namespace: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(cmd: Sequence[str], stdin: str | None = None) -> str:
    r = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def list_namespaces() -> list[str]:
    """Names of the network namespaces on this machine."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(ns: str) -> None:
    """Kill what still runs inside ``ns`` (processes this module started there), then delete it."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose process is gone (``fbnet<pid>-*``); returns their names."""
    gone = [ns for ns in list_namespaces() if (m := _STALE.match(ns)) and not _alive(int(m.group(1)))]
    for ns in gone:
        _delete_namespace(ns)
    return gone


@dataclass(frozen=True)
class Vpc:
    """One VPC: its namespace, its address, its subnet, and the router's end of its link."""

    name: str
    ns: str
    ip: str
    subnet: str
    gateway: str
    router_if: str


@dataclass(frozen=True)
class Probe:
    """One TCP connect from a VPC, what it should do, and what it did."""

    src: str
    dst: str
    host: str
    port: int
    expect_ok: bool
    ok: bool
    error: str
    firewall: str = "on"

    @property
    def passed(self) -> bool:
        return self.ok == self.expect_ok

    def line(self) -> str:
        got = "connected" if self.ok else f"blocked ({self.error})"
        want = "must connect" if self.expect_ok else "must be blocked"
        fw = "" if self.firewall == "on" else f" [firewall {self.firewall}]"
        return f"{'PASS' if self.passed else 'FAIL'}  {self.src} -> {self.dst} {self.host}:{self.port}{fw}: {got}; {want}"


@dataclass
class Topology:
    """A coordinator VPC and institution VPCs in network namespaces, routed through a router namespace."""

    sites: Sequence[str] = ("site-a", "site-b", "site-c")
    port: int = GRPC_PORT
    # Unique per topology: the pid keeps parallel runs apart, the counter two topologies of one process.
    prefix: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{next(_SERIAL)}")
    octet: int = field(default_factory=lambda: 16 + os.getpid() % 200)
    vpcs: dict[str, Vpc] = field(default_factory=dict, init=False)
    _made: list[str] = field(default_factory=list, init=False)
    _procs: list[subprocess.Popen] = field(default_factory=list, init=False)

    @property
    def router(self) -> str:
        return f"{self.prefix}-rtr"

    @property
    def coordinator(self) -> Vpc:
        return self.vpcs["coordinator"]

    def namespaces(self) -> list[str]:
        """Every namespace this topology makes (made or not yet)."""
        return [self.router, f"{self.prefix}-coord", *[f"{self.prefix}-{s}" for s in self.sites]]

    def exec_prefix(self, vpc: str) -> list[str]:
        """The command prefix that runs a process inside ``vpc``'s namespace."""
        return ["ip", "netns", "exec", self.vpcs[vpc].ns]

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def up(self) -> Topology:
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        remove_stale()
        atexit.register(self.down)
        names = ["coordinator", *self.sites]
        ns_of = dict(zip(names, self.namespaces()[1:], strict=True))
        try:
            for ns in self.namespaces():
                _sh(["ip", "netns", "add", ns])
                self._made.append(ns)
                _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            for i, name in enumerate(names):
                net = f"10.{self.octet}.{i}"
                vpc = Vpc(name, ns_of[name], f"{net}.2", f"{net}.0/24", f"{net}.1", f"r{i}")
                self.vpcs[name] = vpc
                # Made straight inside the two namespaces: no interface ever exists in the host's namespace.
                _sh(["ip", "-n", self.router, "link", "add", vpc.router_if, "type", "veth", "peer", "name", "eth0",
                     "netns", vpc.ns])
                _sh(["ip", "-n", self.router, "addr", "add", f"{vpc.gateway}/24", "dev", vpc.router_if])
                _sh(["ip", "-n", self.router, "link", "set", vpc.router_if, "up"])
                _sh(["ip", "-n", vpc.ns, "addr", "add", f"{vpc.ip}/24", "dev", "eth0"])
                _sh(["ip", "-n", vpc.ns, "link", "set", "eth0", "up"])
                _sh(["ip", "-n", vpc.ns, "route", "add", "default", "via", vpc.gateway])
            _sh(["ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            for name in names:
                self.set_firewall(name, True)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop the probes' listeners and delete every namespace this topology made (idempotent)."""
        for p in self._procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self._procs.clear()
        for ns in reversed(self._made):
            _delete_namespace(ns)
        self._made.clear()
        atexit.unregister(self.down)

    def __enter__(self) -> Topology:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- firewall ----------------------------------------------------------------------------------------------
    def rules(self, vpc: str) -> str:
        """The ``iptables-restore`` ruleset of ``vpc`` (see the module docstring)."""
        c = self.coordinator
        if vpc == "coordinator":
            sites = "".join(f"-A INPUT -p tcp -s {self.vpcs[s].subnet} -d {c.ip} --dport {self.port} -m conntrack "
                            "--ctstate NEW -j ACCEPT\n" for s in self.sites)
            return ("*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT DROP [0:0]\n"
                    "-A INPUT -i lo -j ACCEPT\n-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
                    + sites + "-A OUTPUT -o lo -j ACCEPT\n"
                    "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\nCOMMIT\n")
        return ("*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT DROP [0:0]\n"
                "-A INPUT -i lo -j ACCEPT\n-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
                "-A OUTPUT -o lo -j ACCEPT\n-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
                f"-A OUTPUT -p tcp -d {c.ip} --dport {self.port} -m conntrack --ctstate NEW -j ACCEPT\nCOMMIT\n")

    def set_firewall(self, vpc: str, enabled: bool) -> None:
        """Load ``vpc``'s rules, or (``enabled=False``) accept everything, atomically (iptables-restore)."""
        text = self.rules(vpc) if enabled else OPEN
        _sh(["ip", "netns", "exec", self.vpcs[vpc].ns, "iptables-restore"], stdin=text)

    def shown_rules(self, vpc: str) -> str:
        """What ``iptables -S`` says inside ``vpc`` right now."""
        return _sh(["ip", "netns", "exec", self.vpcs[vpc].ns, "iptables", "-S"])

    # -- probes ------------------------------------------------------------------------------------------------
    def listen(self, vpc: str, port: int) -> None:
        """Start a TCP listener on ``vpc``'s address (stopped by :meth:`down`)."""
        p = subprocess.Popen([*self.exec_prefix(vpc), PY, "-S", "-c", _LISTEN, self.vpcs[vpc].ip, str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"listener in {vpc} on port {port} did not start: {line or p.wait()}")

    def connect(self, src: str, dst: str, port: int, expect_ok: bool, timeout: float | None = None,
                firewall: str = "on") -> Probe:
        """A TCP connect from the namespace ``src`` (a VPC, or ``"router"``) to ``dst``'s address.

        A dropped SYN shows as a timeout (the firewalls DROP, they never answer). One that should connect gets long
        enough for a loaded machine; one that should be blocked passes by timing out, so a short wait is enough.
        """
        timeout = timeout if timeout is not None else (10.0 if expect_ok else 0.75)
        ns = self.router if src == "router" else self.vpcs[src].ns
        host = self.vpcs[dst].ip
        out = _sh(["ip", "netns", "exec", ns, PY, "-S", "-c", _CONNECT, host, str(port), str(timeout)])
        got = json.loads(out)
        return Probe(src, dst, host, port, expect_ok, got["ok"], got["error"], firewall)

    def isolation_checks(self) -> list[Probe]:
        """The checks, with every firewall on (the coordinator must be listening on its port already)."""
        a, b = self.sites[0], self.sites[1 % len(self.sites)]
        probes = [self.connect(s, "coordinator", self.port, True) for s in self.sites]
        if a != b:
            probes.append(self.connect(a, b, SITE_SERVICE_PORT, False))
            probes.append(self.connect(b, a, SITE_SERVICE_PORT, False))
        probes.append(self.connect(a, "coordinator", PROBE_PORT, False))
        # From outside every VPC: only the coordinator's INPUT chain stands between the router and the port.
        probes.append(self.connect("router", "coordinator", PROBE_PORT, False))
        probes.append(self.connect("router", a, SITE_SERVICE_PORT, False))
        return probes

    def firewall_off_checks(self) -> list[Probe]:
        """The same site-to-site connect with the two sites' firewalls off, then on again: the rules block it."""
        a, b = self.sites[0], self.sites[1 % len(self.sites)]
        if a == b:
            return []
        self.set_firewall(a, False)
        self.set_firewall(b, False)
        try:
            off = self.connect(a, b, SITE_SERVICE_PORT, True, firewall="off")
        finally:
            self.set_firewall(a, True)
            self.set_firewall(b, True)
        return [off, self.connect(a, b, SITE_SERVICE_PORT, False, firewall="on again")]

    def describe(self) -> str:
        lines = [f"router namespace {self.router} (forwards between the VPCs; joined to nothing else)"]
        for v in self.vpcs.values():
            role = "coordinator VPC" if v.name == "coordinator" else f"institution VPC ({v.name})"
            lines.append(f"  {role:<28} ns {v.ns:<22} eth0 {v.ip:<12} subnet {v.subnet:<14} "
                         f"<-veth-> {self.router} {v.router_if} {v.gateway}")
        return "\n".join(lines)


@dataclass
class RunResult:
    """What :func:`run` saw."""

    topology: str
    rules: dict[str, str]
    probes: list[Probe]
    codes: dict[str, int]
    published: list[str]
    seconds: float
    namespaces: list[str]
    coordinator_ip: str
    server_cert: Path

    @property
    def ok(self) -> bool:
        return (all(p.passed for p in self.probes) and bool(self.published)
                and all(c == 0 for c in self.codes.values()))


def run(workdir: Path, *, rounds: int = 2, steps: int = 4, rank: int = 8, n_train: int = 32, n_heldout: int = 8,
        timeout_s: float = 300.0, say: Callable[[str], None] = print) -> RunResult:
    """The demo federation across the VPCs, with the isolation checks; see the module docstring.

    Returns what it saw (it raises only when the topology cannot be made or the federation does not finish in
    ``timeout_s``); every process and namespace it made is gone when it returns.
    """
    from sandbox import localfed
    from sandbox.tiny_model import build_tiny_model

    start = time.monotonic()
    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    base = build_tiny_model(cache_dir=os.environ.get("FEDBRIDGE_CACHE") or None)
    with Topology() as net:
        say(f"[{time.monotonic() - start:.0f}s] topology:\n" + net.describe())
        rules = {v: net.shown_rules(v) for v in net.vpcs}
        for v, text in rules.items():
            say(f"firewall of {v} ({net.vpcs[v].ns}), iptables -S:\n" + "\n".join(f"  {r}" for r in text.splitlines()))
        c = net.coordinator
        # The demo's data and settings (sandbox.demo), shortened; the coordinator's certificate names its VPC address.
        fed = localfed.prepare(workdir, base, n_sites=len(net.sites), rounds=rounds, csr_enrolment=True,
                               coordinator_host=c.ip, coordinator_port=net.port, n_train=n_train, n_heldout=n_heldout,
                               training={"max_steps": steps, "learning_rate": 2e-3, "batch_size": 8},
                               lora={"rank": rank, "alpha": 2.0 * rank, "target_modules": ["all-linear"]},
                               publish={"license": "apache-2.0"})
        say(f"[{time.monotonic() - start:.0f}s] enrolled by CSR: coordinator certificate for {c.ip} (fedbridge-admin "
            f"init --host {c.ip}); site kits {', '.join(sorted(fed.site_kits))} (fedbridge-site init, enroll-site "
            "--csr, install-bundle)")
        fed.wrap = {"coordinator": net.exec_prefix("coordinator"), **{s: net.exec_prefix(s) for s in net.sites}}
        with fed:
            port = fed.start_coordinator(timeout=120)
            say(f"[{time.monotonic() - start:.0f}s] coordinator serving on {c.ip}:{port} inside {c.ns}")
            for s in fed.sites:
                # The kit's policy.toml pins the base, the CA and the coordinator's host, as a real site's would.
                fed.start_site(s, extra={"policy": str(fed.site_kits[s.name] / "policy.toml")})
            # The checks run while the site agents start (their imports take longer than the checks): switching two
            # sites' firewalls off and on again for one connect cannot hurt them, they only dial the coordinator.
            net.listen("coordinator", PROBE_PORT)
            for s in net.sites:
                net.listen(s, SITE_SERVICE_PORT)
            probes = net.isolation_checks() + net.firewall_off_checks()
            say(f"[{time.monotonic() - start:.0f}s] isolation checks (TCP connect):\n"
                + "\n".join(f"  {p.line()}" for p in probes))
            try:
                codes = fed.wait([s.name for s in fed.sites] + ["coordinator"], timeout=timeout_s)
            except TimeoutError as e:
                raise TimeoutError(f"{e}; logs in {fed.root / 'logs'}:\n{localfed._tail(fed.log_path('coordinator'))}"
                                   ) from None
        from coordinator.rounds.store import Store

        published = [str(p["path"]) for p in Store(fed.state_dir).publications()] if fed.state_dir.exists() else []
        say(f"[{time.monotonic() - start:.0f}s] federation: exit codes {codes}; {rounds} rounds; published: "
            f"{', '.join(published) or 'nothing'}")
        for name, rc in codes.items():
            if rc:
                say(f"--- {name} log (tail) ---\n{localfed._tail(fed.log_path(name))}")
        made = net.namespaces()
    left = [ns for ns in list_namespaces() if ns in made]
    result = RunResult(net.describe(), rules, probes, codes, published, time.monotonic() - start, left, c.ip,
                       Path(fed.root / "pki" / "coordinator" / "server.pem"))
    say(f"namespaces left after teardown: {left or 'none'}; {result.seconds:.0f}s; "
        + ("OK" if result.ok else "FAILED"))
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sandbox.netns", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("netns-run"), help="folder for PKI, data, state, logs (wiped)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="local steps per round")
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"error: cannot run the multi-host federation here: {reason}", file=sys.stderr)
        return 2
    return 0 if run(args.workdir, rounds=args.rounds, steps=args.steps).ok else 1


if __name__ == "__main__":
    sys.exit(main())

