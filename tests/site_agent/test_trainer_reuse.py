"""The site trainer keeps its TRL trainer across rounds, and a kept trainer trains each round bit for bit as a
trainer built for that round does: same seeding, a fresh optimizer and scheduler, the round's own arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.config import LoraSpec
from coordinator.rounds.adapter import init_adapter
from protos.fedbridge.v1 import federation_service_pb2 as pb
from sandbox.synthetic import make_site_datasets
from site_agent.training.data import load_sft
from site_agent.training.trainer import SftSiteTrainer


def _task(init, round: int, lr: float = 1e-2) -> pb.Task:  # type: ignore[no-untyped-def]
    # Dropout and a decaying schedule make the seeding and the scheduler matter; AdamW's moments make a carried
    # optimizer show in the second round's delta.
    return pb.Task(round=round, training=pb.TrainingConfig(mode="sft", max_steps=3, learning_rate=lr,
                                                           per_device_batch_size=4, max_length=64, seed=0,
                                                           lr_scheduler_type="linear"),
                   adapter_spec=init.spec)


def _two_rounds(trainer: SftSiteTrainer, init) -> list:  # type: ignore[no-untyped-def]
    state = init.state
    results = []
    for rnd in (1, 2):
        result = trainer.train_round(_task(init, rnd), state)
        results.append((result, trainer._trainer))
        state = {k: v + result.delta[k].to(v.dtype) for k, v in state.items()}  # the next global (one site)
    return results


def test_a_kept_trainer_trains_as_a_rebuilt_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    site = make_site_datasets(tmp_path / "data", n_sites=1, n_train=16, n_heldout=4)[0]
    rows = load_sft(site.train_path)
    init = init_adapter(tiny_model_dir, LoraSpec(rank=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "v_proj")))
    kept = SftSiteTrainer(tiny_model_dir, rows, tmp_path / "kept")
    rebuilt = SftSiteTrainer(tiny_model_dir, rows, tmp_path / "rebuilt", reuse_trainer=False)
    # Execute
    ours, ref = _two_rounds(kept, init), _two_rounds(rebuilt, init)
    # Assert: one trainer object for both rounds, and the same bits as a trainer built per round
    assert ours[0][1] is not None and ours[1][1] is ours[0][1]
    assert ref[0][1] is None and ref[1][1] is None
    for (mine, _), (theirs, _) in zip(ours, ref, strict=True):
        assert mine.delta.keys() == theirs.delta.keys()
        for k in mine.delta:
            assert torch.equal(mine.delta[k], theirs.delta[k]), k
        assert mine.train_loss == theirs.train_loss and mine.steps == theirs.steps == 3
        assert mine.tokens == theirs.tokens
    assert kept._trainer.optimizer is None  # the round's optimizer state does not outlive the round


def test_a_new_training_config_builds_a_new_trainer(tiny_model_dir: Path, tmp_path: Path) -> None:
    site = make_site_datasets(tmp_path / "data", n_sites=1, n_train=8, n_heldout=4)[0]
    init = init_adapter(tiny_model_dir, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj",)))
    trainer = SftSiteTrainer(tiny_model_dir, load_sft(site.train_path), tmp_path / "work")
    trainer.train_round(_task(init, 1), init.state)
    first = trainer._trainer
    trainer.train_round(_task(init, 2, lr=2e-2), init.state)
    assert trainer._trainer is not first and trainer._trainer.args.learning_rate == pytest.approx(2e-2)
