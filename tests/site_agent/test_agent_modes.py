"""The task loop routes a task's mode to its trainer and uploads only a delta of the spec (KTO here, end to end)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from site_fakes import NoHeartbeats as _NoHeartbeats

from coordinator.config import LoraSpec
from coordinator.rounds.adapter import init_adapter
from fedcommon import tensors
from fedcommon.manifest import Manifest
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent import agent
from site_agent.config import SiteConfig, SiteData, SiteTls
from site_agent.policy import PolicyRefusal

CANARY = "CANARY-agent-kto-row"


def _kit(tmp_path: Path, train_rows: list[dict], policy: str = "") -> SiteConfig:
    (tmp_path / "sign.pem").write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "ca.pem").write_text("unused: the policy trusts any CA\n")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (tmp_path / "policy.toml").write_text(policy)
    tls = SiteTls(ca=tmp_path / "ca.pem", cert=tmp_path / "c.pem", key=tmp_path / "k.pem",
                  signing_key=tmp_path / "sign.pem")
    return SiteConfig(name="s1", coordinator="localhost:1", base_model=Path(), tls=tls,
                      data=SiteData(train=tmp_path / "train.jsonl"), work_dir=tmp_path / "work",
                      policy=tmp_path / "policy.toml")


def _fake_client(task: pb.Task, global_bytes: bytes, uploads: list[bytes]):  # type: ignore[no-untyped-def]
    class Client:
        def __init__(self, cfg: SiteConfig, **_options: object) -> None:  # chunk_size etc.
            self.polls = 0

        def join(self, agent_version: str, lora_rank: int = 0) -> pb.JoinResponse:
            return pb.JoinResponse(federation_id="f", site="s1")

        def fetch_task(self, wait_ms: int) -> pb.FetchTaskResponse:
            self.polls += 1
            status = pb.TASK_STATUS_TRAIN if self.polls == 1 else pb.TASK_STATUS_DONE
            return pb.FetchTaskResponse(status=status, task=task)

        def download_adapter(self, round: int, sha256: str, size: int, artifact: int = 0) -> bytes:
            return global_bytes

        def upload(self, signed: pb.SignedEnvelope, env: pb.UpdateEnvelope, payload: bytes,
                   on_progress: Callable[[int], None] | None = None) -> None:
            uploads.append(payload)

        def report_metrics(self, *a, **kw) -> None:  # type: ignore[no-untyped-def]
            pass

        def heartbeats(self, round: int, total_steps: int, phase: str = "train"):  # type: ignore[no-untyped-def]
            return _NoHeartbeats()

        def report_error(self, round: int, phase: str, exc: BaseException) -> bool:
            return False

        def close(self) -> None:
            pass

    return Client


@pytest.fixture(scope="module")
def federation(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    init = init_adapter(tiny_model_dir, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    blob = tensors.encode_state(init.state)
    return init, blob, Manifest.of_dir(tiny_model_dir).sha256


def _task(init, base_sha: str, blob: bytes, mode: str) -> pb.Task:  # type: ignore[no-untyped-def]
    return pb.Task(federation_id="f", round=1, total_rounds=1, base_model_sha256=base_sha, adapter_spec=init.spec,
                   global_adapter_sha256=codec.sha256_hex(blob), global_adapter_size=len(blob),
                   training=pb.TrainingConfig(mode=mode, max_steps=2, learning_rate=1e-2, per_device_batch_size=4,
                                              max_length=64, seed=0, beta=0.2))


def test_kto_task_trains_and_uploads_only_the_delta(tiny_model_dir: Path, federation, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    init, blob, base_sha = federation
    rows = [{"prompt": f"{CANARY} {i} plus three?", "completion": str(i + 3), "label": bool(i % 2)} for i in range(8)]
    cfg = _kit(tmp_path, rows, policy='allowed_modes = ["kto"]\nmax_steps = 2\n')
    cfg = SiteConfig(**{**cfg.__dict__, "base_model": tiny_model_dir})
    uploads: list[bytes] = []
    monkeypatch.setattr(agent, "CoordinatorClient", _fake_client(_task(init, base_sha, blob, "kto"), blob, uploads))

    # Execute
    trained = agent.run_site(cfg, show_progress=False)

    # Assert
    assert trained == 1 and len(uploads) == 1
    delta = tensors.decode_state(uploads[0])
    tensors.check_against_spec(delta, init.spec)
    assert CANARY.encode() not in uploads[0]


def test_data_that_does_not_suit_the_mode_is_refused(tiny_model_dir: Path, federation, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: chat SFT data, a DPO task
    init, blob, base_sha = federation
    rows = [{"messages": [{"role": "user", "content": CANARY}, {"role": "assistant", "content": "ok"}]}]
    cfg = SiteConfig(**{**_kit(tmp_path, rows).__dict__, "base_model": tiny_model_dir})
    uploads: list[bytes] = []
    monkeypatch.setattr(agent, "CoordinatorClient", _fake_client(_task(init, base_sha, blob, "dpo"), blob, uploads))

    # Execute
    with pytest.raises(agent.SiteRefusal) as err:
        agent.run_site(cfg, show_progress=False)

    # Assert
    assert "does not suit mode 'dpo'" in str(err.value) and "train.jsonl:1" in str(err.value)
    assert CANARY not in str(err.value) and uploads == []


def test_mode_outside_policy_is_refused(tiny_model_dir: Path, federation, tmp_path: Path,  # type: ignore[no-untyped-def]
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    init, blob, base_sha = federation
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}]
    cfg = SiteConfig(**{**_kit(tmp_path, rows, 'allowed_modes = ["sft"]\n').__dict__, "base_model": tiny_model_dir})
    monkeypatch.setattr(agent, "CoordinatorClient", _fake_client(_task(init, base_sha, blob, "orpo"), blob, []))
    with pytest.raises(PolicyRefusal, match="rule 'allowed_modes'"):
        agent.run_site(cfg, show_progress=False)


def _recording_client(task: pb.Task, global_bytes: bytes, sent: list[bytes]):  # type: ignore[no-untyped-def]
    """A fake coordinator client that keeps every byte the agent hands it to send."""
    base = _fake_client(task, global_bytes, [])

    class Client(base):  # type: ignore[misc, valid-type]
        def join(self, agent_version: str, lora_rank: int = 0) -> pb.JoinResponse:
            sent.append(pb.JoinRequest(agent_version=agent_version, lora_rank=lora_rank).SerializeToString())
            return super().join(agent_version, lora_rank)

        def upload(self, signed: pb.SignedEnvelope, env: pb.UpdateEnvelope, payload: bytes,
                   on_progress: Callable[[int], None] | None = None) -> None:
            sent.extend([signed.SerializeToString(), payload])

        def report_metrics(self, round: int, phase: str, metrics: dict[str, float], num_examples: int) -> None:
            sent.append(pb.ReportMetricsRequest(round=round, phase=phase, metrics=metrics,
                                                num_examples=num_examples).SerializeToString())

    return Client


def _rows_for(mode: str, marker: str) -> list[dict]:
    if mode in ("sft", "qlora"):
        return [{"messages": [{"role": "user", "content": f"{marker} what is {i} plus three?"},
                              {"role": "assistant", "content": f"{i + 3} {marker}"}]} for i in range(8)]
    if mode == "kto":
        return [{"prompt": f"{marker} {i} plus three?", "completion": f"{i + 3} {marker}", "label": bool(i % 2)}
                for i in range(8)]
    return [{"prompt": f"{marker} {i} plus three?", "chosen": f"{i + 3} {marker}", "rejected": f"{i} {marker}"}
            for i in range(8)]


@pytest.mark.parametrize("mode", ["sft", "qlora", "dpo", "kto", "orpo", "simpo"])
def test_canary_holds_in_every_mode(tiny_model_dir: Path, federation, tmp_path: Path, mode: str,  # type: ignore[no-untyped-def]
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the mode, nothing the agent sends carries a byte of a training sample."""
    init, blob, base_sha = federation
    marker = f"CANARY-{mode}-5e1f0c"
    cfg = _kit(tmp_path, _rows_for(mode, marker), policy=f'allowed_modes = ["{mode}"]\nmax_steps = 2\n')
    cfg = SiteConfig(**{**cfg.__dict__, "base_model": tiny_model_dir})
    task = _task(init, base_sha, blob, mode)
    if mode in ("sft", "qlora"):
        task.training.beta = 0.0
    sent: list[bytes] = []
    monkeypatch.setattr(agent, "CoordinatorClient", _recording_client(task, blob, sent))
    assert agent.run_site(cfg, show_progress=False) == 1
    assert any(len(b) > 1000 for b in sent)  # the delta itself was handed over
    blob_sent = b"".join(sent)
    for form in (marker.encode(), marker.encode("utf-16-le"), marker[:12].encode()):
        assert form not in blob_sent


def test_a_site_with_no_heldout_still_sends_its_final_report() -> None:
    """An empty eval_global report tells a coordinator waiting to exit that this site got its DONE."""
    from site_agent.agent import _report_eval
    from site_agent.egress.guard import EgressGuard

    sent: list[tuple[int, str, dict[str, float], int]] = []

    class Client:
        def report_metrics(self, round: int, phase: str, metrics: dict[str, float], num_examples: int) -> None:
            sent.append((round, phase, metrics, num_examples))

    class Task:
        round = 4

    _report_eval(Client(), None, Task(), {}, [], EgressGuard(), None, "s1")  # type: ignore[arg-type]

    assert sent == [(4, "eval_global", {}, 0)]


def test_a_site_told_done_exits_at_once_on_its_next_start(tiny_model_dir: Path, federation, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A site killed after DONE (the coordinator may have drained and exited) must not restart into a Join that can
    never succeed: the DONE is recorded in work_dir before the final report, and a later start returns 0 at once."""
    # Prepare: one federation round, then DONE
    init, blob, base_sha = federation
    rows = [{"prompt": f"{i} plus three?", "completion": str(i + 3), "label": bool(i % 2)} for i in range(8)]
    cfg = _kit(tmp_path, rows, policy='allowed_modes = ["kto"]\nmax_steps = 2\n')
    cfg = SiteConfig(**{**cfg.__dict__, "base_model": tiny_model_dir})
    monkeypatch.setattr(agent, "CoordinatorClient", _fake_client(_task(init, base_sha, blob, "kto"), blob, []))
    assert agent.run_site(cfg, show_progress=False) == 1
    assert json.loads((cfg.work_dir / agent.DONE_MARKER).read_text())["federation_id"] == "f"

    def no_coordinator(*_a: object, **_k: object) -> None:
        raise AssertionError("a site whose federation is done contacted the coordinator")

    # Execute: the next start
    monkeypatch.setattr(agent, "CoordinatorClient", no_coordinator)

    # Assert
    assert agent.run_site(cfg, show_progress=False) == 0
