"""fedbridge's coordinator side as a Flower ``ServerApp``: R rounds of a ``federation.toml`` over Flower's transport.

Run config (``[tool.flwr.app.config]`` in the FAB, or ``flwr run --run-config``):

- ``federation-config``: path of the ``federation.toml`` on the SuperLink's (ServerApp's) host. The base model, the
  adapter (``[lora]``), the rule (``strategy``, ``[strategy_params]``), ``[training]``, ``rounds``, ``min_sites``,
  the chat template and local DP requests are read from it, and the round-0 adapter and each round's task are built
  by the coordinator's own functions (:func:`coordinator.rounds.adapter.init_adapter`,
  :func:`coordinator.ingress.servicer.build_task`). Its ``[tls]``, ``listen``, quorum, evaluation, gate and publish
  settings are not used here.
- ``output-dir``: where the final adapter goes: ``adapter/`` (PEFT ``adapter_config.json`` +
  ``adapter_model.safetensors``), ``base_residual.safetensors`` under FedEx-LoRA, ``rounds.json`` (each round's
  rule info and metrics).
- optional ``fraction-train`` / ``fraction-evaluate`` (Flower's sampling; default 1.0 and 0.0: federated evaluation
  runs only when asked), ``round-timeout`` (seconds, default 3600).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedcommon import flowerwire as fw

log = logging.getLogger(__name__)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation the run config names and write its final adapter."""
    run = dict(context.run_config)
    for key in ("federation-config", "output-dir"):
        if key not in run:
            raise ValueError(f"run config {key!r} is not set (see coordinator/flower/serverapp.py)")
    run_federation(grid, Path(str(run["federation-config"])), Path(str(run["output-dir"])),
                   fraction_train=float(run.get("fraction-train", 1.0)),
                   fraction_evaluate=float(run.get("fraction-evaluate", 0.0)),
                   timeout=float(run.get("round-timeout", 3600.0)))


def run_federation(grid: Grid, federation_toml: Path, output_dir: Path, *, fraction_train: float = 1.0,
                   fraction_evaluate: float = 0.0, timeout: float = 3600.0,
                   evaluate_fn: Callable[[Any, int, Any], Any] | None = None) -> Path:
    """Build the round-0 adapter and the tasks from ``federation_toml``, run its rounds on ``grid``, write the result.

    ``evaluate_fn(strategy, round, arrays)``, if given, is Flower's central evaluation (before round 1 and after each
    round), with the strategy so it can see FedEx-LoRA's residual (``fedbridge simulate`` scores its held-out set).

    Returns:
        ``output_dir``.
    """
    from coordinator.basemodel import check_base_model
    from coordinator.config import load_federation_config
    from coordinator.flower.strategy import FedbridgeStrategy
    from coordinator.ingress.servicer import build_task
    from coordinator.rounds.adapter import base_layout, init_adapter, peft_view
    from fedcommon.manifest import MANIFEST_NAME, Manifest, verify_model_dir
    from strategies.fedsb import is_fedsb_name

    cfg = load_federation_config(federation_toml)
    if cfg.privacy.mode == "central" or cfg.secure_aggregation.enabled:
        raise ValueError(f"{federation_toml}: central DP and secure aggregation run only on fedbridge's own "
                         "transport; turn them off for a Flower run (local DP, [privacy] mode = 'local', works)")
    if cfg.lora.compress_download:
        raise ValueError(f"{federation_toml}: field 'lora.compress_download': not supported over Flower (the global "
                         "adapter travels dense); set it to false")
    recorded = Path(cfg.base_model) / MANIFEST_NAME
    manifest = (verify_model_dir(cfg.base_model, Manifest.load(recorded).sha256, pinned_by=f"its {MANIFEST_NAME}")
                if recorded.is_file() else Manifest.of_dir(cfg.base_model))
    template = check_base_model(cfg)
    adapter = init_adapter(cfg.base_model, cfg.lora, is_fedsb_name(cfg.strategy))
    strategy: FedbridgeStrategy

    def task(round: int) -> Any:
        return build_task(cfg, round, manifest.sha256, template, adapter.spec, strategy.rule.site_params)

    strategy = FedbridgeStrategy(cfg.strategy, cfg.strategy_params, task_for_round=task,
                                 residual_scale=adapter.spec.alpha / adapter.spec.rank,
                                 fan_in_fan_out=base_layout(cfg.base_model).fan_in_fan_out,
                                 fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                                 min_train_nodes=cfg.min_sites, min_evaluate_nodes=cfg.min_sites if fraction_evaluate else 0,
                                 min_available_nodes=cfg.min_sites)
    result = strategy.start(grid, fw.state_record(adapter.state), num_rounds=cfg.rounds, timeout=timeout,
                            train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
                            evaluate_fn=(lambda r, a: evaluate_fn(strategy, r, a)) if evaluate_fn else None)
    final = fw.record_state(result.arrays, "final adapter")
    write_result(output_dir, cfg, adapter.spec, final, strategy.residual, {
        "strategy": strategy.rule.name, "rounds": cfg.rounds, "last_round_info": strategy.last_info,
        "train_metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate_metrics": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
    }, peft_view)
    log.info("[Flower.ServerApp] federation=%s rounds=%d strategy=%s final adapter in %s", cfg.federation_id,
             cfg.rounds, strategy.rule.name, output_dir)
    return output_dir


def write_result(output_dir: Path, cfg: Any, spec: Any, state: dict[str, Any], residual: dict[str, Any],
                 summary: dict[str, Any], peft_view: Any) -> None:
    """The final adapter as the registry publishes it (``adapter/``), the FedEx residual, and ``rounds.json``."""
    from safetensors.torch import save_file

    from coordinator.release.publish import _write_adapter
    from fedcommon.durable import write_durable

    output_dir.mkdir(parents=True, exist_ok=True)
    view_spec, view = peft_view(cfg.base_model, spec, state)
    _write_adapter(output_dir / "adapter", Path(cfg.base_model), view_spec, view, cfg.base_model_ref,
                   fedex_residual=bool(residual))
    if residual:
        save_file({k: v.contiguous() for k, v in sorted(residual.items())}, str(output_dir / "base_residual.safetensors"))
    write_durable(output_dir / "rounds.json", json.dumps(summary, indent=2, sort_keys=True, default=str).encode())
