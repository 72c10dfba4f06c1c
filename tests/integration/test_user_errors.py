"""Every user error, through the real CLIs: one clear line naming what and where, never a traceback (issue #14).

Each case runs ``fedbridge-admin`` / ``fedbridge-site`` / ``fedbridge`` as a subprocess (``python -m``), with an
environment of PATH, the offline flags and ``COLUMNS=80`` only (a narrow terminal must not fold the one line),
and checks: a non-zero, documented exit code; no ``Traceback`` and no ``File "`` frame anywhere in the output;
exactly one *error line* -- a line that starts with one of :data:`ERROR_PREFIXES` -- holding every expected
fragment (the file and line, the field, the host:port...); and that nothing the case started from changed (its
input files are byte-identical afterwards, and no state was half-written).

The cases share one tiny base, one federation (made once, in-process) and one live coordinator; a case that needs
a changed file makes its own copy in its own folder. All run concurrently in one module fixture; each case is then
its own test id, asserting its recorded result, so a failure names the case.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fedcommon.tomlconfig import dumps

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
CLIS = {"admin": "coordinator", "site": "site_agent", "fedbridge": "sandbox"}
# The line a CLI prints for a refusal starts with one of these (docs/operate/set-up-a-federation.md, "Errors").
ERROR_PREFIXES = ("error:", "config error:", "base model error:", "refused:", "FAIL ")
EXIT_USAGE, EXIT_FAILED = 2, 1


@dataclasses.dataclass
class World:
    """What the cases share: made once per module, never changed by a case."""

    root: Path
    base: Path
    fed: Path
    ca_dir: Path
    kit: Path
    site: dict[str, Any]  # a good site.toml (absolute paths)
    train: Path
    admin_kit: Path
    revoked_kit: Path
    port: int = 0  # the live coordinator's

    def site_toml(self, where: Path, **changes: Any) -> Path:
        """A site.toml in ``where``: the good one with ``changes`` (``tls``/``data`` merged; None drops a key)."""
        cfg = json.loads(json.dumps(self.site))
        for k, v in changes.items():
            if isinstance(v, dict):
                cfg[k] = {**cfg[k], **v}
                cfg[k] = {a: b for a, b in cfg[k].items() if b is not None}
            elif v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        path = where / "site.toml"
        path.write_text(dumps(cfg).replace("{dir}", str(where)))
        return path

    def fed_toml(self, where: Path, text: Callable[[str], str] = lambda t: t) -> Path:
        """A copy of the federation's federation.toml in ``where`` (paths made absolute), edited by ``text``."""
        t = (self.fed / "federation.toml").read_text()
        for key, rel in (("ca", "ca.pem"), ("cert", "coordinator/server.pem"), ("key", "coordinator/server.key"),
                         ("enrolment_registry", "enrolment.json"), ("crl", "crl.pem")):
            t = t.replace(f'{key} = "{rel}"', f'{key} = "{self.fed / rel}"')
        path = where / "federation.toml"
        where.mkdir(parents=True, exist_ok=True)
        path.write_text(text(t))
        return path


@dataclasses.dataclass(frozen=True)
class Case:
    """One user error. ``setup(world, dir)`` makes what the case needs in its own ``dir`` and returns the argv after
    the CLI; ``expect`` are fragments the error line must hold (``{dir}`` and ``{port}`` are filled in)."""

    id: str
    category: str
    cli: str
    setup: Callable[[World, Path], list[str]]
    expect: tuple[str, ...]
    code: int = EXIT_USAGE
    timeout: float = 400.0
    env: tuple[tuple[str, str], ...] = ()  # added to the CLI's environment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _rows(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


SFT = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "Paris."}]}


# -- the cases ---------------------------------------------------------------------------------------------------
def _fed_check(edit: Callable[[str], str]) -> Callable[[World, Path], list[str]]:
    return lambda w, d: ["config", "check", str(w.fed_toml(d, edit))]


def _site_check(**changes: Any) -> Callable[[World, Path], list[str]]:
    return lambda w, d: ["config", "check", str(w.site_toml(d, **changes))]


def _site_text(text: str) -> Callable[[World, Path], list[str]]:
    return lambda w, d: ["config", "check", str(_write(d / "site.toml", text))]


def _policy(text: str) -> Callable[[World, Path], list[str]]:
    return lambda w, d: ["config", "check", "--policy", str(_write(d / "policy.toml", text))]


def _site_run(**changes: Any) -> Callable[[World, Path], list[str]]:
    return lambda w, d: ["run", "-c", str(w.site_toml(d, retry_for_s=2.0, **changes))]


def _check_data(text: str, *extra: str) -> Callable[[World, Path], list[str]]:
    return lambda w, d: ["check-data", str(_write(d / "train.jsonl", text)), *extra]


def _init(*extra: str, base: Callable[[World, Path], Path] | None = None) -> Callable[[World, Path], list[str]]:
    def setup(w: World, d: Path) -> list[str]:
        return ["init", "--dir", str(d / "fed"), "--federation-id", "x", "--base-model",
                str(base(w, d) if base else w.base), *[a.format(dir=d) for a in extra]]
    return setup


def _serve(edit: Callable[[str], str]) -> Callable[[World, Path], list[str]]:
    def setup(w: World, d: Path) -> list[str]:
        return ["serve", "-c", str(w.fed_toml(d, lambda t: edit(t.replace('state_dir = "state"',
                                                                        f'state_dir = "{d / "state"}"'))))]
    return setup


def _sub(old: str, new: str) -> Callable[[str], str]:
    def edit(t: str) -> str:
        assert old in t, old
        return t.replace(old, new, 1)
    return edit


def _line_of(text: str, fragment: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


def _base_copy(w: World, d: Path, change: Callable[[Path], None] | None = None) -> Path:
    out = d / "base"
    shutil.copytree(w.base, out)
    if change:
        change(out)
    return out


def _not_a_model(w: World, d: Path) -> Path:
    _write(d / "notamodel" / "README.md", "a folder of notes\n")
    return d / "notamodel"


def _no_template(base: Path) -> None:
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name in ("chat_template.jinja", "chat_template.json", "fedbridge-manifest.json"):
        (base / name).unlink(missing_ok=True)


def _bad_jinja(w: World, d: Path) -> list[str]:
    return _init("--chat-template", str(_write(d / "bad.jinja", "{% for m in messages %}{{ m.content }}")))(w, d)


def _no_spans(w: World, d: Path) -> list[str]:
    # Renders the user turns only: the assistant's reply never appears, so no assistant mask can be derived.
    tpl = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    return _init("--chat-template", str(_write(d / "nospans.jinja", tpl)))(w, d)


def _tamper_weight(base: Path) -> None:
    f = base / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def _foreign_ca(w: World, d: Path) -> list[str]:
    from coordinator.trust.pki import create_dev_pki

    other = create_dev_pki(d / "other", ["site-a"])
    kit = other.sites["site-a"].dir
    return _site_run(tls={"cert": str(kit / "client.pem"), "key": str(kit / "client.key")})(w, d)


def _expired(w: World, d: Path) -> list[str]:
    import datetime as dt

    from cryptography import x509

    from coordinator.trust.pki import CertificateAuthority
    from fedcommon import certs

    ca = CertificateAuthority.load(w.ca_dir / "ca.pem", w.ca_dir / "ca.key")
    cert = x509.load_pem_x509_certificate((w.kit / "client.pem").read_bytes())
    ident = certs.identity(cert)
    pem = ca.certificate("site-a", "site", cert.public_key(), signing_key=ident.signing_key, days=1,  # type: ignore[arg-type]
                         region=ident.region, not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
    _write(d / "expired.pem", pem.decode())
    return _site_run(tls={"cert": str(d / "expired.pem")})(w, d)


def _wrong_key(w: World, d: Path) -> list[str]:
    return _site_run(tls={"key": str(w.admin_kit / "client.key")})(w, d)


def _revoked(w: World, d: Path) -> list[str]:
    kit = w.revoked_kit
    return _site_run(name="site-r", tls={"ca": str(kit / "ca.pem"), "cert": str(kit / "client.pem"),
                                         "key": str(kit / "client.key"), "signing_key": str(kit / "signing.key")},
                     work_dir=str(d / "work"))(w, d)


def _dead_port(w: World, d: Path) -> list[str]:
    return _site_run(coordinator=f"127.0.0.1:{_dead(d)}")(w, d)


def _dead(d: Path) -> int:
    port = _free_port()
    (d / "port").write_text(str(port))
    return port


def _admin(*argv: str, **kw: str) -> Callable[[World, Path], list[str]]:
    def setup(w: World, d: Path) -> list[str]:
        coord = kw.get("coordinator", "127.0.0.1:{port}").format(port=w.port, dead=_dead(d) if "{dead}" in
                                                                 kw.get("coordinator", "") else 0)
        return [*argv, "--coordinator", coord, "--kit", kw.get("kit", str(w.admin_kit)),
                *(["--server-name", kw["server_name"]] if "server_name" in kw else [])]
    return setup


BUSY: list[socket.socket] = []


def _listener(d: Path, backlog: int) -> int:
    """A loopback socket that listens and is never served (kept open in BUSY); its port, also in ``d/port``."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    BUSY.append(sock)
    port = sock.getsockname()[1]
    (d / "port").write_text(str(port))
    return port


def _port_in_use(w: World, d: Path) -> list[str]:
    port = _listener(d, 1)
    return _serve(_sub('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))(w, d)


def _silent(w: World, d: Path) -> list[str]:
    # A TCP peer that takes the connection (the kernel completes it from the backlog) and never says a word: the TLS
    # handshake waits forever, so only the call's deadline ends it.
    port = _listener(d, 8)
    return _admin("status", coordinator=f"127.0.0.1:{port}")(w, d)


FED_ID_LINE = 'federation_id = "f"'
CASES: list[Case] = [
    # config: federation.toml
    Case("fed-syntax", "config", "admin", _fed_check(_sub("rounds = 3", "rounds = = 3")),
         ("{dir}/federation.toml", "line {line:rounds = = 3}")),
    Case("fed-unknown-key", "config", "admin", _fed_check(_sub("rounds = 3", "roundz = 3")),
         ("{dir}/federation.toml", "roundz")),
    Case("fed-wrong-type", "config", "admin", _fed_check(_sub("rounds = 3", 'rounds = "three"')),
         ("{dir}/federation.toml", "rounds")),
    Case("fed-out-of-range", "config", "admin", _fed_check(_sub("min_sites = 2", "min_sites = 0")),
         ("{dir}/federation.toml", "min_sites")),
    Case("fed-missing-field", "config", "admin", _fed_check(_sub(FED_ID_LINE, "")),
         ("{dir}/federation.toml", "federation_id")),
    Case("fed-nested-range", "config", "admin", _fed_check(_sub("rank = 8", "rank = -1")),
         ("{dir}/federation.toml", "lora.rank")),
    Case("fed-missing-file", "config", "admin", lambda w, d: ["config", "check", str(d / "nope.toml")],
         ("{dir}/nope.toml", "not found")),
    Case("fed-directory", "config", "admin", lambda w, d: ["config", "check", str(d)], ("{dir}", "directory")),
    Case("fed-serve-syntax", "config", "admin", _serve(_sub("rounds = 3", "rounds = = 3")),
         ("{dir}/federation.toml", "line {line:rounds = = 3}")),
    Case("fed-serve-directory", "config", "admin", lambda w, d: ["serve", "-c", str(d)], ("{dir}", "directory")),
    # config: site.toml
    Case("site-syntax", "config", "site", _site_text('name = "site-a"\nthreads = = 1\n'), ("{dir}/site.toml", "line 2")),
    Case("site-unknown-key", "config", "site", _site_check(thread=1), ("{dir}/site.toml", "thread")),
    Case("site-wrong-type", "config", "site", _site_check(threads="four"), ("{dir}/site.toml", "threads")),
    Case("site-out-of-range", "config", "site", _site_check(threads=-1), ("{dir}/site.toml", "threads")),
    Case("site-missing-field", "config", "site", _site_check(name=None), ("{dir}/site.toml", "name")),
    Case("site-placeholder", "config", "site", lambda w, d: ["config", "check", str(shutil.copy(
        w.kit / "site.toml.kit", d / "site.toml"))], ("{dir}/site.toml", "base_model", "FILL IN")),
    Case("site-missing-file", "config", "site", lambda w, d: ["config", "check", str(d / "nope.toml")],
         ("{dir}/nope.toml", "not found")),
    Case("site-directory", "config", "site", lambda w, d: ["config", "check", str(d)], ("{dir}", "directory")),
    Case("site-run-unknown-key", "config", "site", _site_run(thread=1), ("{dir}/site.toml", "thread")),
    # config: policy.toml
    Case("policy-syntax", "config", "site", _policy("max_rounds = \n"), ("{dir}/policy.toml", "line 1")),
    Case("policy-unknown-key", "config", "site", _policy("max_roundz = 3\n"), ("{dir}/policy.toml", "max_roundz")),
    Case("policy-wrong-type", "config", "site", _policy('trusted_coordinator_hosts = "localhost"\n'),
         ("{dir}/policy.toml", "trusted_coordinator_hosts")),
    Case("policy-missing-file", "config", "site", lambda w, d: ["config", "check", "--policy", str(d / "nope.toml")],
         ("{dir}/nope.toml", "not found")),
    Case("policy-directory", "config", "site", lambda w, d: ["config", "check", "--policy", str(d)],
         ("{dir}", "directory")),
    Case("site-run-policy-missing", "config", "site", _site_run(policy="{dir}/nope.toml"), ("{dir}/nope.toml",)),
    # data
    Case("data-missing-file", "data", "site", _site_run(data={"train": "{dir}/nope.jsonl"}),
         ("{dir}/nope.jsonl", "No such file")),
    Case("data-bad-json", "data", "site", _check_data(_rows(SFT, SFT, '{"messages": [')),
         ("{dir}/train.jsonl:3", "invalid JSON"), code=EXIT_FAILED),
    Case("data-missing-field", "data", "site", _check_data(_rows(SFT, {"messages": [{"role": "user"}]}), "--mode", "sft"),
         ("{dir}/train.jsonl", "{dir}/train.jsonl:2: field 'messages[0].content'"), code=EXIT_FAILED),
    Case("data-kto-mixed", "data", "site", _check_data(_rows(
        {"prompt": "Hi?", "completion": "Hello.", "label": True},
        {"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Yo."}],
         "label": False}), "--mode", "kto"),
         ("{dir}/train.jsonl:2: field 'prompt'", "first: line 1"), code=EXIT_FAILED),
    Case("data-empty", "data", "site", _check_data(""), ("{dir}/train.jsonl", "file holds no rows"),
         code=EXIT_FAILED),
    Case("data-check-missing", "data", "site", lambda w, d: ["check-data", str(d / "nope.jsonl")], ("{dir}/nope.jsonl",)),
    Case("data-run-bad-row", "data", "site", lambda w, d: _site_run(data={"train": str(_write(
        d / "train.jsonl", _rows(SFT, {"messages": "hi"})))})(w, d), ("{dir}/train.jsonl:2", "messages")),
    # template
    Case("template-none", "template", "admin", _init(base=lambda w, d: _base_copy(w, d, _no_template)),
         ("{dir}/base", "chat template", 'set [model] chat_template = "file.jinja"')),
    Case("template-bad-jinja", "template", "admin", _bad_jinja, ("{dir}/bad.jinja",)),
    Case("template-no-spans", "template", "admin", _no_spans, ("{dir}/nospans.jinja",)),
    Case("template-demo-bad-jinja", "template", "fedbridge", lambda w, d: [
        "demo", "--workdir", str(d / "run"), "--chat-template", str(_write(d / "bad.jinja", "{% if %}"))],
        ("{dir}/bad.jinja", "line 1", "not valid Jinja")),
    # target modules
    Case("targets-init", "target modules", "admin", _init("--target-module", "nope_proj"),
         ("lora.target_modules", "nope_proj")),
    Case("targets-serve", "target modules", "admin", _serve(_sub('target_modules = ["all-linear"]',
                                                                 'target_modules = ["nope_proj"]')),
         ("lora.target_modules", "nope_proj")),
    # base model
    Case("base-missing", "base model", "admin", _init(base=lambda w, d: d / "nope"), ("{dir}/nope",)),
    Case("base-not-a-model", "base model", "admin", _init(base=_not_a_model), ("{dir}/notamodel",)),
    Case("base-tampered-serve", "base model", "admin", lambda w, d: _serve(_sub(
        f'base_model = "{w.base}"', f'base_model = "{_base_copy(w, d, _tamper_weight)}"'))(w, d),
        ("model.safetensors",)),
    Case("base-demo-missing", "base model", "fedbridge", lambda w, d: [
        "demo", "--workdir", str(d / "run"), "--base-model", str(d / "nope")], ("{dir}/nope",)),
    Case("base-site-tampered", "base model", "site", lambda w, d: _site_run(
        base_model=str(_base_copy(w, d, _tamper_weight)), work_dir=str(d / "work"))(w, d), ("model.safetensors",)),
    # certificates
    Case("cert-missing", "certificates", "site", _site_run(tls={"cert": "{dir}/nope.pem"}),
         ("tls.cert", "{dir}/nope.pem")),
    Case("cert-key-mismatch", "certificates", "site", _wrong_key, ("tls.key", "is not the key of the certificate")),
    Case("cert-foreign-ca", "certificates", "site", _foreign_ca, ("tls.cert", "{dir}/other", "not issued by the CA")),
    Case("cert-expired", "certificates", "site", _expired, ("tls.cert", "{dir}/expired.pem", "expired")),
    Case("cert-revoked", "certificates", "site", _revoked, ("127.0.0.1:", "PERMISSION_DENIED", "revoked"),
         code=EXIT_FAILED),
    Case("csr-bad-file", "certificates", "admin", lambda w, d: [
        "enroll-site", "--csr", str(_write(d / "x.csr", "not a CSR\n")), "--region", "EU-DE", "--fed-dir", str(w.fed)],
        ("{dir}/x.csr",)),
    Case("csr-missing-file", "certificates", "admin", lambda w, d: [
        "enroll-site", "--csr", str(d / "nope.csr"), "--region", "EU-DE", "--fed-dir", str(w.fed)], ("{dir}/nope.csr",)),
    Case("csr-bad-name", "certificates", "site", lambda w, d: ["init", "--dir", str(d / "kit"), "--name", "bad name/x"],
         ("bad name/x",)),
    Case("admin-kit-missing", "certificates", "admin", _admin("status", kit="/nonexistent-kit"), ("/nonexistent-kit",)),
    # network
    Case("net-refused-site", "network", "site", _dead_port, ("127.0.0.1:{port}", "UNAVAILABLE"), code=EXIT_FAILED),
    Case("net-refused-admin", "network", "admin", _admin("status", coordinator="127.0.0.1:{dead}"),
         ("127.0.0.1:{port}",), code=EXIT_FAILED),
    Case("net-tls-name-admin", "network", "admin", _admin("status", server_name="wrong.example"),
         ("127.0.0.1:", "wrong.example", "Hostname Verification"), code=EXIT_FAILED),
    Case("net-tls-name-site", "network", "site", _site_run(server_name="wrong.example"),
         ("127.0.0.1:", "wrong.example", "Hostname Verification"), code=EXIT_FAILED),
    Case("net-port-in-use", "network", "admin", _port_in_use, ("127.0.0.1:{port}",)),
    Case("net-timeout-admin", "network", "admin", _silent, ("127.0.0.1:{port}", "DEADLINE_EXCEEDED", "within 2 s"),
         code=EXIT_FAILED, env=(("FEDBRIDGE_ADMIN_TIMEOUT", "2"),)),
]


# -- running them ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    argv: list[str]
    code: int
    out: str
    seconds: float
    before: dict[str, str]
    after: dict[str, str]
    dir: Path


def _snapshot(*roots: Path) -> dict[str, str]:
    snap: dict[str, str] = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.is_dir() else []:
            if p.is_file() and not p.is_symlink():
                snap[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def _env(tmp: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "COLUMNS": "80", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp), "HOME": str(tmp)}


def _run_case(world: World, case: Case) -> Result:
    d = world.root / "cases" / case.id
    d.mkdir(parents=True)
    argv = [a.replace("{dir}", str(d)) for a in case.setup(world, d)]
    shared = (world.fed, world.kit, world.base)
    before = _snapshot(d, *shared)
    t0 = time.monotonic()
    try:
        p = subprocess.run([PY, "-m", CLIS[case.cli], *argv], cwd=d, env=_env(world.root / "tmp") | dict(case.env),
                           capture_output=True, text=True, timeout=case.timeout)
        code, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        code, out = -999, f"timed out after {case.timeout} s: {e.stdout!r} {e.stderr!r}"
    after = _snapshot(d, *shared)
    (world.root / "outputs").mkdir(exist_ok=True)
    (world.root / "outputs" / f"{case.id}.txt").write_text(f"exit {code} {time.monotonic() - t0:.1f}s\n{out}")
    return Result(argv, code, out, time.monotonic() - t0, before, after, d)


def _start_coordinator(world: World, log: Path) -> subprocess.Popen:
    toml = world.fed_toml(world.root / "live", _sub('state_dir = "state"', f'state_dir = "{world.root / "live-state"}"'))
    return subprocess.Popen([PY, "-m", "coordinator", "serve", "-c", str(toml)], cwd=world.root,
                            env=_env(world.root / "tmp"), stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _make_world(root: Path, base: Path) -> World:
    from coordinator.trust.enrolment import InitOptions, init_federation, revoke_site
    from sandbox.localfed import enrol_by_csr

    fed, ca_dir = root / "fed", root / "fed-ca"
    init_federation(fed, InitOptions(federation_id="f", base_model=base, hosts=("localhost", "127.0.0.1"), port=50999,
                                     listen="127.0.0.1:0", ca_dir=ca_dir))
    kit = enrol_by_csr(fed, ca_dir, root / "kit", "site-a", "EU-DE")
    shutil.copy(kit / "site.toml", kit / "site.toml.kit")  # as the kit comes: placeholders in it
    revoked = enrol_by_csr(fed, ca_dir, root / "kit-r", "site-r", "EU-DE")
    revoke_site(fed, "site-r", "test", ca_dir=ca_dir)
    train = _write(root / "data" / "train.jsonl", _rows(*[SFT] * 4))
    site = {"name": "site-a", "coordinator": "127.0.0.1:0", "base_model": str(base), "work_dir": str(root / "work"),
            "retry_for_s": 2.0, "policy": str(kit / "policy.toml"),
            "tls": {"ca": str(kit / "ca.pem"), "cert": str(kit / "client.pem"), "key": str(kit / "client.key"),
                    "signing_key": str(kit / "signing.key")},
            "data": {"train": str(train)}}
    pol = (kit / "policy.toml").read_text().replace('trusted_coordinator_hosts = ["localhost"]',
                                                    'trusted_coordinator_hosts = ["localhost", "127.0.0.1"]')
    (kit / "policy.toml").write_text(pol)
    (root / "tmp").mkdir()
    return World(root, base, fed, ca_dir, kit, site, train, ca_dir / "admin", revoked)


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, Result]]:
    # Only the cases this session selected (``-k``), so one case can be rerun alone quickly.
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if hasattr(item, "callspec") and isinstance(item.callspec.params.get("case"), Case)}
    cases = [c for c in CASES if c.id in wanted]
    world = _make_world(tmp_path_factory.mktemp("user-errors"), tiny_model_dir)
    log = world.root / "coordinator.log"
    live = [c for c in cases if c.id in NEEDS_COORDINATOR]
    coord = _start_coordinator(world, log) if live else None
    try:
        port_file = world.root / "live-state" / "coordinator.port"
        offline = [c for c in cases if c.id not in NEEDS_COORDINATOR]
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = {c.id: pool.submit(_run_case, world, c) for c in offline}
            deadline = time.monotonic() + 600
            while coord is not None and not port_file.exists():
                assert coord.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            if coord is not None:
                world.port = int(port_file.read_text())
                world.site["coordinator"] = f"127.0.0.1:{world.port}"
            futures |= {c.id: pool.submit(_run_case, world, c) for c in live}
            got = {k: f.result() for k, f in futures.items()}
        if os.environ.get("FEDBRIDGE_SHOW_ERRORS"):  # a maintainer's view of every case's output
            for k, r in got.items():
                print(f"=== {k} exit {r.code} {r.seconds:.1f}s\n{r.out}")
        yield got
    finally:
        if coord is not None:
            coord.terminate()
            try:
                coord.wait(20)
            except subprocess.TimeoutExpired:
                coord.kill()
                coord.wait()
        for b in BUSY:
            b.close()
        BUSY.clear()


NEEDS_COORDINATOR = {"cert-key-mismatch", "cert-foreign-ca", "cert-expired", "cert-revoked", "net-tls-name-admin",
                     "net-tls-name-site", "base-site-tampered", "data-missing-file", "data-run-bad-row",
                     "site-run-unknown-key", "site-run-policy-missing", "cert-missing", "admin-kit-missing"}


def _expected(case: Case, r: Result) -> list[str]:
    port = (r.dir / "port").read_text() if (r.dir / "port").exists() else ""
    out = []
    for frag in case.expect:
        frag = frag.replace("{dir}", str(r.dir)).replace("{port}", port)
        m = re.search(r"\{line:(.*)\}", frag)
        if m:
            text = (r.dir / "federation.toml").read_text()
            frag = frag.replace(m.group(0), str(_line_of(text, m.group(1))))
        out.append(frag)
    return out


# Many subprocesses, several of which load torch or the base model: generous on a loaded machine.
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_one_clear_line(case: Case, results: dict[str, Result]) -> None:
    r = results[case.id]
    shown = f"{case.id}: exit {r.code} after {r.seconds:.1f} s, argv {r.argv}\n{r.out}"
    assert r.code == case.code, shown
    assert "Traceback" not in r.out and 'File "' not in r.out, shown
    out = r.out.splitlines()
    lines = [i for i, line in enumerate(out) if line.startswith(ERROR_PREFIXES)]
    assert len(lines) == 1, shown
    # The error line, and the indented detail lines under it (a data file's bad rows, one per line).
    block = [out[lines[0]], *[line for line in out[lines[0] + 1:] if line.startswith("  ")]]
    for frag in _expected(case, r):
        assert any(frag in line for line in block), (frag, shown)
    changed = [p for p, h in r.before.items() if r.after.get(p) != h]
    assert not changed, (changed, shown)
    assert not (r.dir / "fed" / "federation.toml").exists(), shown  # a refused init wrote no half a federation
