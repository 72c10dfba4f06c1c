"""The one Rényi-DP accountant both sides use, and the CSPRNG-seeded noise generator."""

from __future__ import annotations

import math

import pytest
import torch

from fedcommon.dp import csprng_generator, rdp_epsilon


def test_no_mechanism_is_zero_epsilon() -> None:
    assert rdp_epsilon([], 1e-5) == 0.0


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_no_noise_is_infinite_epsilon(sigma: float) -> None:
    """σ <= 0 releases the update as is: no privacy, whatever else was composed with it."""
    assert rdp_epsilon([(sigma, 1.0, 1)], 1e-5) == math.inf
    assert rdp_epsilon([(2.0, 1.0, 3), (sigma, 1.0, 1)], 1e-5) == math.inf


def test_normal_sigma_matches_opacus_published_value() -> None:
    """Opacus' own accountant test (``test_rdp_accountant``): σ 1.5, q 0.04, 2250 steps, δ 1e-5 -> ε 7.32911117143."""
    assert rdp_epsilon([(1.5, 0.04, int(90 / 0.04))], 1e-5) == pytest.approx(7.32911117143, abs=1e-8)


def test_epsilon_composes_and_more_noise_is_less_epsilon() -> None:
    one, two = rdp_epsilon([(2.0, 1.0, 1)], 1e-5), rdp_epsilon([(2.0, 1.0, 2)], 1e-5)
    assert 0 < one < two < math.inf
    assert rdp_epsilon([(2.0, 1.0, 1), (2.0, 1.0, 1)], 1e-5) == pytest.approx(two)
    assert rdp_epsilon([(4.0, 1.0, 1)], 1e-5) < one


def test_csprng_generators_are_independent() -> None:
    a = torch.randn(8, generator=csprng_generator())
    b = torch.randn(8, generator=csprng_generator("cpu"))
    assert not torch.equal(a, b)
