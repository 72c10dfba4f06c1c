"""``fedbridge-admin``: the coordinator administrator's command."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from coordinator.admin import commands as admin_commands

app = typer.Typer(help="fedbridge coordinator administration.", no_args_is_help=True)
# soft_wrap: a message is one line however narrow the terminal (rich would fold a long path over several).
console = Console(stderr=True, soft_wrap=True)


@app.command()
def serve(config: Path = typer.Option(..., "--config", "-c", help="federation.toml"),
          verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run the coordinator (gRPC with mutual TLS) for the federation in CONFIG."""
    from coordinator.config import load_federation_config
    from coordinator.server import serve as serve_async
    from fedcommon.tomlconfig import ConfigError

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        cfg = load_federation_config(config)
    except ConfigError as e:
        console.print(f"[bold red]config error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    from coordinator.basemodel import BaseModelError
    from coordinator.dashboard import DashboardError
    from coordinator.errors import EXIT_FEDERATION_STOPPED, FederationStopped
    from coordinator.server import CoordinatorFailed, StartRefused

    try:
        asyncio.run(serve_async(cfg))
    except BaseModelError as e:
        console.print(f"[bold red]base model error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    except FederationStopped as e:  # terminal (kept in the store): the same line on every start, never a traceback
        console.print(f"[bold red]{escape(str(e))}[/] (state kept in {cfg.state_dir}; see the audit log)")
        raise typer.Exit(EXIT_FEDERATION_STOPPED) from None
    except CoordinatorFailed as e:
        console.print(f"[bold red]coordinator stopped:[/] {escape(str(e))}")
        raise typer.Exit(1) from None
    except DashboardError as e:
        console.print(f"[bold red]dashboard error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    except StartRefused as e:  # a CA key beside the coordinator, unreadable [tls] files
        console.print(f"[bold red]refused:[/] {escape(str(e))}")
        raise typer.Exit(2) from None


@app.command("dev-pki")
def dev_pki(out: Path = typer.Option(..., "--out", help="folder to write the CA, coordinator and site kits to"),
            site: list[str] = typer.Option(..., "--site", help="site name (repeat)"),
            host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host", help="coordinator host name/IP")) -> None:
    """Create a DEVELOPMENT PKI: a fresh CA, the coordinator's certificate and one kit per site, every private key
    in one folder (tests and demos only; a real federation enrols by CSR)."""
    from coordinator.trust.pki import DEV_PKI_WARNING, create_dev_pki

    pki = create_dev_pki(out, list(site), tuple(host))
    print(f"WARNING: {DEV_PKI_WARNING}")  # stdout, loudly: this is not how a real federation enrols
    console.print(f"CA: {pki.ca_cert}")
    for name, kit in pki.sites.items():
        console.print(f"site kit {name}: {kit.dir}")


@app.command("publish")
def publish_cmd(to: str = typer.Option("", "--to", help="push a published version to hf://<org>/<name> or "
                                                      "modelscope://<org>/<name> (local; needs --registry, "
                                                      "--federation, --version). Without --to: ask the running "
                                                      "coordinator to gate and publish its latest global model."),
                registry: Path | None = typer.Option(None, "--registry", help="registry folder (federation.toml's "
                                                                              "registry_dir)"),
                federation: str = typer.Option("", "--federation", help="federation id"),
                version: int = typer.Option(0, "--version", help="published version number N (folder v<N>)"),
                public: bool = typer.Option(False, "--public", help="create the hub repository public (default private)"),
                token_env: str = typer.Option("", "--token-env",
                                              help="environment variable holding the hub token (default: the hub "
                                                   "library's own login)"),
                coordinator: str = admin_commands.CoordOpt, kit: Path | None = admin_commands.KitOpt,
                cert: Path | None = admin_commands.CertOpt, key: Path | None = admin_commands.KeyOpt,
                ca: Path | None = admin_commands.CaOpt, server_name: str = admin_commands.NameOpt,
                as_json: bool = admin_commands.JsonOpt) -> None:
    """Publish the coordinator's latest global model (admin API), or push a published version to a hub (--to)."""
    import os

    from coordinator.release.publish import PushError, push_version

    if not to:
        admin_commands.publish_via_api(as_json, coordinator, kit, cert, key, ca, server_name)
        return
    if registry is None or not federation or version < 1:
        console.print("[bold red]error:[/] publish --to needs --registry, --federation and --version")
        raise typer.Exit(2)
    path = registry / federation / f"v{version}"
    token = os.environ.get(token_env) if token_env else None
    with console.status(f"pushing {path} to {to}"):
        try:
            url = push_version(path, to, token=token, private=not public)
        except PushError as e:
            console.print(f"[bold red]push failed:[/] {escape(str(e))}")
            raise typer.Exit(1) from None
    console.print(f"[bold green]pushed[/] {path} -> {url}")


@app.command("releases")
def releases(state_dir: Path = typer.Option(..., "--state-dir", help="the coordinator's state_dir")) -> None:
    """List the federation's shared evaluations, publications and blocked publications (with the gate's reason)."""
    from rich.table import Table

    from coordinator.rounds.store import Store

    if not (state_dir / "coordinator.db").exists():
        console.print(f"[bold red]error:[/] {state_dir} holds no coordinator.db")
        raise typer.Exit(2)
    store = Store(state_dir)
    try:
        evals = Table(title="shared evaluation (primary score per benchmark)", title_justify="left")
        scores = store.eval_scores()
        names = sorted({b for r in scores.values() for b in r})
        for c in ["round", "status", *names]:
            evals.add_column(c)
        for run in store.eval_runs():
            row = scores.get(run["round"], {})
            evals.add_row(str(run["round"]), run["status"] if not run["error"] else f"{run['status']}: {run['error'][:80]}",
                          *[f"{row[b]['score']:.4f}" if b in row else "" for b in names])
        rel = Table(title="releases", title_justify="left")
        for c in ("round", "outcome", "version / reason", "path"):
            rel.add_column(c)
        for p in store.publications():
            rel.add_row(str(p["round"]), "[green]published[/]", f"v{p['version']}", p["path"])
        for b in store.blocked_publications():
            rel.add_row(str(b["round"]), "[red]blocked[/]", b["reason"], "")
    finally:
        store.close()
    out = Console(width=200)
    out.print(evals)
    out.print(rel)


config_app = typer.Typer(help="The coordinator's config file (federation.toml).", no_args_is_help=True)


@config_app.command("check")
def config_check(path: Path = typer.Argument(..., help="the federation.toml to check")) -> None:
    """Validate federation.toml and print every setting with its resolved value (marked file or default).

    Checks what loading checks (names, types, ranges, the strategy and its parameters); not the files it points at
    (the base model, TLS material), which `serve` checks at start. Exit 0 when the file is good; 2, with one line
    naming the file and the field, when it is not.
    """
    from coordinator.config import load_federation_config
    from fedcommon.configdoc import check_report
    from fedcommon.tomlconfig import ConfigError

    try:
        cfg = load_federation_config(path)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(check_report(cfg, path), nl=False)


app.add_typer(config_app, name="config")

from coordinator.admin.pki_cli import register as register_pki_commands  # noqa: E402 - after this module's own commands

register_pki_commands(app)

# Commands that talk to a running coordinator (AdminService). Other command modules register the same way.
admin_commands.register(app)


def main() -> None:
    """``fedbridge-admin``: every error ends as one line (see :mod:`fedcommon.clierrors`)."""
    from coordinator.basemodel import BaseModelError
    from coordinator.trust.enrolment import EnrolmentError
    from coordinator.trust.pki import PKIError
    from fedcommon.clierrors import EXIT_USAGE, run_cli

    run_cli(app, "fedbridge-admin", [((BaseModelError,), "base model error:", EXIT_USAGE),
                                     ((EnrolmentError, PKIError), "error:", EXIT_USAGE)])


if __name__ == "__main__":
    main()
