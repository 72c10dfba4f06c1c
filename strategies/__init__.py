"""Aggregation as pure functions over adapter state dicts (torch only).

One rule per module, each citing its paper: FedAvg (``fedavg``), FedProx, FedAvgM, the FedOpt server optimizers
(``fedadam``, ``fedyogi``, ``fedadagrad``), the robust rules (``median``, ``trimmed_mean``, ``krum``,
``multikrum``), the LoRA-exact rules (``ffa_lora``, ``fedex_lora``, ``flora``), the mixed-rank rules (``hetlora``,
``flexlora``), the clipping filter (``clipping``) and the aggregation-error meter (``error_meter``).

The coordinator uses :func:`strategies.registry.build_strategy`, which returns one uniform object per rule (see
:mod:`strategies.protocol`); each module's pure functions stay usable on their own.
"""
