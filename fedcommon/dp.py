"""Differential-privacy helpers both sides use: Rényi-DP accounting and CSPRNG-seeded noise generators.

Accounting is the maintained analysis of Opacus (``opacus.accountants.analysis.rdp``: the sampled Gaussian mechanism
of Mironov, Talwar and Zhang, arXiv:1908.10530, and the RDP to (ε, δ) conversion of Balle et al., AISTATS 2020). The
site's ledger and the coordinator's central DP report ε with this one function, so the two can never disagree.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a generator is made: reading a config must not pay for it
    import torch

# Opacus' default orders plus larger ones: with sampling rate 1 and few rounds the optimum order grows with σ.
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256, 384, 512, 1024])


def rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` after composing ``history``: ``(noise_multiplier, sample_rate, steps)`` Gaussian mechanisms.

    An empty history is 0. A mechanism with σ <= 0 adds no noise, so it releases its input as is: ε is ∞ (Opacus
    would divide by zero or return a meaningless finite value for such σ, so it is never asked).

    Args:
        history: One ``(noise_multiplier, sample_rate, steps)`` per run of identical mechanisms.
        delta: The δ of the reported (ε, δ) guarantee.

    Returns:
        The composed ε (0 for no mechanisms, ``math.inf`` if any has no noise).

    Raises:
        RuntimeError: Opacus is not installed (``pip install 'fedbridge[dp]'``).
    """
    if not history:
        return 0.0
    if any(not sigma > 0 for sigma, _, _ in history):  # `not >` also catches NaN
        return math.inf
    try:
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"DP accounting needs opacus ({e}): pip install 'fedbridge[dp]'") from e
    total = None
    for sigma, q, steps in history:
        r = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(ORDERS))
        total = r if total is None else total + r
    with warnings.catch_warnings():  # "optimal order is the largest alpha": still a valid (looser) bound
        warnings.simplefilter("ignore")
        eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=total, delta=delta)
    return float(eps)


def csprng_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with 63 bits from the OS CSPRNG (``secrets``).

    Why: DP noise must be unpredictable to everyone else (the coordinator for a site's noise, the sites for the
    coordinator's), so it cannot come from a task seed or any value another party knows or could replay. torch's
    generator (MT19937 on CPU) is not itself a cryptographic generator: its output is only ever released added to an
    update, never on its own. Like every floating-point Gaussian sampler it is not hardened against the
    floating-point attacks of Mironov (CCS 2012); that limit is documented, not fixed.
    """
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63))  # manual_seed takes a signed 64-bit value
    return gen
