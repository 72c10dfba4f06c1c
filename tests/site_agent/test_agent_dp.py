"""The task loop applies the DP egress filters to what it sends, in any training mode, accounts ε before the upload,
and refuses to train once the next round would exceed the site's budget."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_agent_modes import _fake_client, _kit, _rows_for, _task, federation  # noqa: F401 - fixture

from fedcommon import tensors
from fedcommon.dp import rdp_epsilon
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent import agent
from site_agent.config import SiteConfig
from site_agent.egress.dp import DpSettings, PrivacyLedger
from site_agent.policy import PolicyRefusal


class _Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def record(self, event: str, fields: dict) -> None:
        self.events.append((event, fields))


def _capturing_client(task: pb.Task, blob: bytes, sent: list[tuple[pb.UpdateEnvelope, bytes]]):  # type: ignore[no-untyped-def]
    base = _fake_client(task, blob, [])

    class Client(base):  # type: ignore[misc, valid-type]
        def upload(self, signed: pb.SignedEnvelope, env: pb.UpdateEnvelope, payload: bytes,
                   on_progress: Callable[[int], None] | None = None) -> None:
            sent.append((pb.UpdateEnvelope.FromString(signed.envelope), payload))

    return Client


@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_what_is_sent_is_clipped_and_noised_in_every_mode(tiny_model_dir: Path, federation, tmp_path: Path,  # type: ignore[no-untyped-def]  # noqa: F811
                                                          mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the federation asks sigma 5 with clip 0.1, so every sent element has noise of std 0.5 while the
    # clipped delta itself has norm <= 0.1 over thousands of elements.
    init, blob, base_sha = federation
    marker = f"CANARY-dp-{mode}-91c2"
    policy = f'allowed_modes = ["{mode}"]\nmax_steps = 2\nmin_dp_noise_multiplier = 1.0\ndp_epsilon_budget = 10.0\n'
    cfg = SiteConfig(**{**_kit(tmp_path, _rows_for(mode, marker), policy=policy).__dict__, "base_model": tiny_model_dir})
    task = _task(init, base_sha, blob, mode)
    if mode == "sft":
        task.training.beta = 0.0
    task.dp.CopyFrom(pb.DpRequest(noise_multiplier=5.0, clip_norm=0.1))
    sent: list[tuple[pb.UpdateEnvelope, bytes]] = []
    monkeypatch.setattr(agent, "CoordinatorClient", _capturing_client(task, blob, sent))
    sink = _Sink()

    # Execute
    assert agent.run_site(cfg, show_progress=False, audit=sink) == 1

    # Assert: the sent delta is noise of std sigma * C around a tiny clipped update
    [(env, payload)] = sent
    flat = torch.cat([v.flatten().double() for v in tensors.decode_state(payload).values()])
    assert flat.numel() > 2000
    assert flat.std().item() == pytest.approx(0.5, rel=0.06)
    assert abs(flat.mean().item()) < 0.05
    # The envelope carries the cumulative epsilon of the ledger, written before the upload, at the policy's delta.
    ledger = PrivacyLedger(tmp_path / "work" / "privacy_ledger.json")
    assert [(e.round, e.noise_multiplier, e.payload_sha256) for e in ledger.entries] == [(1, 5.0, env.payload_sha256)]
    assert env.epsilon_spent == pytest.approx(rdp_epsilon([(5.0, 1.0, 1)], 1e-5)) and env.dp_delta == 1e-5
    assert ("update_uploaded", {"site": "s1", "round": 1, "bytes": len(payload), "payload_sha256": env.payload_sha256,
                                "epsilon": env.epsilon_spent, "dp_noise_multiplier": 5.0}) in sink.events
    assert marker.encode() not in payload


def test_task_below_the_policy_noise_floor_is_refused(tiny_model_dir: Path, federation, tmp_path: Path,  # type: ignore[no-untyped-def]  # noqa: F811
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    init, blob, base_sha = federation
    cfg = SiteConfig(**{**_kit(tmp_path, _rows_for("sft", "x"), policy="min_dp_noise_multiplier = 1.0\n").__dict__,
                        "base_model": tiny_model_dir})
    task = _task(init, base_sha, blob, "sft")
    task.training.beta = 0.0
    task.dp.CopyFrom(pb.DpRequest(noise_multiplier=0.5, clip_norm=1.0))
    monkeypatch.setattr(agent, "CoordinatorClient", _capturing_client(task, blob, []))
    monkeypatch.setattr(agent, "make_trainer", lambda *a, **kw: pytest.fail("a refused task must not train"))
    with pytest.raises(PolicyRefusal, match="rule 'min_dp_noise_multiplier'.*noise multiplier 0.5"):
        agent.run_site(cfg, show_progress=False)


def test_exhausted_budget_refuses_before_training_and_is_audited(tiny_model_dir: Path, federation, tmp_path: Path,  # type: ignore[no-untyped-def]  # noqa: F811
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the site's ledger already holds one sigma-2 release; its budget fits one round, not two.
    init, blob, base_sha = federation
    one, two = rdp_epsilon([(2.0, 1.0, 1)], 1e-5), rdp_epsilon([(2.0, 1.0, 2)], 1e-5)
    policy = f"dp_epsilon_budget = {(one + two) / 2}\ndp_delta = 1e-5\n"
    cfg = SiteConfig(**{**_kit(tmp_path, _rows_for("sft", "x"), policy=policy).__dict__, "base_model": tiny_model_dir})
    PrivacyLedger(tmp_path / "work" / "privacy_ledger.json").record("f", 1, DpSettings(2.0, 1.0), "0" * 64)
    task = _task(init, base_sha, blob, "sft")
    task.round, task.training.beta = 2, 0.0
    task.dp.CopyFrom(pb.DpRequest(noise_multiplier=2.0, clip_norm=1.0))
    sent: list[tuple[pb.UpdateEnvelope, bytes]] = []
    monkeypatch.setattr(agent, "CoordinatorClient", _capturing_client(task, blob, sent))
    monkeypatch.setattr(agent, "make_trainer", lambda *a, **kw: pytest.fail("a refused task must not train"))
    sink = _Sink()

    # Execute
    with pytest.raises(PolicyRefusal, match="rule 'dp_epsilon_budget'.*over 1 noised update"):
        agent.run_site(cfg, show_progress=False, audit=sink)

    # Assert
    assert sink.events == [("task_refused", {"site": "s1", "round": 2, "rule": "dp_epsilon_budget", "mode": "sft"})]
    assert sent == []
