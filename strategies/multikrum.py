"""Multi-Krum: average the m updates with the lowest Krum scores.

Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017 (Krum and Multi-Krum); El Mhamdi, Guerraoui and Rouault, ICML 2018 (Multi-Krum analysis).

Score of update i: the sum of squared L2 distances to its N − f − 2 nearest OTHER updates (f = assumed number of
Byzantine sites). The m lowest scores are kept and averaged weighted by examples, as Flower 1.42's MultiKrum
(which averages the selected replies with ``aggregate_arrayrecords``). Differences from Flower, all deliberate:
we exclude the update itself explicitly (Flower drops the first entry of each sorted distance row, which is only
itself when distances are distinct), break score ties by site name (permutation invariance), and refuse
N < 2f + 3, where Krum's guarantee does not hold (Flower silently uses max(1, N − f − 2) neighbours).
The rule needs every update at once (batch). Distances are translation invariant, so scoring deltas equals Flower's
scoring of weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from strategies.fedavg import FedAvgAccumulator
from strategies.types import AggregationError, ClientUpdate, StateDict, check_compatible

RULE = "multikrum"


@dataclass(frozen=True)
class MultiKrumConfig:
    """Parameters of Multi-Krum.

    Attributes:
        num_malicious: f, the number of Byzantine sites tolerated (>= 0); needs N >= 2f + 3 at aggregation.
        num_selected: m, how many lowest-score updates are averaged (>= 1, <= N - f at aggregation).
    """

    num_malicious: int = 0
    num_selected: int = 1

    def __post_init__(self) -> None:
        if self.num_malicious < 0:
            raise AggregationError(f"{RULE}: num_malicious must be >= 0, got {self.num_malicious}")
        if self.num_selected < 1:
            raise AggregationError(f"{RULE}: num_selected must be >= 1, got {self.num_selected}")


def pairwise_sq_distances(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """``[N, N]`` float64 matrix of squared L2 distances between the flattened deltas (Gram form, key by key)."""
    n = len(updates)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for k in updates[0].delta:
        x = torch.stack([u.delta[k].detach().reshape(-1).to(torch.float64) for u in updates])
        gram += x @ x.T
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)


def krum_scores(updates: Sequence[ClientUpdate], num_malicious: int) -> list[float]:
    """Krum score of every update: sum of squared distances to its N − f − 2 nearest other updates.

    Raises:
        AggregationError: If N < 2f + 3.
    """
    n = len(updates)
    if n < 2 * num_malicious + 3:
        raise AggregationError(f"{RULE}: Krum needs at least 2f + 3 = {2 * num_malicious + 3} updates for "
                               f"num_malicious={num_malicious}, got {n}")
    d = pairwise_sq_distances(updates)
    d.fill_diagonal_(float("inf"))  # a site is not its own neighbour
    k = n - num_malicious - 2
    return [float(row.sort().values[:k].sum()) for row in d]


def select(updates: Sequence[ClientUpdate], num_malicious: int, num_selected: int) -> list[int]:
    """Indices of the ``num_selected`` lowest-score updates (ties broken by site name).

    Raises:
        AggregationError: If N < 2f + 3 or ``num_selected`` > N − f.
    """
    n = len(updates)
    if num_selected > n - num_malicious:
        raise AggregationError(f"{RULE}: num_selected={num_selected} exceeds N - f = {n - num_malicious}")
    scores = krum_scores(updates, num_malicious)
    order = sorted(range(n), key=lambda i: (scores[i], updates[i].site))
    return order[:num_selected]


def aggregate_with_selection(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
                             config: MultiKrumConfig) -> tuple[StateDict, list[str]]:
    """Like :func:`aggregate`, also returning the selected sites (in score order)."""
    ups = list(updates)
    check_compatible(global_state, ups)
    chosen = select(ups, config.num_malicious, config.num_selected)
    acc = FedAvgAccumulator(global_state)
    for i in chosen:
        acc.add(ups[i])
    return acc.apply_to(global_state), [ups[i].site for i in chosen]


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: MultiKrumConfig = MultiKrumConfig()) -> StateDict:
    """New global state = global + example-weighted mean of the Multi-Krum-selected deltas.

    Args:
        global_state: The round's global adapter (FULL state).
        updates: The round's DIFF updates (all needed at once).
        config: Multi-Krum parameters.

    Returns:
        The new global adapter state; inputs are not modified.

    Raises:
        AggregationError: On no updates, mismatched keys/shapes, N < 2f + 3 or m > N − f.
    """
    return aggregate_with_selection(global_state, updates, config)[0]
