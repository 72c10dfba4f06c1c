"""The task loop scores each round's incoming global adapter on the held-out split beside the upload (a worker
thread), not after it, and never while a next round trains."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from site_fakes import NoHeartbeats

from coordinator.config import LoraSpec
from coordinator.rounds.adapter import init_adapter
from fedcommon import tensors
from fedcommon.manifest import Manifest
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb
from sandbox.synthetic import make_site_datasets
from site_agent import agent
from site_agent.client import LateUpdateRefused
from site_agent.config import SiteConfig, SiteData, SiteTls
from site_agent.training.trainer import SftSiteTrainer


def _site(tmp_path: Path, base: Path) -> SiteConfig:
    site = make_site_datasets(tmp_path / "data", n_sites=1, n_train=16, n_heldout=4)[0]
    (tmp_path / "sign.pem").write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "ca.pem").write_text("unused: the policy trusts any CA\n")
    (tmp_path / "policy.toml").write_text("")
    tls = SiteTls(ca=tmp_path / "ca.pem", cert=tmp_path / "c.pem", key=tmp_path / "k.pem",
                  signing_key=tmp_path / "sign.pem")
    return SiteConfig(name="s1", coordinator="localhost:1", base_model=base, tls=tls,
                      data=SiteData(train=site.train_path, heldout=site.heldout_path), work_dir=tmp_path / "work",
                      policy=tmp_path / "policy.toml")


def _tasks(base: Path, rounds: int) -> tuple[list[pb.Task], bytes]:
    """``rounds`` training tasks of one federation, then its DONE (round ``rounds + 1``), all from one global."""
    init = init_adapter(base, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    blob = tensors.encode_state(init.state)
    return [pb.Task(federation_id="f", round=r, total_rounds=rounds, base_model_sha256=Manifest.of_dir(base).sha256,
                    adapter_spec=init.spec, global_adapter_sha256=codec.sha256_hex(blob),
                    global_adapter_size=len(blob),
                    training=pb.TrainingConfig(mode="sft", max_steps=2, learning_rate=1e-2, per_device_batch_size=4,
                                               max_length=64, seed=0))
            for r in range(1, rounds + 2)], blob


def _client(tasks: list[pb.Task], blob: bytes, events: list[tuple[Any, ...]], upload: Any) -> type:
    class Client:
        def __init__(self, cfg: SiteConfig, **_options: object) -> None:
            self.polls = 0

        def join(self, agent_version: str, lora_rank: int = 0) -> pb.JoinResponse:
            return pb.JoinResponse(federation_id="f", site="s1")

        def fetch_task(self, wait_ms: int) -> pb.FetchTaskResponse:
            task = tasks[min(self.polls, len(tasks) - 1)]
            self.polls += 1
            done = task.round > task.total_rounds
            return pb.FetchTaskResponse(status=pb.TASK_STATUS_DONE if done else pb.TASK_STATUS_TRAIN, task=task)

        def download_adapter(self, round: int, sha256: str, size: int, artifact: int = 0) -> bytes:
            return blob

        def upload(self, signed: pb.SignedEnvelope, env: pb.UpdateEnvelope, payload: bytes,
                   on_progress: Callable[[int], None] | None = None) -> None:
            assert on_progress is not None
            upload(env, payload, on_progress)

        def report_metrics(self, round: int, phase: str, metrics: dict[str, float], num_examples: int) -> None:
            events.append(("metrics", round, phase, sorted(metrics)))

        def heartbeats(self, round: int, total_steps: int, phase: str = "train") -> NoHeartbeats:
            return NoHeartbeats()

        def report_error(self, round: int, phase: str, exc: BaseException) -> bool:
            return False

        def close(self) -> None:
            pass

    return Client


def _stream(payload: bytes, on_progress: Callable[[int], None], seen: Callable[[], bool]) -> list[bool]:
    """Report the payload handed over in 4 KiB chunks, 10 ms apart, as the client's stream does; ``seen()`` before
    each."""
    out = []
    for end in range(1 << 12, len(payload) + (1 << 12), 1 << 12):
        time.sleep(0.01)
        out.append(seen())
        on_progress(min(end, len(payload)))
    return out


def test_the_heldout_score_runs_while_the_update_uploads(tiny_model_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: an upload that streams its chunks, then waits (up to 20 s) for the held-out evaluation to start
    tasks, blob = _tasks(tiny_model_dir, rounds=1)
    events: list[tuple[Any, ...]] = []
    scoring = threading.Event()
    evaluate = SftSiteTrainer.evaluate

    def watched(self: SftSiteTrainer, *a: Any, **kw: Any) -> tuple[float, int]:
        events.append(("evaluate", threading.current_thread() is threading.main_thread()))
        scoring.set()
        return evaluate(self, *a, **kw)

    def upload(env: pb.UpdateEnvelope, payload: bytes, on_progress: Callable[[int], None]) -> None:
        before = _stream(payload, on_progress, scoring.is_set)
        events.append(("upload", env.round, any(before), scoring.wait(timeout=20)))

    monkeypatch.setattr(SftSiteTrainer, "evaluate", watched)
    monkeypatch.setattr(agent, "CoordinatorClient", _client(tasks, blob, events, upload))

    # Execute
    assert agent.run_site(_site(tmp_path, tiny_model_dir), show_progress=False) == 1

    # Assert: scored in the worker thread once the last byte was handed over, before the upload returned; reported
    # after the round's train metrics (as before); the DONE round's final score is computed in the loop itself
    assert events == [("evaluate", False), ("upload", 1, False, True), ("metrics", 1, "train", [
        "loss", "round_time_s", "steps", "tokens", "tokens_per_s", "train_time_s", "upload_bytes"]),
        ("metrics", 1, "eval_global", ["loss", "tokens"]), ("evaluate", True), ("metrics", 2, "eval_global",
                                                                               ["loss", "tokens"])]


def test_a_next_round_never_trains_while_the_last_one_is_scored(tiny_model_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: round 1's upload is refused as late once streamed (the loop goes straight on to round 2) while its
    # scoring, slow, still runs
    tasks, blob = _tasks(tiny_model_dir, rounds=2)
    events: list[tuple[Any, ...]] = []
    scoring = threading.Event()
    evaluate, train_round = SftSiteTrainer.evaluate, SftSiteTrainer.train_round

    def slow(self: SftSiteTrainer, *a: Any, **kw: Any) -> tuple[float, int]:
        scoring.set()
        time.sleep(1.0)
        try:
            return evaluate(self, *a, **kw)
        finally:
            scoring.clear()

    def watched(self: SftSiteTrainer, task: pb.Task, *a: Any, **kw: Any) -> Any:
        events.append(("train", task.round, "while scoring" if scoring.is_set() else "alone"))
        return train_round(self, task, *a, **kw)

    def upload(env: pb.UpdateEnvelope, payload: bytes, on_progress: Callable[[int], None]) -> None:
        _stream(payload, on_progress, scoring.is_set)
        events.append(("upload", env.round))
        if env.round == 1:
            raise LateUpdateRefused("round 1 is closed: late")

    monkeypatch.setattr(SftSiteTrainer, "evaluate", slow)
    monkeypatch.setattr(SftSiteTrainer, "train_round", watched)
    monkeypatch.setattr(agent, "CoordinatorClient", _client(tasks, blob, events, upload))

    # Execute
    assert agent.run_site(_site(tmp_path, tiny_model_dir), show_progress=False) == 1

    # Assert: round 2 trained only once round 1's scoring was over; a refused round reports no score (as before)
    assert [e for e in events if e[0] != "metrics" or e[2] == "eval_global"] == [
        ("train", 1, "alone"), ("upload", 1), ("train", 2, "alone"), ("upload", 2),
        ("metrics", 2, "eval_global", ["loss", "tokens"]), ("metrics", 3, "eval_global", ["loss", "tokens"])]
