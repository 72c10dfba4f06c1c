"""``fedbridge-admin``: the coordinator administrator's command."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="fedbridge coordinator administration.", no_args_is_help=True)
console = Console(stderr=True)


@app.command()
def serve(config: Path = typer.Option(..., "--config", "-c", help="federation.toml"),
          verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run the coordinator (gRPC with mutual TLS) for the federation in CONFIG."""
    from coordinator.config import load_federation_config
    from coordinator.server import serve as serve_async
    from protos.tomlconfig import ConfigError

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        cfg = load_federation_config(config)
    except ConfigError as e:
        console.print(f"[bold red]config error:[/] {e}")
        raise typer.Exit(2) from None
    asyncio.run(serve_async(cfg))


@app.command("dev-pki")
def dev_pki(out: Path = typer.Option(..., "--out", help="folder to write the CA, coordinator and site kits to"),
            site: list[str] = typer.Option(..., "--site", help="site name (repeat)"),
            host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host", help="coordinator host name/IP")) -> None:
    """Create a development PKI: a fresh CA, the coordinator's certificate and one kit per site."""
    from coordinator.pki import create_dev_pki

    pki = create_dev_pki(out, list(site), tuple(host))
    console.print(f"CA: {pki.ca_cert}")
    for name, kit in pki.sites.items():
        console.print(f"site kit {name}: {kit.dir}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
