"""A whole federation on one machine: dev PKI, per-site private data, configs, and real processes on loopback.

The demo, the integration tests and the benchmarks all start their coordinator and sites through this module, as
separate OS processes talking gRPC over mutual TLS on 127.0.0.1, and always stop them again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.trust.pki import create_dev_pki
from fedcommon.tomlconfig import dumps, load_toml
from sandbox.benchmarks import make_shared_benchmark
from sandbox.synthetic import SiteData, make_site_datasets

PY = sys.executable


@dataclass
class LocalFederation:
    """Paths of a local federation laid out under ``root``."""

    root: Path
    federation_toml: Path
    state_dir: Path
    registry_dir: Path
    sites: list[SiteData]
    site_kits: dict[str, Path]
    base_model: Path
    record_inbound: Path | None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    port: int = 0
    host: str = "127.0.0.1"
    # Command prefix per process name ("coordinator" or a site's name), e.g. ``ip netns exec NS`` so that process
    # runs inside a network namespace (sandbox.netns); no entry: the process runs here, on loopback.
    wrap: dict[str, list[str]] = field(default_factory=dict)

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    # -- processes ----------------------------------------------------------------------------------------------
    def start_coordinator(self, timeout: float = 120.0, env: dict[str, str] | None = None) -> int:
        """Start the coordinator process and wait until it listens; returns its port. ``env`` adds variables."""
        port_file = self.state_dir / "coordinator.port"
        port_file.unlink(missing_ok=True)
        self.procs["coordinator"] = _spawn([*self.wrap.get("coordinator", []), PY, "-m", "coordinator", "serve",
                                            "--config", str(self.federation_toml)], self.log_path("coordinator"), env)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.procs["coordinator"].poll() is not None:
                raise RuntimeError(f"coordinator exited early; see {self.log_path('coordinator')}:\n"
                                   + _tail(self.log_path("coordinator")))
            if time.monotonic() > deadline:
                raise TimeoutError(f"coordinator did not start within {timeout}s; see {self.log_path('coordinator')}")
            time.sleep(0.1)
        self.port = int(port_file.read_text())
        return self.port

    def pin_port(self) -> None:
        """Make the coordinator listen on the port it got at its first start, so a restart keeps the sites'
        address (they reconnect by themselves)."""
        cfg = load_toml(self.federation_toml)
        cfg["listen"] = f"{self.host}:{self.port}"
        self.federation_toml.write_text(dumps(cfg))

    def write_site_config(self, site: SiteData, threads: int = 1, extra: dict[str, Any] | None = None) -> Path:
        kit = self.site_kits[site.name]
        cfg = {
            "name": site.name, "coordinator": f"{self.host}:{self.port}", "base_model": str(self.base_model),
            "work_dir": str(self.root / "sites" / site.name / "work"), "threads": threads,
            "tls": {"ca": str(kit / "ca.pem"), "cert": str(kit / "client.pem"), "key": str(kit / "client.key"),
                    "signing_key": str(kit / "signing.key")},
            "data": {"train": str(site.train_path), "heldout": str(site.heldout_path)},
            **(extra or {}),
        }
        path = self.root / "sites" / site.name / "site.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(cfg))
        return path

    def start_site(self, site: SiteData, threads: int = 1, extra: dict[str, Any] | None = None,
                   env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a site agent process with its config (``extra`` adds to it); ``env`` adds variables."""
        path = self.write_site_config(site, threads, extra)
        proc = _spawn([*self.wrap.get(site.name, []), PY, "-m", "site_agent", "run", "--config", str(path)],
                      self.log_path(site.name), env)
        self.procs[site.name] = proc
        return proc

    def wait(self, names: list[str], timeout: float) -> dict[str, int]:
        """Wait for processes to exit; returns their exit codes (raises TimeoutError naming the stragglers)."""
        deadline = time.monotonic() + timeout
        codes: dict[str, int] = {}
        while len(codes) < len(names):
            for n in names:
                rc = self.procs[n].poll()
                if rc is not None:
                    codes[n] = rc
            if time.monotonic() > deadline:
                missing = [n for n in names if n not in codes]
                raise TimeoutError(f"still running after {timeout}s: {missing}")
            time.sleep(0.2)
        return codes

    def run_all(self, timeout: float) -> dict[str, int]:
        """Start the coordinator and every site, then wait for all of them to exit; returns their exit codes."""
        self.start_coordinator()
        for s in self.sites:
            self.start_site(s)
        return self.wait([s.name for s in self.sites] + ["coordinator"], timeout=timeout)

    def diagnostics(self, names: tuple[str, ...] = ("coordinator", "site-a")) -> str:
        """The last lines of these processes' logs, for an assertion message."""
        return "\n".join(f"--- {n}:\n{_tail(self.log_path(n))}" for n in names)

    def stop_all(self) -> None:
        """Terminate every process that is still running (SIGTERM, then SIGKILL)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _spawn(cmd: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               **(extra_env or {}))
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=Path(__file__).resolve().parent.parent)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def prepare(root: Path, base_model: Path, *, n_sites: int = 3, rounds: int = 3, min_sites: int | None = None,
            training: dict[str, Any] | None = None, lora: dict[str, Any] | None = None, marker: str | None = None,
            record_inbound: bool = False, n_train: int = 64, n_heldout: int = 16, seed: int = 0,
            federation_id: str = "demo", shared_eval: dict[str, Any] | None = None, gate: dict[str, Any] | None = None,
            publish: dict[str, Any] | None = None, strategy: str = "fedavg",
            strategy_params: dict[str, Any] | None = None, privacy: dict[str, Any] | None = None,
            quorum: dict[str, Any] | None = None, chat_template: Path | None = None,
            base_model_ref: str = "fedbridge/tiny-llama", csr_enrolment: bool = False,
            shared_benchmarks: tuple[str, ...] = ("general_qa",), coordinator_host: str = "127.0.0.1",
            coordinator_port: int = 0) -> LocalFederation:
    """Lay out a federation under ``root``: PKI, data, and ``federation.toml``.

    ``shared_eval`` turns on the coordinator's EvalScope evaluation on a generated shared benchmark covering every
    site's fact family (:mod:`sandbox.benchmarks`); its keys override ``[evaluation]`` settings. ``gate`` and
    ``publish`` become the ``[gate]`` and ``[publish]`` tables, ``privacy`` the ``[privacy]`` table, ``quorum`` the
    ``[quorum]`` table (deadline, heartbeats, late-update policy). ``chat_template`` becomes ``[model]
    chat_template`` (a template file for a base that ships none). ``shared_benchmarks`` names the formats of the
    shared benchmark to run (by default only ``general_qa``, the open-question form the sites' data trains).

    ``csr_enrolment`` enrols the sites the way a real federation does instead of with the dev PKI: each site makes
    its keys in its own kit folder, the CA (in ``root/ca``, apart from the coordinator's ``root/pki``) signs their
    CSRs, the sites install the bundles, and the coordinator enforces the enrolment registry and the CRL.

    ``coordinator_host`` / ``coordinator_port`` are where the coordinator listens and the sites dial (port 0: a free
    one, read back at start); with ``csr_enrolment`` the host is also the coordinator certificate's address (SAN).
    """
    root = Path(root)
    sites = make_site_datasets(root / "data", n_sites=n_sites, seed=seed, marker=marker, n_train=n_train,
                               n_heldout=n_heldout)
    state_dir, registry = root / "coordinator" / "state", root / "published"
    access: dict[str, Any] = {}
    if csr_enrolment:
        tls, kits = _csr_enrol(root, base_model, [s.name for s in sites], host=coordinator_host, port=coordinator_port,
                               federation_id=federation_id, rounds=rounds, min_sites=min_sites or n_sites,
                               target_modules=tuple((lora or {}).get("target_modules", ("all-linear",))),
                               chat_template=chat_template)
        access = {"enrolment_registry": str(root / "pki" / "enrolment.json"), "crl": str(root / "pki" / "crl.pem")}
    else:
        pki = create_dev_pki(root / "pki", [s.name for s in sites])
        tls = {"ca": str(pki.ca_cert), "cert": str(pki.server_cert), "key": str(pki.server_key)}
        kits = {n: k.dir for n, k in pki.sites.items()}
    record = root / "coordinator" / "inbound.rec" if record_inbound else None
    cfg: dict[str, Any] = {
        "federation_id": federation_id, "base_model": str(base_model), "base_model_ref": base_model_ref,
        "rounds": rounds, "min_sites": min_sites or n_sites, "strategy": strategy,
        "strategy_params": strategy_params or {}, "listen": f"{coordinator_host}:{coordinator_port}",
        "state_dir": str(state_dir), "registry_dir": str(registry), "exit_when_done": True,
        "tls": tls, **access,
        "lora": lora or {}, "training": training or {},
    }
    if record:
        cfg["record_inbound"] = str(record)
    if shared_eval is not None:
        bench = make_shared_benchmark(root / "benchmark", n_sites=n_sites, seed=seed)
        cfg["evaluation"] = {"enabled": True, "benchmarks": bench.benchmark_tables(shared_benchmarks), **shared_eval}
    cfg["gate"], cfg["publish"], cfg["privacy"] = gate or {}, publish or {}, privacy or {}
    cfg["quorum"] = quorum or {}
    cfg["model"] = {"chat_template": str(chat_template)} if chat_template else {}
    fed_toml = root / "coordinator" / "federation.toml"
    fed_toml.parent.mkdir(parents=True, exist_ok=True)
    fed_toml.write_text(dumps({k: v for k, v in cfg.items() if v != {}}))
    return LocalFederation(root, fed_toml, state_dir, registry, sites, kits, Path(base_model), record,
                           host=coordinator_host)



def enrol_by_csr(fed: Path, ca_dir: Path, kit: Path, name: str, region: str) -> Path:
    """The real enrolment path for one site: ``fedbridge-site init`` makes its keys and CSR in ``kit``, the CA holder
    signs it (``enroll-site --csr``), the site installs the bundle (``install-bundle``). Returns ``kit``."""
    from coordinator.trust.enrolment import enroll_csr
    from site_agent.enrol import init_site, install_bundle

    _, bundle = enroll_csr(fed, ca_dir, init_site(kit, name).read_bytes(), region=region)
    (kit / "bundle.json").write_bytes(bundle)
    install_bundle(kit, kit / "bundle.json")
    return kit


def _csr_enrol(root: Path, base_model: Path, names: list[str], *, host: str = "127.0.0.1", port: int = 0,
               federation_id: str = "demo", rounds: int = 1, min_sites: int = 1,
               target_modules: tuple[str, ...] = ("all-linear",), chat_template: Path | None = None
               ) -> tuple[dict[str, str], dict[str, Path]]:
    """``fedbridge-admin init`` (CA in ``root/ca``, the coordinator's folder ``root/pki``, its certificate for
    ``host``), then one site-made kit per site by the CSR path (see :func:`prepare`). The ``federation.toml`` init
    writes in ``root/pki`` is not used: :func:`prepare` writes the one the coordinator runs with."""
    from coordinator.trust.enrolment import InitOptions, init_federation

    fed, ca_dir = root / "pki", root / "ca"
    hosts = ("127.0.0.1", "localhost") if host in ("127.0.0.1", "localhost") else (host,)
    # init wants a real port for the manifest's address; with port 0, each site's site.toml (write_site_config)
    # carries the port the coordinator got.
    init_federation(fed, InitOptions(federation_id=federation_id, base_model=base_model, hosts=hosts, port=port or 50051,
                                     rounds=rounds, min_sites=min_sites, target_modules=target_modules,
                                     chat_template=chat_template, ca_dir=ca_dir))
    kits: dict[str, Path] = {}
    for i, name in enumerate(names):
        kits[name] = enrol_by_csr(fed, ca_dir, root / "site-kits" / name, name, ("EU-DE", "EU-FR", "EU-NL")[i % 3])
    tls = {"ca": str(fed / "ca.pem"), "cert": str(fed / "coordinator" / "server.pem"),
           "key": str(fed / "coordinator" / "server.key")}
    return tls, kits
