"""The site's DP accountant, ledger and budget rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedcommon.dp import ORDERS, rdp_epsilon
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent.egress.dp import (
    DpSettings,
    LedgerError,
    PrivacyLedger,
    SiteDpConfig,
    check_budget,
    resolve,
)
from site_agent.policy import PolicyRefusal, SitePolicy


def test_accountant_matches_opacus_published_value() -> None:
    """Published value: Opacus' own accountant test (pytorch/opacus, ``opacus/tests/accountants_test.py``,
    ``test_rdp_accountant``): noise multiplier 1.5, sampling rate 0.04, int(90 / 0.04) = 2250 steps, delta 1e-5
    gives epsilon 7.32911117143 (90 epochs of DP-SGD)."""
    assert rdp_epsilon([(1.5, 0.04, int(90 / 0.04))], 1e-5) == pytest.approx(7.32911117143, abs=1e-8)


@pytest.mark.parametrize(("sigma", "rounds", "delta"), [(1.0, 1, 1e-5), (1.1, 10, 1e-5), (4.0, 50, 1e-6),
                                                       (20.0, 3, 1e-5)])
def test_accountant_matches_closed_form_gaussian_rdp(sigma: float, rounds: int, delta: float) -> None:
    """Closed form (sampling rate 1, the site takes part in every round it trains): T Gaussian mechanisms of noise
    multiplier sigma are (alpha, T * alpha / (2 sigma^2))-RDP (Mironov, "Renyi Differential Privacy", CSF 2017,
    Prop. 7 and composition). The (epsilon, delta) conversion is Balle et al., AISTATS 2020, Thm. 21:
    epsilon = min over alpha of rdp + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1)."""
    by_hand = min(rounds * a / (2 * sigma**2) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
                  for a in ORDERS)
    assert rdp_epsilon([(sigma, 1.0, rounds)], delta) == pytest.approx(by_hand, rel=1e-9)


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_accountant_is_a_valid_and_tight_bound_on_the_exact_gaussian_epsilon(sigma: float, rounds: int) -> None:
    """The exact privacy curve of T Gaussian mechanisms with multiplier sigma is that of one Gaussian with
    mu = sqrt(T) / sigma: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle and Wang, "Improving
    the Gaussian Mechanism for Differential Privacy", ICML 2018, Thm. 8; Dong, Roth and Su, Gaussian DP, 2019).
    RDP must never report less than the exact epsilon (that would under-count) and should be within 35% of it."""
    mu, delta = math.sqrt(rounds) / sigma, 1e-5
    exact = brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 1e-9, 500)
    rdp = rdp_epsilon([(sigma, 1.0, rounds)], delta)
    assert exact <= rdp <= 1.35 * exact


def test_no_noise_is_unbounded_and_nothing_is_zero() -> None:
    assert rdp_epsilon([], 1e-5) == 0.0
    assert rdp_epsilon([(1.0, 1.0, 1), (0.0, 1.0, 1)], 1e-5) == math.inf


def test_ledger_survives_restart_and_only_grows(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "work" / "privacy_ledger.json"
    s = DpSettings(noise_multiplier=2.0, clip_norm=1.0)
    ledger = PrivacyLedger(path)

    # Execute
    eps = []
    for r in (1, 2, 3):
        ledger.record("fed", r, s, f"{r:064x}")
        eps.append(ledger.epsilon(1e-5))
    ledger.record("fed", 3, s, f"{3:064x}")  # the same release re-recorded (an upload retried): no second count
    reopened = PrivacyLedger(path)  # a restarted agent
    reopened.record("fed", 3, s, f"{33:064x}")  # round 3 retrained after a crash: a second release, counted

    # Assert
    assert eps[0] < eps[1] < eps[2]
    assert len(reopened.entries) == 4 and reopened.entries[:3] == ledger.entries
    assert reopened.epsilon(1e-5) == pytest.approx(rdp_epsilon([(2.0, 1.0, 4)], 1e-5))
    assert json.loads(path.read_text())["entries"][0]["round"] == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_unreadable_ledger_stops_the_agent(tmp_path: Path) -> None:
    path = tmp_path / "privacy_ledger.json"
    path.write_text('{"entries": [{"round": 1}]')
    with pytest.raises(LedgerError, match="refusing to start from zero"):
        PrivacyLedger(path)


def test_budget_refuses_the_round_that_would_exceed_it(tmp_path: Path) -> None:
    # Prepare: sigma 2, delta 1e-5; budget between the epsilon of 2 and of 3 rounds
    s = DpSettings(noise_multiplier=2.0, clip_norm=1.0)
    two, three = rdp_epsilon([(2.0, 1.0, 2)], 1e-5), rdp_epsilon([(2.0, 1.0, 3)], 1e-5)
    policy = SitePolicy(dp_epsilon_budget=(two + three) / 2, dp_delta=1e-5)
    ledger = PrivacyLedger(tmp_path / "l.json")

    # Execute / Assert: rounds 1 and 2 fit, round 3 is refused naming the rule
    for r in (1, 2):
        assert check_budget(policy, ledger, s) <= policy.dp_epsilon_budget
        ledger.record("fed", r, s, f"{r:064x}")
    with pytest.raises(PolicyRefusal, match=r"rule 'dp_epsilon_budget'.*bring the site's epsilon to 4\.011 at "
                                             r"delta=1e-05.*budget is 3\.6.*3\.189 is spent over 2 noised update"):
        check_budget(policy, ledger, s)
    # A round without noise is refused whenever a budget is set; without a budget nothing is refused.
    with pytest.raises(PolicyRefusal, match="no DP noise"):
        check_budget(policy, PrivacyLedger(tmp_path / "empty.json"), DpSettings())
    assert check_budget(SitePolicy(), ledger, s) == pytest.approx(three)


def test_site_and_task_settings_combine_into_the_stronger() -> None:
    site = SiteDpConfig(noise_multiplier=1.0, clip_norm=2.0)
    assert resolve(site, pb.DpRequest(noise_multiplier=0.5, clip_norm=1.0)) == DpSettings(1.0, 1.0)
    assert resolve(site, pb.DpRequest(noise_multiplier=3.0)) == DpSettings(3.0, 2.0)
    assert resolve(SiteDpConfig(), pb.DpRequest()) == DpSettings(0.0, 0.0)
    assert resolve(SiteDpConfig(), pb.DpRequest()).filters() == []
    with pytest.raises(ValueError, match="without a clip norm"):
        resolve(SiteDpConfig(), pb.DpRequest(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="field 'dp.clip_norm'"):
        SiteDpConfig(noise_multiplier=1.0)


def test_policy_dp_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="field 'dp_delta'"):
        SitePolicy(dp_delta=0.0)
    with pytest.raises(ValueError, match="field 'dp_epsilon_budget'"):
        SitePolicy(dp_epsilon_budget=-1.0)
