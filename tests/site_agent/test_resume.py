"""A site killed mid-round resumes that round from its last step checkpoint, not from zero, and ends where an
uninterrupted round ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.config import LoraSpec
from coordinator.rounds.adapter import init_adapter
from fedcommon import tensors
from protos.fedbridge.v1 import federation_service_pb2 as pb
from sandbox.synthetic import make_site_datasets
from site_agent.training.data import load_sft
from site_agent.training.trainer import SftSiteTrainer


class Killed(Exception):
    """Stands in for the process dying mid-round."""


def _task(init, round: int = 1) -> pb.Task:  # type: ignore[no-untyped-def]
    return pb.Task(federation_id="f", round=round, global_adapter_sha256="g" * 64, adapter_spec=init.spec,
                   training=pb.TrainingConfig(mode="sft", max_steps=4, learning_rate=1e-2, per_device_batch_size=4,
                                              max_length=64, seed=0))


def test_killed_round_resumes_from_its_last_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    site = make_site_datasets(tmp_path / "data", n_sites=1, n_train=16, n_heldout=4)[0]
    rows = load_sft(site.train_path)
    init = init_adapter(tiny_model_dir, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    reference = SftSiteTrainer(tiny_model_dir, rows, tmp_path / "ref").train_round(_task(init), init.state)

    def die_at_step_3(step: int, max_steps: int, loss: float | None) -> None:
        if step == 3:
            raise Killed

    # Execute: the first agent dies during step 3 (after the checkpoint of step 2); a fresh one takes the round up
    first = SftSiteTrainer(tiny_model_dir, rows, tmp_path / "site", checkpoint_steps=2)
    with pytest.raises(Killed):
        first.train_round(_task(init), init.state, die_at_step_3)
    steps_seen: list[int] = []
    second = SftSiteTrainer(tiny_model_dir, rows, tmp_path / "site", checkpoint_steps=2)
    result = second.train_round(_task(init), init.state, lambda s, m, loss: steps_seen.append(s))

    # Assert
    assert second.resumed_from_step == 2 and min(steps_seen) == 3 and max(steps_seen) == 4
    tensors.check_against_spec(result.delta, init.spec)
    for k, v in reference.delta.items():  # same data order, optimizer state and RNG: the same round
        assert torch.allclose(result.delta[k], v, atol=1e-5), k
    assert not any((tmp_path / "site" / "checkpoints").iterdir())  # a finished round leaves no checkpoint


def test_a_checkpoint_never_resumes_another_round(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: a killed round 1
    site = make_site_datasets(tmp_path / "data", n_sites=1, n_train=16, n_heldout=4)[0]
    rows = load_sft(site.train_path)
    init = init_adapter(tiny_model_dir, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    trainer = SftSiteTrainer(tiny_model_dir, rows, tmp_path / "site", checkpoint_steps=1)

    def die(step: int, max_steps: int, loss: float | None) -> None:
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        trainer.train_round(_task(init), init.state, die)

    # Execute
    trainer.train_round(_task(init, round=2), init.state)

    # Assert
    assert trainer.resumed_from_step == 0


def test_dpo_resumes_with_the_global_model_still_its_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    from site_agent.training.preference import PreferenceSiteTrainer

    pairs = [{"prompt": f"what is {i} plus three?", "chosen": f"{i + 3}", "rejected": f"{i + 5}"} for i in range(8)]
    init = init_adapter(tiny_model_dir, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    task = _task(init)
    task.training.mode = "dpo"
    reference = PreferenceSiteTrainer(tiny_model_dir, pairs, tmp_path / "ref", "dpo").train_round(task, init.state)

    def die(step: int, max_steps: int, loss: float | None) -> None:
        if step == 3:
            raise Killed

    # Execute
    with pytest.raises(Killed):
        PreferenceSiteTrainer(tiny_model_dir, pairs, tmp_path / "site", "dpo", checkpoint_steps=1).train_round(
            task, init.state, die)
    second = PreferenceSiteTrainer(tiny_model_dir, pairs, tmp_path / "site", "dpo", checkpoint_steps=1)
    result = second.train_round(task, init.state)

    # Assert: had the resumed run taken the checkpoint as its reference, its loss path and delta would differ
    assert second.resumed_from_step == 2
    for k, v in reference.delta.items():
        assert torch.allclose(result.delta[k], v, atol=1e-5), k
