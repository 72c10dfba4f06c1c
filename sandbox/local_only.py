"""The demo's baseline: each site training alone, with the federation's own task and the site agent's own trainer.

What federation buys is measured against a site that never federates. A local-only run takes exactly the task a
site gets (the training config, LoRA spec, chat template and seed of ``federation.toml``, built here the way the
coordinator builds them, and the coordinator's own initial adapter) and runs ``rounds`` rounds of ``max_steps``
local steps each through :class:`site_agent.training.trainer.SftSiteTrainer` (via the agent's ``make_trainer``),
every round starting from its own last state: a one-site federation, which is the site alone. The finished adapter
is then scored with the trainer's own held-out scoring on every site's held-out file, so the federated model and
the local-only ones are judged on the same union of tasks by the same code.

It runs as its own process (``python -m sandbox.local_only``), one per site, beside the federation, so the demo
pays for the extra training in parallel. It sends nothing anywhere: it reads the config, the data, and writes one
JSON result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from fedcommon.durable import write_durable


def training_config(spec: Any) -> Any:
    """The ``pb.TrainingConfig`` a task carries for ``[training]`` (:class:`coordinator.config.TrainingSpec`).

    Every field of the message is taken from the spec field of the same name (``per_device_batch_size`` from
    ``batch_size``), so a field added to both reaches the baseline without a change here.

    Raises:
        ValueError: The message has a field the spec does not (the baseline would train with a default the
            sites do not).
    """
    from protos.fedbridge.v1 import federation_service_pb2 as pb

    values = {("per_device_batch_size" if k == "batch_size" else k): v for k, v in dataclasses.asdict(spec).items()}
    fields = [f.name for f in pb.TrainingConfig.DESCRIPTOR.fields]
    missing = [f for f in fields if f not in values]
    if missing:
        raise ValueError(f"TrainingConfig field(s) {missing} have no [training] setting to take them from")
    return pb.TrainingConfig(**{f: values[f] for f in fields})


def federation_task(federation_toml: Path) -> tuple[Any, dict[str, Any]]:
    """Round 1's task as a site receives it from the federation in ``federation_toml``, and its global adapter.

    Raises:
        ValueError: The federation sends site hints (FedProx, FFA-LoRA), local DP, or mixed ranks: a site alone
            would not train like its sites, so the baseline refuses rather than compare unlike runs.
    """
    from coordinator.basemodel import template_pin
    from coordinator.config import load_federation_config
    from coordinator.rounds.adapter import init_adapter
    from protos.fedbridge.v1 import federation_service_pb2 as pb

    cfg = load_federation_config(federation_toml)
    if cfg.strategy not in ("fedavg",) or cfg.privacy.mode != "none":
        raise ValueError(f"the local-only baseline follows plain FedAvg without DP; this federation runs "
                         f"strategy {cfg.strategy!r} with privacy {cfg.privacy.mode!r}")
    init = init_adapter(cfg.base_model, cfg.lora)  # the same draw as the coordinator's round-1 input (seeded)
    pin = template_pin(cfg.base_model, cfg.model.chat_template, cfg.training.mode)
    task = pb.Task(federation_id=cfg.federation_id, round=1, total_rounds=cfg.rounds,
                   base_model_ref=cfg.base_model_ref, training=training_config(cfg.training),
                   chat_template=pin.text, chat_template_sha256=pin.sha256, adapter_spec=init.spec)
    return task, init.state


def run_local_only(federation_toml: Path, base_model: Path, train: Path, heldout: dict[str, Path],
                   work_dir: Path) -> dict[str, Any]:
    """Train one site alone for the federation's rounds and score the result on every site's held-out file.

    Returns:
        ``{"rounds", "steps" (total, from the trainer), "steps_per_round", "train_loss" (last round),
        "heldout": {site: [loss, tokens]}}``.
    """
    from site_agent.agent import make_trainer
    from site_agent.training.data import load_sft

    task, state = federation_task(federation_toml)
    trainer = make_trainer(task.training.mode or "sft", base_model, train, work_dir,
                           chat_template=task.chat_template, chat_template_sha256=task.chat_template_sha256)
    steps, loss = [], float("nan")
    for r in range(1, task.total_rounds + 1):
        task.round = r  # the round numbers the seeds (seed + round), as in the federation
        result = trainer.train_round(task, state)
        # A one-site FedAvg round: the next input is this round's output (float32 wire, as the federation's).
        state = {k: (v.float() + result.delta[k]).to(v.dtype) for k, v in state.items()}
        steps.append(result.steps)
        loss = result.train_loss
    scores = {}
    for site, path in heldout.items():
        scores[site] = list(trainer.evaluate(task.adapter_spec, state, load_sft(path)))
    return {"rounds": task.total_rounds, "steps": sum(steps), "steps_per_round": steps, "train_loss": loss,
            "heldout": scores}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sandbox.local_only", description=__doc__.splitlines()[0])
    ap.add_argument("--federation", type=Path, required=True, help="the federation.toml the sites follow")
    ap.add_argument("--base-model", type=Path, required=True, help="the site's copy of the base model")
    ap.add_argument("--train", type=Path, required=True, help="the site's training file")
    ap.add_argument("--heldout", action="append", default=[], metavar="SITE=FILE", help="a held-out file to score on")
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="where the JSON result goes")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    heldout = dict(h.split("=", 1) for h in args.heldout)
    result = run_local_only(args.federation, args.base_model, args.train, {k: Path(v) for k, v in heldout.items()},
                            args.work_dir)
    os.makedirs(args.out.parent, exist_ok=True)
    write_durable(args.out, json.dumps(result, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
