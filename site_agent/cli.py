"""``fedbridge-site``: the site operator's command."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

from fedcommon.clierrors import EXIT_USAGE, error_line, run_cli

app = typer.Typer(help="fedbridge site agent: trains on private data, sends only signed adapter deltas.",
                  no_args_is_help=True)
# soft_wrap: a message is one line however narrow the terminal (rich would fold a long path over several).
console = Console(stderr=True, soft_wrap=True)


@app.callback()
def _group() -> None:
    """fedbridge site agent."""


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def run(config: Path = typer.Option(..., "--config", "-c", help="site.toml"),
        verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Join the federation and train every round until it is done."""
    from fedcommon.certs import check_tls_files
    from fedcommon.tomlconfig import ConfigError
    from site_agent.config import load_site_config

    setup_logging(verbose)
    try:
        cfg = load_site_config(config, ready=True)
    except ConfigError as e:
        console.print(error_line("refused:", str(e)), markup=False, highlight=False)
        raise typer.Exit(2) from None
    # The TLS kit is checked before torch and the trainer are imported (seconds of CPU), so a missing, expired or
    # mismatched certificate fails at once; the client checks it again when it dials.
    check_tls_files(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)

    import grpc

    from fedcommon.auditlog import AuditError
    from site_agent.agent import SiteRefusal, run_site
    from site_agent.training.data import DataError

    try:
        rounds = run_site(cfg)
    except (ConfigError, DataError, SiteRefusal, AuditError) as e:
        console.print(error_line("refused:", str(e)), markup=False, highlight=False)
        raise typer.Exit(2) from None
    except grpc.RpcError as e:  # the coordinator refused us, or could not be reached within retry_for_s
        name = f" (TLS name {cfg.server_name})" if cfg.server_name else ""
        code = e.code().name if hasattr(e, "code") else "UNAVAILABLE"
        details = e.details() if hasattr(e, "details") else str(e)
        console.print(error_line("refused:", f"coordinator {cfg.coordinator}{name}: {code}: {details}"), markup=False,
                      highlight=False)
        raise typer.Exit(1) from None
    console.print(f"[green]done[/]: trained {rounds} round(s)")


@app.command()
def preflight(config: Path = typer.Option(..., "--config", "-c", help="site.toml"),
              require_gpu: bool = typer.Option(False, "--require-gpu", help="fail when no GPU is visible"),
              timeout: float = typer.Option(5.0, "--timeout", help="seconds to wait for the coordinator"),
              mode: str | None = typer.Option(None, "--mode", help="the federation's training mode (sft, qlora, dpo, "
                                              "kto, orpo, simpo). Default: the policy's only allowed mode if it allows "
                                              "one, else sft"),
              chat_template: Path | None = typer.Option(None, "--chat-template", help="the federation's chat "
                                                        "template file, if it supplies one ([model] chat_template); "
                                                        "default: chat_template.jinja beside site.toml (the kit's)")
              ) -> None:
    """Check the kit (certificates, coordinator, base model, data, disk, GPU) and run one real training step.

    The step runs the trainer `run` would build for the federation's mode, with its chat template and assistant
    masks, on this site's own training file (one step; nothing is sent), so it fails where `run` would.
    """
    from rich.markup import escape
    from rich.table import Table

    from fedcommon.tomlconfig import ConfigError
    from site_agent.config import load_site_config
    from site_agent.preflight import run_preflight

    setup_logging(False)
    try:
        cfg = load_site_config(config, ready=True)
    except ConfigError as e:
        console.print(f"[bold red]FAIL[/] site config: {e}")
        raise typer.Exit(2) from None
    table = Table(title=f"preflight: site {cfg.name}")
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("detail", overflow="fold")  # fold, never "…": a cut-off file:line is no use to anyone
    kit_template = Path(config).parent / "chat_template.jinja"  # fedbridge-admin enroll-site puts it in the kit
    if chat_template is None and kit_template.is_file():
        chat_template = kit_template
    rows = run_preflight(cfg, connect_timeout_s=timeout, require_gpu=require_gpu, mode=mode, chat_template=chat_template)
    for row in rows:
        first, *rest = row.detail.splitlines() or [""]
        detail = first + (f" (+{len(rest)} more, listed below)" if rest else "")
        table.add_row(row.name, "[green]PASS[/]" if row.ok else "[bold red]FAIL[/]", escape(detail))
    Console().print(table)
    failed = [r for r in rows if not r.ok]
    # Each failure again in full below the table, one problem per line with its file:line first and no wrapping by
    # rich, so a narrow terminal (or a log) still shows every location whole.
    for row in failed:
        typer.echo(f"FAIL {row.name}:")
        for line in row.detail.splitlines():
            typer.echo(f"  {line}")
    if failed:
        raise typer.Exit(1)


@app.command("check-data")
def check_data(path: Path = typer.Argument(..., help="a training or held-out jsonl file"),
               mode: str | None = typer.Option(None, "--mode", help="the training mode the file is for (sft, qlora, "
                                               "dpo, kto, orpo, simpo); default: any known format"),
               heldout: bool = typer.Option(False, "--heldout", help="the file is a held-out set (SFT rows)")) -> None:
    """Validate one data file as training would read it; list every bad row (file:line: field: problem).

    Needs no kit: no certificates, no coordinator, no base model. Exit 0 when the file is good, 1 when it is not.
    """
    from site_agent.training.data import DataError, load_for_mode, load_jsonl, load_sft

    try:
        if heldout:
            rows = load_sft(path)
        elif mode is not None:
            rows = load_for_mode(path, mode)
        else:
            rows = load_jsonl(path)
    except ValueError as e:  # an unknown mode
        if isinstance(e, DataError):
            n = e.bad_rows
            typer.echo(f"FAIL {path}: {n} bad row{'s' if n != 1 else ''}" if e.line is not None else f"FAIL {path}:")
            for line in str(e).splitlines():
                typer.echo(f"  {line}")
            raise typer.Exit(1) from None
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    except OSError as e:
        console.print(f"[bold red]error:[/] {path}: cannot read ({e.strerror})")
        raise typer.Exit(2) from None
    typer.echo(f"OK {path}: {len(rows)} rows")


@app.command("init")
def init_cmd(kit: Path = typer.Option(..., "--dir", help="this site's kit folder (created; its keys stay here)"),
             name: str = typer.Option(..., "--name", help="the site's name, agreed with the federation (its CN)")) -> None:
    """Create this site's TLS and signing keys (0600) and a CSR to send to the federation's CA holder."""
    from fedcommon.csr import EnrolmentRequestError
    from site_agent.enrol import init_site

    try:
        csr = init_site(kit, name)
    except (EnrolmentRequestError, ValueError) as e:
        console.print(f"[bold red]refused:[/] {e}")
        raise typer.Exit(2) from None
    console.print(f"[bold green]keys created[/] in {kit} (client.key, signing.key: they never leave this host)")
    console.print(f"  send {csr} to the CA holder (`fedbridge-admin enroll-site --csr`), then run "
                  f"`fedbridge-site install-bundle --dir {kit} --bundle FILE` with the bundle you get back")


@app.command("install-bundle")
def install_bundle_cmd(kit: Path = typer.Option(..., "--dir", help="this site's kit folder (from init)"),
                       bundle: Path = typer.Option(..., "--bundle", help="the bundle from enroll-site / renew-site")
                       ) -> None:
    """Check the CA holder's bundle against this kit's keys and install the certificate (enrolment or renewal)."""
    from fedcommon.csr import EnrolmentRequestError
    from site_agent.enrol import install_bundle

    try:
        got = install_bundle(kit, bundle)
    except EnrolmentRequestError as e:
        console.print(f"[bold red]refused:[/] {e}")
        raise typer.Exit(2) from None
    console.print(f"[bold green]installed[/] the certificate of site {got.name!r} (valid until "
                  f"{got.not_after:%Y-%m-%d %H:%M} UTC) in {kit}")
    console.print(f"  federation CA sha256: {got.ca_sha256} -- compare it with the one the federation published")


@app.command("renew")
def renew_cmd(kit: Path = typer.Option(..., "--dir", help="this site's kit folder")) -> None:
    """Make a renewal CSR (KIT/renew.csr) from this site's current keys, before its certificate expires."""
    from fedcommon.csr import EnrolmentRequestError
    from site_agent.enrol import renew_site

    try:
        csr = renew_site(kit)
    except EnrolmentRequestError as e:
        console.print(f"[bold red]refused:[/] {e}")
        raise typer.Exit(2) from None
    console.print(f"renewal request: {csr} -- send it to the CA holder (`fedbridge-admin renew-site --csr`), then "
                  "install the bundle you get back with `fedbridge-site install-bundle`")


audit_app = typer.Typer(help="The site's hash-chained audit log of everything that left it.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")

config_app = typer.Typer(help="The site's config files (site.toml, policy.toml).", no_args_is_help=True)


@config_app.command("check")
def config_check(path: Path = typer.Argument(..., help="the site.toml (or, with --policy, policy.toml) to check"),
                 policy: bool = typer.Option(False, "--policy", help="the file is a policy.toml")) -> None:
    """Validate a config file and print every setting with its resolved value (marked file or default).

    Exit 0 when the file is good; 2, with one line naming the file and the field, when it is not (a site.toml
    that still holds a <FILL IN: ...> placeholder is not good: the agent would refuse to start on it).
    """
    from fedcommon.configdoc import check_report
    from fedcommon.tomlconfig import ConfigError
    from site_agent.config import load_site_config
    from site_agent.policy import load_policy

    try:
        obj = load_policy(path) if policy else load_site_config(path, ready=True)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(check_report(obj, path), nl=False)


app.add_typer(config_app, name="config")


@audit_app.command("verify")
def audit_verify(log_path: Path | None = typer.Option(None, "--log", help="audit log file"),
                 config: Path | None = typer.Option(None, "--config", "-c",
                                                    help="site.toml (the log is work_dir/audit.jsonl)")) -> None:
    """Check every line of the site's audit log (edited, removed, reordered or cut-off lines); exit 1 if tampered,
    3 if a crash left it mid-append (repaired on the agent's next start)."""
    from fedcommon.auditlog import verify
    from fedcommon.tomlconfig import ConfigError
    from site_agent.config import load_site_config

    if log_path is None:
        if config is None:
            console.print("[bold red]error:[/] give --log PATH or --config site.toml")
            raise typer.Exit(2)
        try:
            log_path = Path(load_site_config(config).work_dir) / "audit.jsonl"
        except ConfigError as e:
            console.print(f"[bold red]config error:[/] {e}")
            raise typer.Exit(2) from None
    if not log_path.exists():
        console.print(f"[bold red]error:[/] {log_path}: no audit log here")
        raise typer.Exit(2)
    report = verify(log_path)
    out = Console(width=200)
    if report.ok:
        out.print(f"OK {log_path}: {report.records} records, head {report.head[:16]}…")
        return
    if report.crashed:  # left mid-append by a kill or power cut: not tampering, repaired on the next start
        out.print(f"[bold yellow]CRASH[/] {log_path}: left mid-append by a crash (not tampering); the site agent "
                  "repairs it and records the repair (audit_recovered) when it next starts:")
        for p in report.crash:
            out.print(f"  {p}")
        raise typer.Exit(3)
    out.print(f"[bold red]TAMPERED[/] {log_path}:")
    for p in report.problems:
        out.print(f"  {p}")
    raise typer.Exit(1)


def main() -> None:
    """``fedbridge-site``: every error ends as one line (see :mod:`fedcommon.clierrors`)."""
    run_cli(app, "fedbridge-site", _known)


def _known() -> list[tuple[tuple[type[BaseException], ...], str, int]]:
    """The site's refusals, from the modules already loaded only.

    Why: importing the agent loads torch and transformers (seconds), which ``config check`` never needs; and an
    exception of a module that was never imported cannot have been raised.
    """
    import sys

    names = (("site_agent.agent", "SiteRefusal"), ("site_agent.policy", "PolicyRefusal"),
             ("site_agent.training.data", "DataError"))
    types = tuple(getattr(sys.modules[m], n) for m, n in names if m in sys.modules)
    return [(types, "refused:", EXIT_USAGE)]


if __name__ == "__main__":
    main()
