"""A real Flower deployment on loopback running fedbridge's apps: one ``flower-superlink``, one ``flower-supernode``
per site (``--node-config "site-config='<its site.toml>'"``) and ``flwr run`` of the FAB in ``deploy/flower``.

All processes listen on 127.0.0.1 on free ports, talk TLS (the federation's dev CA and the coordinator's server
certificate serve the SuperLink's Fleet and Control APIs), run with ``FLWR_HOME`` inside ``root`` (nothing is
written to the user's ``~/.flwr``) and are stopped, with their process groups, on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAB_DIR = REPO / "deploy" / "flower"
BIN = Path(sys.executable).parent
TAG_ENV = "FEDBRIDGE_FLOWER_DEPLOYMENT"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TlsFiles:
    """The SuperLink's certificate, its key, and the CA the SuperNodes and the CLI verify it with."""

    ca: Path
    cert: Path
    key: Path


@dataclass
class FlowerDeployment:
    """Paths and processes of a loopback Flower deployment under ``root``.

    Args:
        root: Scratch folder (logs, FLWR_HOME, the app folder).
        tls: Certificates for the SuperLink; None: ``--insecure`` everywhere.
    """

    root: Path
    tls: TlsFiles | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    port: int = 0
    _tag: str = field(default_factory=lambda: f"{os.getpid()}-{time.monotonic_ns()}")

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def _env(self) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH", "")
        # Flower starts its SuperExec and app processes by name (from PATH) and detached (a new session each), so
        # they leave this deployment's process groups: the tag in their environment finds them at stop time.
        return dict(os.environ, FLWR_HOME=str(self.root / "flwr-home"), PYTHONUNBUFFERED="1",
                    PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **{TAG_ENV: self._tag},
                    PYTHONPATH=f"{REPO}{os.pathsep}{path}" if path else str(REPO), HF_HUB_OFFLINE="1",
                    TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                    OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self._env(), cwd=self.root,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def _tls_args(self, role: str) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        if role == "superlink":
            return ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                    "--ssl-keyfile", str(self.tls.key)]
        return ["--root-certificates", str(self.tls.ca)]

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start the SuperLink and wait until it accepts connections (Flower 1.42 serves its Fleet, Control and
        runtime APIs over HTTP on one ``--host``/``--port``)."""
        self.port = free_port()
        self._spawn("superlink", [str(BIN / "flower-superlink"), *self._tls_args("superlink"),
                                  "--host", "127.0.0.1", "--port", str(self.port),
                                  "--database", str(self.root / "superlink.db")])
        self._wait_port("superlink", self.port, timeout)

    def start_supernode(self, name: str, node_config: str) -> None:
        """Start a SuperNode for one site (``node_config`` as for ``--node-config``)."""
        self._spawn(name, [str(BIN / "flower-supernode"), *self._tls_args("supernode"),
                           "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
                           "--port", str(free_port()), "--node-config", node_config])

    def app_dir(self) -> Path:
        """The FAB's folder (a copy of ``deploy/flower``: ``flwr run`` builds the FAB in place)."""
        out = self.root / "app"
        if not out.exists():
            shutil.copytree(FAB_DIR, out)
        return out

    def write_cli_config(self) -> Path:
        """``$FLWR_HOME/config.toml`` naming this SuperLink's Control API as connection ``local``."""
        home = self.root / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        conn = [f'address = "127.0.0.1:{self.port}"']
        conn.append(f'root-certificates = "{self.tls.ca}"' if self.tls else "insecure = true")
        (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\n' + "\n".join(conn)
                                          + "\n")
        return home / "config.toml"

    def run(self, run_config: dict[str, str | float | int], timeout: float) -> subprocess.CompletedProcess[str]:
        """``flwr run <app> local --stream --run-config ...``: submit the run and stream its logs until it ends."""
        self.write_cli_config()
        pairs = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in run_config.items())
        return subprocess.run([str(BIN / "flwr"), "run", str(self.app_dir()), "local", "--stream",
                               "--run-config", pairs], env=self._env(), cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def _wait_port(self, name: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited early:\n{self.tail(name)}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not listen on {port} within {timeout}s:\n{self.tail(name)}")
            time.sleep(0.1)

    def tail(self, name: str, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop_all(self) -> None:
        """SIGTERM every process this deployment started, and every process Flower started for it (found by the tag
        in their environment: they run detached, in sessions of their own), then SIGKILL what is left."""
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for pid in tagged_pids(self._tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):  # children of the group may outlive its leader
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        while (left := tagged_pids(self._tag)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> FlowerDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()



def tagged_pids(tag: str) -> list[int]:
    """Processes (other than this one) whose environment holds ``FEDBRIDGE_FLOWER_DEPLOYMENT=<tag>``."""
    want = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if want in env.split(b"\0"):
            found.append(int(entry.name))
    return found
