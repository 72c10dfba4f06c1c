"""FedEx-LoRA: average A and B, and fold the exact residual into the frozen base weights.

Singhal, Ponkshe and Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", ACL 2025 (arXiv:2410.09432).

With example weights w_i and the sites' FULL factors (global + delta), per LoRA module:

    B̄ = Σ w_i B_i,   Ā = Σ w_i A_i,   residual = Σ w_i B_i A_i − B̄ Ā

The new global adapter is (B̄, Ā) (FedAvg of the factors, cast to the adapter dtype), and ``residual`` is returned
as a dense ``[out, in]`` tensor keyed by the BASE weight name (for example ``model.layers.0.self_attn.q_proj.weight``).
It is UNSCALED: the caller folds ``W_base += (lora_alpha / r) · residual`` and sends the folded base (or the
residual) to the sites with the next task. The rule stays in the product's layout; a base weight stored
``[in, out]`` (``Conv1D``, PEFT's ``fan_in_fan_out``, as in GPT-2) takes the transposed residual, which the caller
applies (square weights such as GPT-2's ``c_proj`` would accept either without a shape error). The residual is
computed against the factors as PUBLISHED (after the cast), so B_pub A_pub + residual equals mean(B_i A_i) up to
the residual's own float32 rounding.

Streaming: the accumulator keeps the factor sums and one float64 ``[out, in]`` sum per module, so memory is
O(adapter + dense adapted weights), independent of the number of sites. Not linear in the uploaded payloads (the
server needs each site's product), so not secure-aggregation compatible.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from strategies.fedavg import FedAvgAccumulator
from strategies.lora import LoraPair, pairs_of, product, site_factors
from strategies.types import AggregationError, AggregationResult, ClientUpdate, StateDict, feed

RULE = "fedex_lora"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class FedExLoraConfig:
    """Parameters of FedEx-LoRA.

    Attributes:
        residual_dtype: dtype of the returned dense residuals, ``"float32"`` or ``"float64"`` (sums are float64).
    """

    residual_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.residual_dtype not in _DTYPES:
            raise AggregationError(f"{RULE}: residual_dtype must be one of {sorted(_DTYPES)}, "
                                   f"got {self.residual_dtype!r}")


class FedExLoraAccumulator:
    """Streaming FedEx-LoRA: factor sums plus the dense weighted sum of the products, one update at a time."""

    def __init__(self, global_state: Mapping[str, torch.Tensor], config: FedExLoraConfig = FedExLoraConfig()) -> None:
        self._global = global_state
        self._config = config
        self._pairs: list[LoraPair] = pairs_of(global_state)[0]
        if not self._pairs:
            raise AggregationError(f"{RULE}: the global adapter has no lora_A/lora_B pairs")
        self._mean = FedAvgAccumulator(global_state)
        self._products = {p.module: torch.zeros(global_state[p.b_key].shape[0], global_state[p.a_key].shape[1],
                                                dtype=torch.float64) for p in self._pairs}

    @property
    def count(self) -> int:
        """How many updates were added."""
        return self._mean.count

    def add(self, update: ClientUpdate) -> None:
        """Fold one update in (factor sums and dense product sum)."""
        self._mean.add(update)  # checks keys and shapes first
        w = float(update.num_examples)
        for p in self._pairs:
            b, a = site_factors(self._global, update.delta, p)
            self._products[p.module].addmm_(b, a, alpha=w)

    def result(self) -> AggregationResult:
        """The averaged factors and the per-module residuals."""
        if self.count == 0:
            raise AggregationError(f"{RULE}: no updates to aggregate")
        state = self._mean.apply_to(self._global)
        total = self._mean.total_weight
        dtype = _DTYPES[self._config.residual_dtype]
        residual: StateDict = {}
        for p in self._pairs:
            residual[p.base_weight] = (self._products[p.module] / total - product(state, p)).to(dtype)
        return AggregationResult(state=state, base_residual=residual, info={"num_updates": self.count})


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: FedExLoraConfig = FedExLoraConfig()) -> tuple[StateDict, StateDict]:
    """Aggregate one round with FedEx-LoRA.

    Args:
        global_state: The round's global adapter (FULL state).
        updates: The round's DIFF updates (consumed once, one at a time).
        config: FedEx-LoRA parameters.

    Returns:
        ``(new_global_state, base_residual)``: the averaged factors, and per base weight name the unscaled dense
        residual ``mean(B_i A_i) − B̄ Ā`` to fold into the base weight. Inputs are not modified.

    Raises:
        AggregationError: On no updates, mismatched keys/shapes, or no LoRA pairs.
    """
    acc = FedExLoraAccumulator(global_state, config)
    feed(acc, updates)
    r = acc.result()
    return r.state, r.base_residual
