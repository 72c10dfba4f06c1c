"""The deployment kits (deploy/systemd, deploy/docker, deploy/helm) checked by real validators and by the project's loaders.

Validators (installed by deploy/setup.sh from deploy/kit-validators.txt, plus Debian's systemd-analyze): the units go
through ``systemd-analyze verify`` and ``security``, the Dockerfiles through hadolint, the compose file through the
compose-spec JSON schema vendored in check-jsonschema, and the chart through Helm's own Go SDK (lint and render) and
the Kubernetes JSON schemas of kubernetes-validate. A missing validator fails the test naming the install step; it
never passes silently. Each validator is also shown a broken kit, so a validator that checks nothing fails here too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from coordinator.config import load_federation_config
from fedcommon.tomlconfig import load_toml
from site_agent.config import load_site_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = {"coordinator": DEPLOY / "systemd" / "fedbridge-coordinator.service",
         "site": DEPLOY / "systemd" / "fedbridge-site.service"}
DOCKERFILES = {"coordinator": DEPLOY / "docker" / "coordinator.Dockerfile", "site": DEPLOY / "docker" / "site.Dockerfile"}
COMPOSE = DEPLOY / "docker" / "compose.yaml"
CHART = DEPLOY / "helm" / "fedbridge-coordinator"
CONFIG_ERROR_EXIT = 2  # what both CLIs exit with on a config error; the units must not restart on it
INSTALL_HINT = "install it with `bash deploy/setup.sh` (pins in deploy/kit-validators.txt)"


def tool(name: str) -> str:
    """The validator's executable: the venv's own first, then PATH. Fails (never skips) when it is missing."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"validator {name!r} is not installed; {INSTALL_HINT}")
    return found


def run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


# ---------------------------------------------------------------------------------------------------- systemd units

def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections to ordered (key, value) pairs; systemd allows a key more than once (configparser does not)."""
    out: dict[str, list[tuple[str, str]]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, [])
            continue
        key, _, value = line.partition("=")
        out[section].append((key.strip(), value.strip()))
    return out


def unit_values(unit: dict[str, list[tuple[str, str]]], key: str) -> list[str]:
    return [v for k, v in unit.get("Service", []) if k == key]


def verify_units(texts: dict[str, str], tmp: Path) -> str:
    """``systemd-analyze verify`` on copies whose ExecStart points at this venv's real entry points.

    Returns everything it printed: it reports unknown or unparsable directives on stderr but still exits 0.
    """
    analyze = tool("systemd-analyze")
    paths = []
    for role, text in texts.items():
        p = tmp / UNITS[role].name
        p.write_text(text.replace("/opt/fedbridge/venv/bin/", f"{Path(sys.executable).parent}/"))
        paths.append(str(p))
    r = run(analyze, "verify", *paths, cwd=tmp)
    return (r.stdout + r.stderr).strip() + (f"\n(exit {r.returncode})" if r.returncode else "")


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert verify_units({r: p.read_text() for r, p in UNITS.items()}, tmp_path) == ""


def test_systemd_analyze_verify_catches_a_broken_directive(tmp_path: Path) -> None:
    broken = UNITS["coordinator"].read_text().replace("ProtectSystem=strict", "ProtectSystm=strict")
    assert "ProtectSystm" in verify_units({"coordinator": broken}, tmp_path)


@pytest.mark.parametrize("role", sorted(UNITS))
def test_unit_exposure_is_low(role: str, tmp_path: Path) -> None:
    """systemd's own score of the sandbox (0 = locked down, 10 = none): at most 2.0, "OK"."""
    p = tmp_path / UNITS[role].name
    p.write_text(UNITS[role].read_text())
    r = run(tool("systemd-analyze"), "security", "--offline=yes", "--threshold=20", "--no-pager", str(p), cwd=tmp_path)
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert r.returncode == 0 and level, r.stdout[-2000:] + r.stderr
    assert float(level.group(1)) <= 2.0


@pytest.mark.parametrize("role", sorted(UNITS))
def test_unit_hardening_and_restart_policy(role: str) -> None:
    unit = parse_unit(UNITS[role].read_text())
    one = {k: v for k, v in unit["Service"]}
    assert one["User"] and one["User"] != "root" and one["Group"] != "root"
    for key, want in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectHome": "yes",
                      "Restart": "on-failure", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
                      "RestrictSUIDSGID": "yes", "SystemCallArchitectures": "native", "UMask": "0077"}.items():
        assert one.get(key) == want, f"{UNITS[role].name}: {key}={one.get(key)!r}, want {want!r}"
    assert "@system-service" in unit_values(unit, "SystemCallFilter")
    assert set(" ".join(unit_values(unit, "RestrictAddressFamilies")).split()) <= {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert str(CONFIG_ERROR_EXIT) in one["RestartPreventExitStatus"].split()
    # Writable: the state directory and nothing else.
    state = [f"/var/lib/{d}" for d in one["StateDirectory"].split()]
    writable = " ".join(unit_values(unit, "ReadWritePaths")).split()
    assert writable and all(any(w == s or w.startswith(s + "/") for s in state) for w in writable), writable
    assert one["WorkingDirectory"] in state
    assert one.get("MemoryDenyWriteExecute", "no") == "no"  # torch's oneDNN JIT needs W^X off (see the unit)


@pytest.mark.parametrize("cli", ["coordinator.admin.cli:serve", "site_agent.cli:run"])
def test_config_error_exit_code_is_the_one_not_restarted(cli: str, tmp_path: Path) -> None:
    """The units' RestartPreventExitStatus only works if a config error really exits with it (the real CLIs, in-process:
    a fresh interpreter per command costs seconds)."""
    import importlib

    from typer.testing import CliRunner

    module, command = cli.split(":")
    r = CliRunner().invoke(importlib.import_module(module).app, [command, "--config", str(tmp_path / "missing.toml")])
    assert r.exit_code == CONFIG_ERROR_EXIT, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


# ------------------------------------------------------------------------------------------------------ Dockerfiles

def hadolint(text: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    p = tmp / "Dockerfile"
    p.write_text(text)
    return run(tool("hadolint"), "--no-color", str(p))


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(role: str, tmp_path: Path) -> None:
    r = hadolint(DOCKERFILES[role].read_text(), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_an_unpinned_torch(tmp_path: Path) -> None:
    broken = DOCKERFILES["coordinator"].read_text().replace('"torch==${TORCH_VERSION}"', "torch")
    assert "DL3013" in hadolint(broken, tmp_path).stdout


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile_install_order_and_user(role: str) -> None:
    lines = [ln.strip() for ln in DOCKERFILES[role].read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert "ARG TORCH_VERSION=2.13.0" in lines
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines
    torch_at = next(i for i, ln in enumerate(lines) if '"torch==${TORCH_VERSION}"' in ln)
    assert '--index-url "${TORCH_INDEX_URL}"' in lines[torch_at]
    pkg_at = next(i for i, ln in enumerate(lines) if re.search(r"pip install (\.|\"\.\[\w+\]\")( |$)", ln))
    assert torch_at < pkg_at, "torch must be installed before the package"
    final = lines[max(i for i, ln in enumerate(lines) if ln.startswith("FROM ")):]
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) > 0, users
    entry = next(ln for ln in final if ln.startswith("ENTRYPOINT"))
    assert entry == {"coordinator": 'ENTRYPOINT ["fedbridge-admin", "serve"]',
                     "site": 'ENTRYPOINT ["fedbridge-site", "run"]'}[role]
    # Every package the wheel needs is copied in (a new top-level package must not be left out of the image).
    pyproject = load_toml(ROOT / "pyproject.toml")
    wanted = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {ln.split()[1] for ln in lines if ln.startswith("COPY ") and "--from" not in ln}
    assert wanted <= copied, wanted - copied
    assert all((ROOT / c).exists() for c in copied)


# ---------------------------------------------------------------------------------------------------------- compose

def compose_schema_errors(path: Path) -> str:
    r = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))
    return "" if r.returncode == 0 else r.stdout + r.stderr


def test_compose_file_matches_the_compose_spec_schema() -> None:
    assert compose_schema_errors(COMPOSE) == ""


def test_compose_schema_catches_a_misspelt_key(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:", "    healthchek:", 1))
    assert "healthchek" in compose_schema_errors(broken)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the << merge keys the kit uses


def mounts(service: dict) -> dict[str, dict]:
    return {m["target"]: m for m in service["volumes"]}


def test_compose_services_are_hardened() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"coordinator", "site-a", "site-b"}
    for name, s in services.items():
        assert s["read_only"] is True, name
        assert s["cap_drop"] == ["ALL"] and "no-new-privileges:true" in s["security_opt"], name
        uid = re.fullmatch(r"\$\{FEDBRIDGE_UID:-(\d+)\}:\$\{FEDBRIDGE_GID:-(\d+)\}", s["user"])
        assert uid and int(uid.group(1)) > 0 and int(uid.group(2)) > 0, name
        assert s["restart"].startswith("on-failure"), name
        assert s["healthcheck"]["test"], name
        assert any(t.startswith("/tmp") for t in s["tmpfs"]), name
        for target, m in mounts(s).items():
            if m["type"] == "bind":
                assert m.get("read_only") is True, f"{name}: {target} must be read-only"
            else:
                assert m["type"] == "volume" and m["source"] in doc["volumes"], f"{name}: {target}"
        for dep, cond in s.get("depends_on", {}).items():
            assert cond["condition"] == "service_healthy" and "healthcheck" in services[dep]
        dockerfile = ROOT / "deploy" / "docker" / s["build"]["context"] / s["build"]["dockerfile"]
        assert dockerfile.resolve() in {p.resolve() for p in DOCKERFILES.values()}, name
    # The only host port bound is on loopback.
    assert all(p.startswith("127.0.0.1:") for p in services["coordinator"]["ports"])


def under(path: Path, mount: str) -> bool:
    return PurePosixPath(path).is_relative_to(mount)


def test_compose_configs_load_and_fit_the_mounts() -> None:
    """The kit's TOML files load with the project's own loaders, and every path they name lies in a mount of the
    right kind: keys and data in read-only binds, state and work dirs in the writable volume."""
    services = compose()["services"]
    coord = services["coordinator"]
    m = mounts(coord)
    cfg_file = m["/etc/fedbridge/federation.toml"]["source"]
    cfg = load_federation_config(COMPOSE.parent / cfg_file)
    keys = "/etc/fedbridge/keys"
    for p in (cfg.tls.ca, cfg.tls.cert, cfg.tls.key, cfg.crl, cfg.enrolment_registry):
        assert p is not None and under(p, keys), p
    assert m[keys]["read_only"] is True
    writable = [t for t, v in m.items() if v["type"] == "volume"]
    assert all(any(under(p, w) for w in writable) for p in (cfg.state_dir, cfg.registry_dir))
    assert under(cfg.base_model, "/srv/fedbridge/base-model")
    assert cfg.dashboard.token_env in coord["environment"] and "?" in coord["environment"][cfg.dashboard.token_env]
    port = cfg.listen.rsplit(":", 1)[1]
    assert any(p.endswith(f":{port}") for p in coord["ports"])
    for name in ("site-a", "site-b"):
        sm = mounts(services[name])
        site = load_site_config(COMPOSE.parent / sm["/etc/fedbridge/site.toml"]["source"])
        assert site.name == name and site.coordinator == f"coordinator:{port}"
        for p in (site.tls.ca, site.tls.cert, site.tls.key, site.tls.signing_key, site.policy):
            assert p is not None and under(p, keys), p
        assert sm[keys]["source"] == f"./keys/{name}"
        assert under(site.data.train, "/srv/fedbridge/data") and sm["/srv/fedbridge/data"]["read_only"] is True
        assert any(under(site.work_dir, t) for t, v in sm.items() if v["type"] == "volume")


# ------------------------------------------------------------------------------------------------------------- helm

def helm():  # type: ignore[no-untyped-def]
    try:
        import helm_python
    except ImportError:
        pytest.fail(f"validator helm-python-sdk (Helm's Go SDK) is not installed; {INSTALL_HINT}")
    return helm_python


def test_chart_passes_helm_lint() -> None:
    report = helm().lint(str(CHART), values=ci_values(), strict=True, kube_version=K8S_VERSION)
    assert report["errors"] == [] and all(m["severity"] <= 1 for m in report["messages"]), report


def ci_values() -> dict:
    return yaml.safe_load((CHART / "ci" / "test-values.yaml").read_text())


def render(values: dict) -> list[dict]:
    with helm().Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="fb", namespace="federation")
    return [d for text in out.values() for d in yaml.safe_load_all(text) if d]


K8S_VERSION = "1.33.0"


def k8s_errors(doc: dict) -> str:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{doc.get('kind')}: {e.message} at {list(e.path)}"
    return ""


def test_rendered_chart_matches_the_kubernetes_schemas() -> None:
    docs = render(ci_values())
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Secret", "Service",
                                               "Service"]
    assert [e for e in map(k8s_errors, docs) if e] == []


def test_kubernetes_schema_catches_a_misplaced_field() -> None:
    deployment = next(d for d in render(ci_values()) if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True
    assert "readOnlyRootFS" in k8s_errors(deployment)


def test_chart_refuses_to_render_without_keys_token_or_base_model() -> None:
    with pytest.raises(Exception, match=r"keys\.content\.\w+ \(or keys\.existingSecret\) is required"):
        render({})


def test_rendered_chart_security_secrets_and_config() -> None:
    docs = render(ci_values())
    by_kind = {d["kind"]: d for d in docs}
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert all(c[p] for p in ("startupProbe", "livenessProbe", "readinessProbe"))
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert by_kind["Deployment"]["spec"]["replicas"] == 1 and by_kind["Deployment"]["spec"]["strategy"]["type"] == "Recreate"
    # The dashboard token: only from a Secret, never a literal value, never in the command line.
    token_env = [e for e in c["env"] if e["name"] == "FEDBRIDGE_DASHBOARD_TOKEN"]
    assert token_env and "value" not in token_env[0] and token_env[0]["valueFrom"]["secretKeyRef"]["name"]
    assert not any("token" in a.lower() for a in c.get("args", []))
    # federation.toml from the ConfigMap loads with the project's loader; its key files are the Secret's keys, in
    # the keys mount; its state is on the PVC.
    toml_text = by_kind["ConfigMap"]["data"]["federation.toml"]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "federation.toml").write_text(toml_text)
        cfg = load_federation_config(Path(tmp) / "federation.toml")
    assert cfg.exit_when_done is False  # a Deployment would restart a coordinator that exits when done
    mounts_ = {m["name"]: m for m in c["volumeMounts"]}
    keys_dir = mounts_["keys"]["mountPath"]
    assert mounts_["keys"]["readOnly"] is True and "subPath" not in mounts_["keys"]
    secret_files = set(by_kind["Secret"]["data"])
    for p in (cfg.tls.ca, cfg.tls.cert, cfg.tls.key, cfg.crl, cfg.enrolment_registry):
        assert p is not None and p.parent == Path(keys_dir) and p.name in secret_files, p
    assert not any("ca.key" in f or f.endswith("ca.key") for f in secret_files)
    assert under(cfg.state_dir, mounts_["state"]["mountPath"]) and under(cfg.registry_dir, mounts_["state"]["mountPath"])
    assert cfg.dashboard.token_env == "FEDBRIDGE_DASHBOARD_TOKEN" and cfg.dashboard.listen.endswith(":8080")
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["state"]["persistentVolumeClaim"]["claimName"] == by_kind["PersistentVolumeClaim"]["metadata"]["name"]
    assert vols["keys"]["secret"]["secretName"] == by_kind["Secret"]["metadata"]["name"]


def test_chart_uses_an_existing_keys_secret() -> None:
    values = {**ci_values(), "keys": {"existingSecret": "coordinator-keys"}}
    docs = render(values)
    assert "Secret" not in {d["kind"] for d in docs}
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["keys"]["secret"]["secretName"] == "coordinator-keys"
