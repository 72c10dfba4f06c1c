"""``fedbridge-admin`` commands that talk to a running coordinator's AdminService (over mTLS, with the admin kit).

``sites``, ``status``, ``rounds``, ``evals``, ``start``, ``pause``, ``resume``, ``stop``, ``publish`` (without
``--to``) and ``withdraw-site``. Each prints a rich table, or JSON with ``--json`` (errors too: ``{"error", "code"}``
on stdout, exit code 1). Connection options default to environment variables, so scripts can set them once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.admin.client import ENV, AdminClient, AdminClientError, resolve

out = Console(width=160)
err = Console(stderr=True, soft_wrap=True)  # one line however narrow the terminal

CoordOpt = typer.Option("", "--coordinator", envvar=ENV["coordinator"], help="coordinator host:port")
KitOpt = typer.Option(None, "--kit", envvar=ENV["kit"], help="admin kit folder (admin.pem, admin.key, ca.pem)")
CertOpt = typer.Option(None, "--cert", envvar=ENV["cert"], help="admin certificate (PEM)")
KeyOpt = typer.Option(None, "--key", envvar=ENV["key"], help="admin private key (PEM)")
CaOpt = typer.Option(None, "--ca", envvar=ENV["ca"], help="federation CA certificate (PEM)")
NameOpt = typer.Option("", "--server-name", help="expected name in the coordinator's certificate, if not the host")
JsonOpt = typer.Option(False, "--json", help="print JSON instead of tables")


def _run(as_json: bool, coordinator: str, kit: Path | None, cert: Path | None, key: Path | None, ca: Path | None,
         server_name: str, call: Callable[[AdminClient], Any]) -> Any:
    """Connect, run ``call``, and turn a refusal into a clear message and exit code 1."""
    try:
        conn = resolve(coordinator, kit, cert, key, ca, server_name)
        with AdminClient(conn) as client:
            return call(client)
    except AdminClientError as e:
        if as_json:
            print(json.dumps({"error": e.message, "code": e.code}))
        err.print(f"[bold red]error:[/] {e.code}: {escape(e.message)}")
        raise typer.Exit(2 if e.code == "USAGE" else 1) from None


def _emit(as_json: bool, data: Any, render: Callable[[Any], None]) -> None:
    if as_json:
        print(json.dumps(data, indent=1, sort_keys=True))
    else:
        render(data)


def _ago(ms: int) -> str:
    if not ms:
        return "—"
    s = max(0.0, time.time() - ms / 1000)
    return f"{s:.0f} s ago" if s < 60 else f"{s / 60:.0f} min ago" if s < 3600 else f"{s / 3600:.1f} h ago"


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(v) for v in r])
    out.print(t)


def register(app: typer.Typer) -> None:
    """Add the live-coordinator commands to ``app``."""

    @app.command()
    def sites(coordinator: str = CoordOpt, kit: Path | None = KitOpt, cert: Path | None = CertOpt,
              key: Path | None = KeyOpt, ca: Path | None = CaOpt, server_name: str = NameOpt,
              as_json: bool = JsonOpt) -> None:
        """List the sites that joined: status, region, last seen, ε of the latest update."""
        data = _run(as_json, coordinator, kit, cert, key, ca, server_name, lambda c: c.call("ListSites"))["sites"]
        _emit(as_json, data, lambda rows: _table("sites", ["site", "status", "region", "last seen", "ε spent", "updates",
                                                           "rank", "agent"],
                                                 [[s["name"], s.get("problem") or s["status"], s["region"] or "—",
                                                   _ago(int(s["last_seen_ms"])),
                                                   f"{s['epsilon_spent']:g}", s["updates"], s["lora_rank"],
                                                   s["agent_version"]] for s in rows]))

    @app.command()
    def status(coordinator: str = CoordOpt, kit: Path | None = KitOpt, cert: Path | None = CertOpt,
               key: Path | None = KeyOpt, ca: Path | None = CaOpt, server_name: str = NameOpt,
               as_json: bool = JsonOpt) -> None:
        """Show the federation's state and its current round."""
        data = _run(as_json, coordinator, kit, cert, key, ca, server_name, lambda c: c.call("GetStatus"))
        for k in ("current_round", "total_rounds", "min_sites", "round_updates", "sites_joined", "sites_connected",
                  "latest_version"):
            data[k] = int(data[k])
        _emit(as_json, data, lambda d: _table(f"federation {d['federation_id']}", ["field", "value"],
                                              [[k, "\n".join(v) or "none" if isinstance(v, list) else v]
                                               for k, v in d.items() if k != "federation_id"]))

    @app.command()
    def rounds(coordinator: str = CoordOpt, kit: Path | None = KitOpt, cert: Path | None = CertOpt,
               key: Path | None = KeyOpt, ca: Path | None = CaOpt, server_name: str = NameOpt,
               as_json: bool = JsonOpt) -> None:
        """List the rounds: state, sites, mean train loss, aggregation error, output hash."""
        data = _run(as_json, coordinator, kit, cert, key, ca, server_name, lambda c: c.call("ListRounds"))["rounds"]
        _emit(as_json, data, lambda rows: _table("rounds", ["round", "state", "sites", "train loss", "agg. error mean",
                                                            "agg. error max", "output"],
                                                 [[r["round"], r["state"], ", ".join(r["sites"]),
                                                   f"{r['train_loss']:.4f}" if r["train_loss"] else "—",
                                                   f"{r['aggregation_error_mean']:.3g}", f"{r['aggregation_error_max']:.3g}",
                                                   r["output_sha256"][:12]] for r in rows]))

    @app.command()
    def evals(coordinator: str = CoordOpt, kit: Path | None = KitOpt, cert: Path | None = CertOpt,
              key: Path | None = KeyOpt, ca: Path | None = CaOpt, server_name: str = NameOpt,
              as_json: bool = JsonOpt) -> None:
        """List the shared-benchmark evaluations of the global model (primary score per benchmark)."""
        data = _run(as_json, coordinator, kit, cert, key, ca, server_name,
                    lambda c: c.call("ListEvaluations"))["evaluations"]

        def render(rows: list[dict[str, Any]]) -> None:
            names = sorted({b for r in rows for b in r["scores"]})
            _table("shared evaluation", ["round", "status", "seconds", *names],
                   [[r["round"], r["status"] + (f": {r['error'][:60]}" if r["error"] else ""), f"{r['seconds']:.1f}",
                     *[f"{r['scores'][b]:.4f}" if b in r["scores"] else "" for b in names]] for r in rows])
            if not rows:
                # markup=False: rich would read "[evaluation]" as a style tag and print "(is  enabled?)".
                out.print("no evaluation has run (is [evaluation] enabled = true in federation.toml?)", markup=False)

        _emit(as_json, data, render)

    def control(method: str, verb: str) -> Callable[..., None]:
        def command(coordinator: str = CoordOpt, kit: Path | None = KitOpt, cert: Path | None = CertOpt,
                    key: Path | None = KeyOpt, ca: Path | None = CaOpt, server_name: str = NameOpt,
                    as_json: bool = JsonOpt) -> None:
            data = _run(as_json, coordinator, kit, cert, key, ca, server_name, lambda c: c.call(method))
            _emit(as_json, data, lambda d: out.print(f"[bold]{verb}[/]: the federation is now [bold]{d['state']}[/]"))

        command.__doc__ = {"Start": "Start a federation created with autostart = false.",
                           "Pause": "Pause: offer no new tasks, advance no round (uploads in flight still land).",
                           "Resume": "Resume a paused federation.",
                           "Stop": "Stop the federation: sites are told it is done; no further round opens."}[method]
        return command

    for method, verb in (("Start", "started"), ("Pause", "paused"), ("Resume", "resumed"), ("Stop", "stopped")):
        app.command(method.lower())(control(method, verb))

    @app.command("withdraw-site")
    def withdraw_site(site: str = typer.Argument(..., help="the site to withdraw"),
                      reason: str = typer.Option("", "--reason", help="why (recorded in the new version's provenance)"),
                      coordinator: str = CoordOpt, kit: Path | None = KitOpt, cert: Path | None = CertOpt,
                      key: Path | None = KeyOpt, ca: Path | None = CaOpt, server_name: str = NameOpt,
                      as_json: bool = JsonOpt) -> None:
        """Rebuild the global model without SITE's updates (re-running its rounds from the ledger) and publish it."""
        with Progress(TextColumn("rebuilding without {task.fields[site]}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, disable=as_json) as bar:
            task = bar.add_task("withdraw", total=None, site=site)
            data = _run(as_json, coordinator, kit, cert, key, ca, server_name,
                        lambda c: c.withdraw_site(site, reason, lambda d, t: bar.update(task, completed=d, total=t)))
        data.pop("done", None)
        data.pop("rounds_done", None)
        data.pop("rounds_total", None)
        _emit(as_json, data, lambda d: out.print(
            f"[bold green]withdrew {site}[/]: rounds {d['from_round']}..{d['to_round']} rebuilt, published "
            f"v{d['version']} at {d['path']}" if d["published"] else
            f"[bold red]rebuilt without {site} but the release gate blocked it:[/] {d['blocked_reason']}"))


def publish_via_api(as_json: bool, coordinator: str, kit: Path | None, cert: Path | None, key: Path | None,
                    ca: Path | None, server_name: str) -> None:
    """``publish`` without ``--to``: ask the coordinator to gate and publish its latest global model."""
    data = _run(as_json, coordinator, kit, cert, key, ca, server_name, lambda c: c.call("Publish"))
    _emit(as_json, data, lambda d: out.print(
        f"[bold green]published[/] round {d['round']}'s global model as v{d['version']}: {d['path']}" if d["published"]
        else f"[bold red]blocked[/] round {d['round']}: {d['blocked_reason']}"))
    if not data["published"]:
        raise typer.Exit(1)
