"""TrainingSpec: every site mode is accepted, and preference knobs are checked and tied to the modes that use them."""

from __future__ import annotations

import pytest

from coordinator.config import MODES, TrainingSpec


def test_all_site_modes_are_accepted() -> None:
    assert MODES == ("sft", "qlora", "dpo", "kto", "orpo", "simpo")
    for mode in MODES:
        assert TrainingSpec(mode=mode).mode == mode


@pytest.mark.parametrize("spec", [
    dict(mode="dpo", beta=0.1, loss_type="ipo", rpo_alpha=1.0, label_smoothing=0.1),
    dict(mode="kto", beta=0.1, loss_type="apo_zero_unpaired", desirable_weight=1.0, undesirable_weight=1.33),
    dict(mode="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.05, loss_type="simpo"),
    dict(mode="orpo", beta=0.1),
])
def test_preference_knobs_in_their_mode(spec: dict) -> None:
    assert TrainingSpec(**spec).beta == spec["beta"]


@pytest.mark.parametrize(("spec", "message"), [
    (dict(mode="sft", beta=0.1), "field 'training.beta': applies to mode dpo or kto or orpo or simpo, not 'sft'"),
    (dict(mode="kto", rpo_alpha=1.0), "field 'training.rpo_alpha': applies to mode dpo, not 'kto'"),
    (dict(mode="dpo", simpo_gamma=0.5), "field 'training.simpo_gamma': applies to mode simpo, not 'dpo'"),
    (dict(mode="dpo", beta=-0.1), "field 'training.beta': must be >= 0, got -0.1"),
    (dict(mode="dpo", label_smoothing=0.5), "field 'training.label_smoothing': must be in [0, 0.5), got 0.5"),
    (dict(mode="dpo", loss_type="kto"), "field 'training.loss_type': 'kto' is not a loss of mode 'dpo'"),
    (dict(mode="orpo", loss_type="sigmoid"), "(it takes none)"),
    (dict(mode="ppo"), "field 'training.mode': 'ppo' is not one of"),
])
def test_bad_preference_knobs_are_refused(spec: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        TrainingSpec(**spec)
    assert message in str(err.value)
