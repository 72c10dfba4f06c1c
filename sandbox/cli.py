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


@app.command()
def simulate(sites: int = typer.Option(10, "--sites", help="virtual sites (Flower SuperNodes)"),
             rounds: int = typer.Option(3, help="federated rounds"),
             alpha: float = typer.Option(1.0, help="Dirichlet concentration of the non-IID split (small: skewed)"),
             fraction: float = typer.Option(1.0, help="share of the sites sampled per round, in (0, 1]"),
             strategy: str = typer.Option("fedavg", help="fedavg (naive LoRA averaging), fedex-lora (exact), "
                                          "hetlora/flexlora (mixed ranks) or any other registered rule"),
             steps: int = typer.Option(2, help="local steps per sampled site and round"),
             batch_size: int = typer.Option(4, "--batch-size", help="per-site batch size"),
             learning_rate: float = typer.Option(5e-3, "--learning-rate", help="local learning rate"),
             rows_per_site: int = typer.Option(8, "--rows-per-site", help="mean train rows per site"),
             rank: int = typer.Option(8, "--rank", help="the federation's LoRA rank"),
             lora_ranks: str = typer.Option("", "--lora-ranks", metavar="R[,R...]",
                                            help="each site's own rank, cycled (site i: entry i mod len), e.g. 8,4,2"),
             ray_address: str | None = typer.Option(None, "--ray-address", help="join this Ray cluster (auto, "
                                                    "host:6379, ray://host:10001) instead of starting a local Ray"),
             num_cpus: int | None = typer.Option(None, "--num-cpus", help="CPUs of the local Ray (default: all)"),
             client_resources: str = typer.Option("1", "--client-resources", metavar="CPUS[,GPUS]",
                                                  help="Ray resources per virtual site, e.g. 1 or 0.5,0.25"),
             out: Path = typer.Option(Path("simulate-run"), "--out", help="results folder (data, tables, logs)"),
             base_model: Path | None = typer.Option(None, "--base-model", help="local HF base model directory "
                                                    "(default: the house tiny Llama)"),
             seed: int = typer.Option(0, help="partition, adapter and training seed")) -> None:
    """Run SITES virtual sites on Flower's Ray simulation engine for ROUNDS rounds; write a results table."""
    from sandbox.simulate import SimulateConfig, SimulationError, parse_client_resources, parse_lora_ranks, run

    logging.basicConfig(level=logging.WARNING)
    try:
        cpus, gpus = parse_client_resources(client_resources)
        ranks = parse_lora_ranks(lora_ranks)
        cfg = SimulateConfig(sites=sites, rounds=rounds, alpha=alpha, fraction=fraction, strategy=strategy,
                             steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                             rank=rank, lora_ranks=ranks, rows_per_site=rows_per_site, seed=seed,
                             ray_address=ray_address, num_cpus=num_cpus,
                             client_cpus=cpus, client_gpus=gpus, out=out, base_model=base_model)
    except ValueError as e:
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    try:
        run(cfg, console)
    except SimulationError as e:
        import os
        import sys
        import threading

        print(f"error: {e}", file=sys.stderr, flush=True)
        if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
            # Flower's ServerApp thread is not a daemon and waits up to its round timeout for replies that will
            # never come: Ray is already shut down, so nothing is left to clean up.
            sys.stdout.flush()
            os._exit(1)
        raise typer.Exit(1) from None


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
