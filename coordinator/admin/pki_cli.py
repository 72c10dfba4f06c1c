"""``fedbridge-admin`` commands for the federation PKI, revocation, audit verification and the record of processing.

``register(app)`` adds ``init``, ``enroll-site``, ``renew-site``, ``revoke-site``, ``admin-csr``, ``install-bundle``,
``enroll-admin``, ``renew-admin``, ``revoke-admin``, ``list-certs``, ``export-records`` and ``audit verify``. Every
enrolment is by CSR: the CA holder never sees a site's or an admin's private key.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from coordinator.admin.commands import CaOpt, CertOpt, CoordOpt, JsonOpt, KeyOpt, KitOpt, NameOpt

console = Console(stderr=True, soft_wrap=True)  # one line however narrow the terminal
out = Console(width=200)


def _fail(msg: str, code: int = 2) -> typer.Exit:
    # escape: a message holds user text and TOML section names ("[model]") that rich would take as markup and drop
    console.print(f"[bold red]error:[/] {escape(msg)}")
    return typer.Exit(code)


def init(fed_dir: Path = typer.Option(..., "--dir", help="new federation directory"),
         federation_id: str = typer.Option(..., "--federation-id", help="stable federation name"),
         base_model: Path = typer.Option(..., "--base-model", help="local base-model directory (pinned by hash)"),
         host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host",
                                        help="coordinator DNS name / IP for its certificate (repeat; first = address)"),
         port: int = typer.Option(50051, "--port", help="coordinator port"),
         base_model_ref: str = typer.Option("", "--base-model-ref", help="hub id or name of the base model"),
         strategy: str = typer.Option("fedavg", "--strategy"),
         rounds: int = typer.Option(3, "--rounds"),
         min_sites: int = typer.Option(2, "--min-sites"),
         max_update_norm: float = typer.Option(0.0, "--max-update-norm", help="refuse updates above this L2 norm"),
         listen: str = typer.Option("", "--listen", help="host:port the coordinator binds (default 0.0.0.0:PORT)"),
         target_modules: list[str] = typer.Option(["all-linear"], "--target-module",
                                                  help="LoRA target module name (repeat; default all-linear); checked "
                                                       "against the base's config"),
         chat_template: Path | None = typer.Option(None, "--chat-template",
                                                   help="Jinja chat template file for a base that ships none"),
         ca_dir: Path | None = typer.Option(None, "--ca-dir", help="the CA folder (CA key + first admin kit), outside "
                                            "--dir; default: DIR-ca beside it. Keep it on the CA host or offline"),
         admin_name: str = typer.Option("admin", "--admin-name", help="name (CN) of the first admin certificate"),
         days: int = typer.Option(365, "--days", help="validity of the coordinator and admin certificates")
         ) -> None:
    """Create a federation: CA, coordinator and admin certificates, manifest, registry, CRL, federation.toml."""
    from coordinator.trust.enrolment import EnrolmentError, InitOptions, default_ca_dir, init_federation
    from fedcommon.manifest import ManifestMismatch

    try:
        manifest = init_federation(fed_dir, InitOptions(
            federation_id=federation_id, base_model=base_model, hosts=tuple(host), port=port,
            base_model_ref=base_model_ref, strategy=strategy, rounds=rounds, min_sites=min_sites,
            max_update_norm=max_update_norm, listen=listen, target_modules=tuple(target_modules),
            chat_template=chat_template, ca_dir=ca_dir, admin_name=admin_name, days=days))
    except (EnrolmentError, ManifestMismatch) as e:
        raise _fail(str(e)) from None
    console.print(f"[bold green]federation {federation_id!r} created[/] in {fed_dir}")
    console.print(f"  base model sha256: {manifest['base_model_sha256']}")
    ca = ca_dir or default_ca_dir(fed_dir)
    console.print(f"  coordinator: {manifest['coordinator']}   admin kit: {ca / 'admin'}")
    console.print(f"  CA key: {ca / 'ca.key'} -- the coordinator runs from {fed_dir} and must never see it; move the "
                  "CA folder offline")
    console.print(f"  next: a site runs `fedbridge-site init`; you run `fedbridge-admin enroll-site --csr FILE --region "
                  f"EU-DE --fed-dir {fed_dir} --ca-dir {ca}`")


CsrOpt = typer.Option(..., "--csr", help="the CSR file the site (fedbridge-site init/renew) or admin made")
FedOpt = typer.Option(..., "--fed-dir", help="federation directory (from init): registry, manifest, CRL")
CaDirOpt = typer.Option(None, "--ca-dir", help="the CA folder (ca.key); default: FED-ca beside --fed-dir")
DaysOpt = typer.Option(365, "--days", help="certificate validity in days")
OutOpt = typer.Option(None, "--out", help="bundle file to write (default FED/bundles/NAME.bundle.json)")


def _sign(kind: str, csr: Path, fed_dir: Path, ca_dir: Path | None, out_path: Path | None, **kw: object) -> None:
    from coordinator.trust import enrolment as en
    from fedcommon.durable import write_durable

    role = kw.pop("role")
    try:
        data = csr.read_bytes()
    except OSError as e:
        raise _fail(f"{csr}: cannot read the CSR ({e.strerror})") from None
    fn = en.renew_csr if kind == "renew" else en.enroll_csr
    try:
        entry, bundle = fn(fed_dir, ca_dir or en.default_ca_dir(fed_dir), data, role=role, where=str(csr), **kw)  # type: ignore[arg-type]
    except (en.EnrolmentError, OSError) as e:
        raise _fail(str(e)) from None
    path = out_path or fed_dir / "bundles" / f"{entry.name}.bundle.json"
    write_durable(path, bundle)
    what = "renewed" if kind == "renew" else "enrolled"
    region = f" (region {entry.region})" if entry.region else ""
    console.print(f"[bold green]{role} {entry.name!r} {what}[/]{region}; bundle (certificates only, no private key): "
                  f"{path}")
    console.print(f"  send it to the {role}; they run `{'fedbridge-site' if role == 'site' else 'fedbridge-admin'} "
                  "install-bundle`")


def enroll_site(csr: Path = CsrOpt,
                region: str = typer.Option(..., "--region", help="data region, e.g. EU-DE"),
                fed_dir: Path = FedOpt, ca_dir: Path | None = CaDirOpt, out_path: Path | None = OutOpt,
                days: int = DaysOpt,
                re_enroll: bool = typer.Option(False, "--re-enroll", help="replace an enrolled site's keys (its old "
                                               "certificates are revoked)"),
                coordinator: str = typer.Option("", "--coordinator", help="host:port the site dials (default: "
                                                                          "the manifest's)")) -> None:
    """Enrol a site from its CSR: check it, sign it (region inside), record it, and write its bundle."""
    _sign("enroll", csr, fed_dir, ca_dir, out_path, role="site", region=region, days=days, re_enroll=re_enroll,
          coordinator=coordinator)


def renew_site(csr: Path = CsrOpt, fed_dir: Path = FedOpt, ca_dir: Path | None = CaDirOpt,
               out_path: Path | None = OutOpt, days: int = DaysOpt) -> None:
    """Renew a site's certificate from a CSR made with its enrolled keys (before it expires); no restart needed."""
    _sign("renew", csr, fed_dir, ca_dir, out_path, role="site", days=days)


def enroll_admin(csr: Path = CsrOpt, fed_dir: Path = FedOpt, ca_dir: Path | None = CaDirOpt,
                 out_path: Path | None = OutOpt, days: int = DaysOpt,
                 re_enroll: bool = typer.Option(False, "--re-enroll", help="replace an enrolled admin's key")) -> None:
    """Enrol an administrator from their CSR (`fedbridge-admin admin-csr`)."""
    _sign("enroll", csr, fed_dir, ca_dir, out_path, role="admin", days=days, re_enroll=re_enroll)


def renew_admin(csr: Path = CsrOpt, fed_dir: Path = FedOpt, ca_dir: Path | None = CaDirOpt,
                out_path: Path | None = OutOpt, days: int = DaysOpt) -> None:
    """Renew an administrator's certificate from a CSR made with the enrolled key."""
    _sign("renew", csr, fed_dir, ca_dir, out_path, role="admin", days=days)


def admin_csr(kit: Path = typer.Option(..., "--dir", help="your admin kit folder (created; the key stays here)"),
              name: str = typer.Option(..., "--name", help="your admin name (CN)"),
              renew: bool = typer.Option(False, "--renew", help="a renewal CSR from the kit's current key")) -> None:
    """Create an administrator's TLS key (0600) and CSR here, for the CA holder's `enroll-admin --csr`."""
    from fedcommon.csr import EnrolmentRequestError, make_request, renewal_request

    try:
        csr = renewal_request(kit) if renew else make_request(kit, name, "admin", signing=False)
    except (EnrolmentRequestError, ValueError) as e:
        raise _fail(str(e)) from None
    console.print(f"CSR: {csr} -- send it to the CA holder; install the bundle with `fedbridge-admin install-bundle`")


def install_bundle(kit: Path = typer.Option(..., "--dir", help="your admin kit folder"),
                   bundle: Path = typer.Option(..., "--bundle", help="the bundle from enroll-admin / renew-admin")
                   ) -> None:
    """Check an admin bundle against this kit's key and install the certificate (use the kit with --kit)."""
    from fedcommon.csr import EnrolmentRequestError, install_certificate

    try:
        got = install_certificate(kit, bundle)
    except EnrolmentRequestError as e:
        raise _fail(str(e)) from None
    console.print(f"[bold green]installed[/] the {got.role} certificate of {got.name!r} (valid until "
                  f"{got.not_after:%Y-%m-%d %H:%M} UTC); CA sha256 {got.ca_sha256}")


def revoke_admin(name: str = typer.Argument(..., help="admin name"), fed_dir: Path = FedOpt,
                 ca_dir: Path | None = CaDirOpt, reason: str = typer.Option("revoked", "--reason")) -> None:
    """Revoke an administrator's certificate (registry + CRL); AdminService and the dashboard refuse it within a second."""
    from coordinator.trust import enrolment as en

    try:
        entry = en.revoke(fed_dir, ca_dir or en.default_ca_dir(fed_dir), name, reason, role="admin")
    except en.EnrolmentError as e:
        raise _fail(str(e)) from None
    console.print(f"[bold yellow]admin {name!r} revoked[/] (serial {entry.serial:x}); CRL: {fed_dir / 'crl.pem'}")


def list_certs(fed_dir: Path = FedOpt, as_json: bool = JsonOpt) -> None:
    """List enrolled sites and admins: state (valid / expired / revoked), serial, expiry."""
    import datetime as dt

    from rich.table import Table

    from coordinator.trust.enrolment import EnrolmentError, list_certificates

    try:
        rows = list_certificates(fed_dir)
    except EnrolmentError as e:
        raise _fail(str(e)) from None
    if as_json:
        print(json.dumps(rows, sort_keys=True))
        return
    table = Table(title=f"certificates enrolled in {fed_dir}", title_justify="left")
    for c in ("role", "name", "region", "state", "serial", "expires (UTC)"):
        table.add_column(c)
    for r in rows:
        exp = dt.datetime.fromtimestamp(r["not_after_ms"] / 1000, dt.timezone.utc).strftime("%Y-%m-%d") \
            if r["not_after_ms"] else "?"
        table.add_row(r["role"], r["name"], r["region"], r["state"], r["serial"], exp)
    out.print(table)


def revoke_site(name: str = typer.Argument(..., help="site name"),
                fed_dir: Path | None = typer.Option(None, "--fed-dir", help="federation directory: re-sign its CRL "
                                                    "and mark the site in its enrolment registry"),
                reason: str = typer.Option("revoked by the administrator", "--reason"),
                ca_dir: Path | None = CaDirOpt, coordinator: str = CoordOpt, kit: Path | None = KitOpt,
                cert: Path | None = CertOpt, key: Path | None = KeyOpt, ca: Path | None = CaOpt, server_name: str = NameOpt,
                as_json: bool = JsonOpt) -> None:
    """Revoke a site: in the federation directory (CRL + registry) and/or on the running coordinator (AdminService).

    With ``--fed-dir`` the CA re-signs the CRL, which a coordinator reading that directory notices within a second.
    With ``--coordinator`` (and the admin kit) the running coordinator revokes the site at once over the admin API,
    cutting off its open calls, wherever the federation directory is. Give both to do both.
    """
    from coordinator.admin.client import AdminClient, AdminClientError, resolve
    from coordinator.trust.enrolment import EnrolmentError
    from coordinator.trust.enrolment import revoke_site as do_revoke
    from protos.fedbridge.v1 import admin_service_pb2 as apb

    if fed_dir is None and not coordinator:
        raise _fail("give --fed-dir (CRL and registry) and/or --coordinator with the admin kit (running coordinator)")
    result: dict[str, object] = {"site": name}
    if fed_dir is not None:
        try:
            entry = do_revoke(fed_dir, name, reason, ca_dir=ca_dir)
        except EnrolmentError as e:
            raise _fail(str(e)) from None
        result.update(crl=str(fed_dir / "crl.pem"), serial=f"{entry.serial:x}")
        console.print(f"[bold yellow]site {name!r} revoked[/] in {fed_dir} (certificate serial {entry.serial:x}); CRL: "
                      f"{fed_dir / 'crl.pem'}")
    if coordinator:
        try:
            with AdminClient(resolve(coordinator, kit, cert, key, ca, server_name)) as client:
                resp = client.call("RevokeSite", apb.RevokeSiteRequest(site=name, reason=reason))
        except AdminClientError as e:
            raise _fail(f"{e.code}: {e.message}", 1) from None
        result["coordinator"] = coordinator
        result["newly_revoked"] = bool(resp.get("newly_revoked", False))
        console.print(f"[bold yellow]site {name!r} revoked[/] on the coordinator at {coordinator}"
                      + ("" if result["newly_revoked"] else " (it already was)"))
    if as_json:
        print(json.dumps(result, sort_keys=True))


def export_records(config: Path = typer.Option(..., "--config", "-c", help="federation.toml"),
                   as_json: bool = typer.Option(False, "--json", help="JSON instead of markdown"),
                   out_path: Path | None = typer.Option(None, "--out", help="write to this file (default stdout)")
                   ) -> None:
    """Write a GDPR Art. 30 style record of processing (parties, regions, purposes, transfers, safeguards)."""
    from coordinator.config import load_federation_config
    from coordinator.release.records import build_record, to_markdown
    from fedcommon.tomlconfig import ConfigError

    try:
        cfg = load_federation_config(config)
    except ConfigError as e:
        raise _fail(f"config error: {e}") from None
    record = build_record(cfg)
    text = json.dumps(record, indent=2, sort_keys=True) + "\n" if as_json else to_markdown(record)
    if out_path:
        out_path.write_text(text)
        console.print(f"record of processing written to {out_path}")
    else:
        print(text, end="")


audit_app = typer.Typer(help="The coordinator's hash-chained audit log.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(state_dir: Path = typer.Option(..., "--state-dir", help="the coordinator's state_dir")) -> None:
    """Check every line of the coordinator's audit log and that it reaches the head kept in the store.

    Exit 0 when intact, 1 when tampered with, 3 when a crash left it mid-append (repaired on the next start).
    """
    from fedcommon.auditlog import Head, verify

    log_path = state_dir / "audit.jsonl"
    if not log_path.exists():
        raise _fail(f"{log_path}: no audit log here")
    expected = None
    db = state_dir / "coordinator.db"
    if db.exists():
        import sqlite3

        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = con.execute("SELECT value FROM meta WHERE key='audit_head'").fetchone()
        finally:
            con.close()
        expected = Head.parse(row[0]) if row else None
    report = verify(log_path, expected_head=expected)
    if report.ok:
        out.print(f"OK {log_path}: {report.records} records, head {report.head[:16]}…"
                  + (" (matches the store)" if expected else " (no head in the store)"))
        return
    if report.crashed:  # left mid-append by a kill or power cut: not tampering, repaired on the next start
        out.print(f"[bold yellow]CRASH[/] {log_path}: left mid-append by a crash (not tampering); the coordinator "
                  "repairs it and records the repair (audit_recovered) when it next starts:")
        for p in report.crash:
            out.print(f"  {p}")
        raise typer.Exit(3)
    out.print(f"[bold red]TAMPERED[/] {log_path}:")
    for p in report.problems:
        out.print(f"  {p}")
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the PKI, revocation, records and audit commands to ``fedbridge-admin``."""
    app.command("init")(init)
    app.command("enroll-site")(enroll_site)
    app.command("renew-site")(renew_site)
    app.command("revoke-site")(revoke_site)
    app.command("admin-csr")(admin_csr)
    app.command("install-bundle")(install_bundle)
    app.command("enroll-admin")(enroll_admin)
    app.command("renew-admin")(renew_admin)
    app.command("revoke-admin")(revoke_admin)
    app.command("list-certs")(list_certs)
    app.command("export-records")(export_records)
    app.add_typer(audit_app, name="audit")
