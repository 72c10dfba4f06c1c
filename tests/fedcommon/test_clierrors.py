"""The CLIs' error boundary: one line and a documented exit code for whatever escapes a command."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from fedcommon.certs import CertificateError, check_tls_files
from fedcommon.clierrors import EXIT_FAILED, EXIT_USAGE, run_cli
from fedcommon.tomlconfig import ConfigError, load_toml


def _run(exc: BaseException, capsys: pytest.CaptureFixture[str], known=()) -> tuple[int, list[str]]:  # noqa: ANN001
    def app() -> None:
        raise exc

    with pytest.raises(SystemExit) as e:
        run_cli(app, "fedbridge-test", known)
    return int(e.value.code or 0), capsys.readouterr().err.splitlines()


def test_known_errors_get_their_prefix_and_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(ConfigError("site.toml: field 'threads': must be >= 0"), capsys) == (
        EXIT_USAGE, ["config error: site.toml: field 'threads': must be >= 0"])
    assert _run(KeyError("x"), capsys, [((KeyError,), "refused:", 7)]) == (7, ["refused: 'x'"])
    code, lines = _run(ValueError("a.jsonl:2: bad\na.jsonl:5: worse"), capsys, [((ValueError,), "refused:", 2)])
    assert lines == ["refused: a.jsonl:2: bad", "  a.jsonl:5: worse"]  # one prefixed line, the rest indented


def test_known_errors_may_be_given_lazily(capsys: pytest.CaptureFixture[str]) -> None:
    # fedbridge-site passes a function, so starting the command does not import the agent (torch) for its types.
    calls: list[int] = []

    def known() -> list:  # type: ignore[type-arg]
        calls.append(1)
        return [((KeyError,), "refused:", 7)]

    assert _run(KeyError("x"), capsys, known) == (7, ["refused: 'x'"])
    assert calls == [1]


def test_site_cli_starts_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, site_agent.cli, site_agent.config, site_agent.policy; "
            "assert 'torch' not in sys.modules, 'torch imported'; site_agent.cli._known()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2], timeout=120)


def test_os_error_names_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(OSError) as e:
        (tmp_path / "nope.jsonl").read_bytes()
    assert _run(e.value, capsys) == (EXIT_USAGE, [f"error: {tmp_path / 'nope.jsonl'}: No such file or directory"])


def test_a_bug_gets_one_line_and_its_traceback_in_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    code, lines = _run(ZeroDivisionError("division by zero"), capsys)
    assert code == EXIT_FAILED and len(lines) == 1 and "Traceback" not in lines[0]
    assert lines[0].startswith("error: unexpected ZeroDivisionError: division by zero (a bug in fedbridge-test")
    log = next(tmp_path.glob("fedbridge-test-error-*.log"))
    assert str(log) in lines[0] and "Traceback (most recent call last)" in log.read_text()
    assert log.stat().st_mode & 0o077 == 0  # private: the traceback may show paths and values


def test_typer_exit_passes_through(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(SystemExit(3), capsys) == (3, [])


def test_a_directory_for_a_config_file_is_one_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^{tmp_path}: is a directory, not a config file$"):
        load_toml(tmp_path)


def _kit(tmp_path: Path, days_ago: int = 0) -> tuple[Path, Path, Path]:
    from coordinator.trust.pki import CertificateAuthority

    ca = CertificateAuthority.create("t")
    cert, key = ca.issue("site-a", "site")
    if days_ago:
        from cryptography import x509

        pub = x509.load_pem_x509_certificate(cert).public_key()
        cert = ca.certificate("site-a", "site", pub, days=1,  # type: ignore[arg-type]
                              not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_ago))
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, data in (("ca.pem", ca.cert_pem), ("client.pem", cert), ("client.key", key)):
        (tmp_path / name).write_bytes(data)
    return tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key"


def test_check_tls_files(tmp_path: Path) -> None:
    ca, cert, key = _kit(tmp_path / "good")
    check_tls_files(ca, cert, key)
    with pytest.raises(CertificateError, match=r"field 'tls.cert' \(.*nope.pem\): cannot read"):
        check_tls_files(ca, tmp_path / "nope.pem", key)
    _, other_cert, other_key = _kit(tmp_path / "other")
    with pytest.raises(CertificateError, match=r"field 'tls.key' \(.*other/client.key\): is not the key of"):
        check_tls_files(ca, cert, other_key)
    with pytest.raises(CertificateError, match=r"field 'tls.cert' \(.*other/client.pem\): not issued by the CA"):
        check_tls_files(ca, other_cert, other_key)
    eca, ecert, ekey = _kit(tmp_path / "expired", days_ago=3)
    with pytest.raises(CertificateError, match=r"field 'tls.cert' \(.*expired/client.pem\): expired on"):
        check_tls_files(eca, ecert, ekey)
    with pytest.raises(CertificateError, match=r"field 'tls.ca' \(.*client.key\): not a PEM certificate"):
        check_tls_files(key, cert, key)


def test_site_run_refuses_a_broken_kit_before_it_imports_torch(tmp_path: Path) -> None:
    """``fedbridge-site run`` with a certificate that is not there: one line naming the field, and torch (seconds of
    CPU) was never imported, because the kit is checked before the trainer is loaded."""
    import subprocess
    import sys

    (tmp_path / "train.jsonl").write_text("{}\n")
    for name in ("ca.pem", "client.key", "signing.key"):
        (tmp_path / name).write_text("x")
    (tmp_path / "site.toml").write_text(
        f'name = "site-a"\ncoordinator = "127.0.0.1:1"\nbase_model = "{tmp_path}"\nwork_dir = "{tmp_path / "work"}"\n'
        f'[tls]\nca = "{tmp_path / "ca.pem"}"\ncert = "{tmp_path / "nope.pem"}"\nkey = "{tmp_path / "client.key"}"\n'
        f'signing_key = "{tmp_path / "signing.key"}"\n[data]\ntrain = "{tmp_path / "train.jsonl"}"\n')
    code = ("import sys, site_agent.cli as c\nsys.argv = ['fedbridge-site', 'run', '--config', sys.argv[1]]\n"
            "try:\n    c.main()\nexcept SystemExit as e:\n    print('exit', e.code)\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site.toml")], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], timeout=120)
    lines = p.stdout.splitlines()
    assert lines[-2:] == ["exit 2", "no torch"], p.stdout + p.stderr
    assert [line for line in p.stderr.splitlines() if line.startswith("error:")] == [
        f"error: field 'tls.cert' ({tmp_path / 'nope.pem'}): cannot read (No such file or directory)"], p.stderr
