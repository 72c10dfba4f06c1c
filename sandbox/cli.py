"""``fedbridge``: the demo and developer tools."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

from sandbox.tiny_model import app as tiny_model_app

app = typer.Typer(help="fedbridge: federated LoRA fine-tuning across institutions.", no_args_is_help=True)
app.add_typer(tiny_model_app, name="tiny-model")
console = Console(soft_wrap=True)  # an error is one line however narrow the terminal


@app.command()
def demo(workdir: Path = typer.Option(Path("demo-run"), help="folder for PKI, data, state, logs, registry (wiped)"),
         sites: int = typer.Option(3, help="number of site processes (1-5)"),
         rounds: int = typer.Option(4, help="federated rounds"),
         steps: int = typer.Option(30, help="local steps per round"),
         learning_rate: float = typer.Option(2e-3, help="local learning rate"),
         rank: int = typer.Option(16, help="LoRA rank"),
         base_model: Path | None = typer.Option(None, "--base-model", help="local HF base model directory to "
                                                "federate (default: the house tiny Llama, built on the spot)"),
         chat_template: Path | None = typer.Option(None, "--chat-template", help="Jinja chat template file for a "
                                                   "base that ships none"),
         eval_every: int = typer.Option(1, "--eval-every", help="shared EvalScope evaluation every k rounds "
                                        "(0: off, and no release gate)"),
         baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="also train each site alone (same "
                                       "task, its data only) and compare it with the federated model")) -> None:
    """Run a coordinator and SITES site agents on loopback with mTLS for ROUNDS rounds, then publish."""
    from sandbox.demo import DemoConfig, run_demo

    logging.basicConfig(level=logging.WARNING)
    try:
        cfg = DemoConfig(workdir=workdir, sites=sites, rounds=rounds, steps=steps, learning_rate=learning_rate,
                         rank=rank, base_model=base_model, chat_template=chat_template, eval_every=eval_every,
                         baseline=baseline)
    except ValueError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    run_demo(cfg, console)


@app.command("netns-demo")
def netns_demo(workdir: Path = typer.Option(Path("netns-run"), help="folder for PKI, data, state, logs (wiped)"),
               rounds: int = typer.Option(2, help="federated rounds"),
               steps: int = typer.Option(4, help="local steps per round")) -> None:
    """The demo federation across network namespaces: a coordinator VPC, three institution VPCs, firewalls (root)."""
    from sandbox.netns import main as netns_main

    raise typer.Exit(netns_main(["--workdir", str(workdir), "--rounds", str(rounds), "--steps", str(steps)]))


def main() -> None:
    """``fedbridge``: every error ends as one line (see :mod:`fedcommon.clierrors`)."""
    from fedcommon.clierrors import run_cli

    run_cli(app, "fedbridge")


if __name__ == "__main__":
    main()
