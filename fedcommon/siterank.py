"""A site that trains its own, lower LoRA rank (HetLoRA, FlexLoRA): its adapter spec and its view of the global adapter.

Both transports use these two functions, so a site of rank r gets the same spec and the same starting adapter on each:
fedbridge's coordinator projects the global adapter to the rank the site declared at Join before it sends it; under
Flower, whose ServerApp sends one full-rank message to every node, the site's ClientApp projects what it receives.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedcommon import tensors
from protos.fedbridge.v1 import federation_service_pb2 as pb
from strategies.lora import truncate_rank
from strategies.registry import SITE_RANK_RULES
from strategies.types import AggregationError, StateDict


def site_spec(spec: pb.AdapterSpec, state: Mapping[str, torch.Tensor], rank: int) -> pb.AdapterSpec:
    """The spec of ``spec``'s adapter at ``rank``: the first ``rank`` components, with the same ``alpha / r`` scale.

    Args:
        spec: The federation's (full-rank) adapter spec.
        state: An adapter state of that spec (only its shapes are used).
        rank: The site's rank, ``1 <= rank <= spec.rank``.
    """
    if rank == spec.rank:
        return spec
    shapes = {k: v.to("meta") for k, v in state.items()}  # shapes and dtypes only: nothing of the values is copied
    return tensors.make_adapter_spec(truncate_rank(shapes, rank), rank, spec.alpha * rank / spec.rank, spec.dropout,
                                     list(spec.target_modules), spec.compression)


def for_site(rule: str, spec: pb.AdapterSpec, global_state: Mapping[str, torch.Tensor],
             rank: int) -> tuple[pb.AdapterSpec, StateDict]:
    """What a site of ``rank`` trains under ``rule``: its spec and the global adapter projected to it.

    Raises:
        ValueError: ``rank`` is outside ``1..spec.rank``, or it differs from the federation's rank under a rule that
            does not take mixed ranks (the message names the rule and the ranks).
    """
    if rank == spec.rank:
        return spec, dict(global_state)
    if not 1 <= rank <= spec.rank:
        raise ValueError(f"LoRA rank {rank}: this federation trains rank {spec.rank}; a site may train 1..{spec.rank}")
    project = SITE_RANK_RULES.get(rule)
    if project is None:
        raise ValueError(f"LoRA rank {rank}: this federation trains rank {spec.rank} with strategy {rule!r}; mixed "
                         f"ranks need one of {sorted(SITE_RANK_RULES)}")
    try:
        return site_spec(spec, global_state, rank), project(global_state, rank)
    except AggregationError as e:
        raise ValueError(f"LoRA rank {rank}: {e}") from None
