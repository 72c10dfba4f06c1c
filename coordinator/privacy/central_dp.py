"""Central differential privacy: the coordinator clips each site's update and noises the aggregate.

DP-FedAvg with fixed clipping (McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018; the same calibration as Flower's ``DifferentialPrivacyServerSideFixedClipping``):

1. :func:`clip_filter`: each update's whole delta is scaled to L2 norm <= C.
2. :func:`uniform_weights`: every update weighs the same, so one site moves the mean by at most C/n (example-count
   weights would let a site with many examples move it further).
3. :func:`aggregate_noise_filter`: one draw z ~ N(0, (σ·C/n)² I) is added to every clipped update, so the mean the
   rule computes is ``mean(clipped) + z``: the Gaussian mechanism on the mean. The rule (FedAvg, FedProx, or a server
   optimizer stepping on that mean) is post-processing. n, the number of accepted updates, is treated as public.

The guarantee is **site-level** DP of the published global adapters with respect to any one site's whole update
per round, held by the coordinator's process; the coordinator itself sees the sites' raw updates (use ``local``
mode, or secure aggregation, where it must not). ε is accounted with Opacus' RDP analysis (sampling rate 1 per
round; :func:`fedcommon.dp.rdp_epsilon`, the same function as the sites' ledgers), at the ``[privacy].delta`` of the
federation config, and recorded in every round's info.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedcommon.dp import csprng_generator, rdp_epsilon
from strategies.clipping import ClipConfig, clip_update
from strategies.types import ClientUpdate

ACCOUNTING = ("Renyi DP (Opacus RDP analysis of the Gaussian mechanism, sampling rate 1 per round; RDP to "
              "(epsilon, delta) by Balle et al. 2020), site-level DP (DP-FedAvg, McMahan et al. 2018)")


def clip_filter(updates: Sequence[ClientUpdate], clip_norm: float) -> list[ClientUpdate]:
    """Each update with its whole delta scaled to L2 norm <= ``clip_norm`` (new objects; inputs untouched)."""
    config = ClipConfig(clip_norm)
    return [clip_update(u, config) for u in updates]


def uniform_weights(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """The updates with weight 1 each, so the weighted mean is the plain mean."""
    return [ClientUpdate(u.site, u.delta, 1, u.metadata) for u in updates]


def aggregate_noise_filter(updates: Sequence[ClientUpdate], noise_multiplier: float, clip_norm: float,
                           generator: torch.Generator) -> tuple[list[ClientUpdate], float]:
    """Add one draw of N(0, (σ·C/n)²) per element to every update; returns the updates and the noise std.

    With uniform weights the rule's mean becomes ``mean + noise``. Call after :func:`clip_filter` and
    :func:`uniform_weights`.
    """
    n = len(updates)
    std = noise_multiplier * clip_norm / n
    first = updates[0].delta
    noise = {k: torch.normal(0.0, std, size=tuple(first[k].shape), generator=generator, dtype=torch.float64)
             for k in sorted(first)}
    noised = [ClientUpdate(u.site, {k: (v.detach().to(torch.float64) + noise[k]).to(v.dtype) for k, v in u.delta.items()},
                           u.num_examples, u.metadata) for u in updates]
    return noised, std


class CentralDp:
    """The coordinator's central-DP step for one federation.

    Args:
        noise_multiplier: σ.
        clip_norm: C.
        delta: δ for the reported ε.
        generator: Noise source; by default seeded from the OS CSPRNG (``secrets``), so nobody, sites included, can
            predict or replay the noise. Tests pass a seeded one.
    """

    def __init__(self, noise_multiplier: float, clip_norm: float, delta: float,
                 generator: torch.Generator | None = None) -> None:
        if not (noise_multiplier > 0 and clip_norm > 0 and math.isfinite(noise_multiplier * clip_norm)):
            raise ValueError("central DP needs a finite noise_multiplier > 0 and clip_norm > 0")
        self.noise_multiplier, self.clip_norm, self.delta = noise_multiplier, clip_norm, delta
        self.generator = generator if generator is not None else csprng_generator()

    def privatize(self, updates: Sequence[ClientUpdate], prior_rounds: Sequence[dict[str, Any]]
                  ) -> tuple[list[ClientUpdate], dict[str, Any]]:
        """Clip, weigh uniformly and noise this round's updates; returns them and the round's ``dp`` info.

        Args:
            updates: The round's decoded updates.
            prior_rounds: The ``info`` of earlier rounds (their ``dp`` entries are composed into the cumulative ε).
        """
        noised, std = aggregate_noise_filter(uniform_weights(clip_filter(updates, self.clip_norm)),
                                             self.noise_multiplier, self.clip_norm, self.generator)
        history = [(float(i["dp"]["noise_multiplier"]), 1.0, 1) for i in prior_rounds
                   if i.get("dp", {}).get("mode") == "central"]
        history.append((self.noise_multiplier, 1.0, 1))
        info = {"mode": "central", "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "noise_std": std, "num_updates": len(updates), "delta": self.delta,
                "epsilon": rdp_epsilon(history, self.delta), "accounting": ACCOUNTING}
        return noised, info
