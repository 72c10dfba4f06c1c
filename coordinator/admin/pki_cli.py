"""``fedbridge-admin`` commands for the federation PKI, revocation, audit verification and the record of processing.

``register(app)`` adds ``init``, ``enroll-site``, ``revoke-site``, ``export-records`` and ``audit verify``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from coordinator.admin.commands import CaOpt, CertOpt, CoordOpt, JsonOpt, KeyOpt, KitOpt, NameOpt

console = Console(stderr=True)
out = Console(width=200)


def _fail(msg: str, code: int = 2) -> typer.Exit:
    console.print(f"[bold red]error:[/] {msg}")
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
                                                   help="Jinja chat template file for a base that ships none")
         ) -> None:
    """Create a federation: CA, coordinator and admin certificates, manifest, registry, CRL, federation.toml."""
    from coordinator.trust.enrolment import EnrolmentError, InitOptions, init_federation
    from fedcommon.manifest import ManifestMismatch

    try:
        manifest = init_federation(fed_dir, InitOptions(
            federation_id=federation_id, base_model=base_model, hosts=tuple(host), port=port,
            base_model_ref=base_model_ref, strategy=strategy, rounds=rounds, min_sites=min_sites,
            max_update_norm=max_update_norm, listen=listen, target_modules=tuple(target_modules),
            chat_template=chat_template))
    except (EnrolmentError, ManifestMismatch) as e:
        raise _fail(str(e)) from None
    console.print(f"[bold green]federation {federation_id!r} created[/] in {fed_dir}")
    console.print(f"  base model sha256: {manifest['base_model_sha256']}")
    console.print(f"  coordinator: {manifest['coordinator']}   admin certificate: {fed_dir / 'admin' / 'admin.pem'}")
    console.print(f"  next: fedbridge-admin enroll-site NAME --region EU-DE --fed-dir {fed_dir}")


def enroll_site(name: str = typer.Argument(..., help="site name (its certificate CN)"),
                region: str = typer.Option(..., "--region", help="data region, e.g. EU-DE"),
                fed_dir: Path = typer.Option(..., "--fed-dir", help="federation directory (from init)"),
                out_dir: Path | None = typer.Option(None, "--out", help="kit directory (default FED/sites/NAME)"),
                archive: bool = typer.Option(False, "--archive", help="also pack the kit as NAME.tar.gz"),
                coordinator: str = typer.Option("", "--coordinator", help="host:port the site dials (default: "
                                                                          "the manifest's)")) -> None:
    """Enrol a site: issue its certificate (region inside), record it, and write its site kit."""
    from coordinator.trust.enrolment import EnrolmentError
    from coordinator.trust.enrolment import enroll_site as do_enroll
    from coordinator.trust.pki import PKIError

    try:
        path = do_enroll(fed_dir, name, region, out_dir, archive, coordinator)
    except (EnrolmentError, PKIError) as e:
        raise _fail(str(e)) from None
    console.print(f"[bold green]site {name!r} enrolled[/] (region {region}); kit: {path}")
    if archive:
        console.print("  the archive holds the site's private keys: hand it over on a trusted channel")


def revoke_site(name: str = typer.Argument(..., help="site name"),
                fed_dir: Path | None = typer.Option(None, "--fed-dir", help="federation directory: re-sign its CRL "
                                                    "and mark the site in its enrolment registry"),
                reason: str = typer.Option("revoked by the administrator", "--reason"),
                coordinator: str = CoordOpt, kit: Path | None = KitOpt, cert: Path | None = CertOpt,
                key: Path | None = KeyOpt, ca: Path | None = CaOpt, server_name: str = NameOpt,
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
            entry = do_revoke(fed_dir, name, reason)
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
    app.command("revoke-site")(revoke_site)
    app.command("export-records")(export_records)
    app.add_typer(audit_app, name="audit")
