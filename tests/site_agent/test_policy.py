"""Site policy: each rule refuses on its own, names itself, is audited, and nothing trains on a refused task."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from site_fakes import NoHeartbeats

from fedcommon.certs import ca_sha256
from fedcommon.tomlconfig import ConfigError
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent import agent
from site_agent.config import SiteConfig, SiteData, SiteTls
from site_agent.policy import PolicyRefusal, SitePolicy, check_coordinator, check_task, check_upload_size, load_policy

BASE = "a" * 64
OTHER = "b" * 64


def _task(mode: str = "dpo", steps: int = 10, batch: int = 4, accum: int = 1) -> pb.Task:
    # One 8x16 F32 tensor and one 16x8: 2 * 128 * 4 = 1024 tensor bytes.
    spec = pb.AdapterSpec(rank=8, tensors=[pb.TensorSpec(name="a", shape=[8, 16], dtype="F32"),
                                           pb.TensorSpec(name="b", shape=[16, 8], dtype="F32")])
    return pb.Task(round=3, base_model_sha256=BASE, adapter_spec=spec, training=pb.TrainingConfig(
        mode=mode, max_steps=steps, per_device_batch_size=batch, gradient_accumulation_steps=accum))


def _ca_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_permissive_defaults_accept_a_task() -> None:
    check_task(SitePolicy(), _task(steps=10_000), train_rows=1)  # no policy file: nothing is refused
    check_task(load_policy(None), _task(), train_rows=1)


@pytest.mark.parametrize(("policy", "task", "rows", "rule"), [
    (SitePolicy(allowed_base_models=(OTHER,)), _task(), 100, "allowed_base_models"),
    (SitePolicy(allowed_modes=("sft",)), _task(mode="dpo"), 100, "allowed_modes"),
    (SitePolicy(max_steps=9), _task(steps=10), 100, "max_steps"),
    # 10 steps x 4 x 2 = 80 examples over 20 rows = 4 epochs > 3
    (SitePolicy(max_epochs=3.0), _task(steps=10, batch=4, accum=2), 20, "max_epochs"),
    (SitePolicy(min_dp_noise_multiplier=0.5), _task(), 100, "min_dp_noise_multiplier"),
    (SitePolicy(max_upload_bytes=1023), _task(), 100, "max_upload_bytes"),
])
def test_each_rule_refuses_alone_and_names_itself(policy: SitePolicy, task: pb.Task, rows: int, rule: str) -> None:
    # Execute
    with pytest.raises(PolicyRefusal) as err:
        check_task(policy, task, train_rows=rows)

    # Assert
    assert err.value.rule == rule and f"rule '{rule}'" in str(err.value)


@pytest.mark.parametrize(("policy", "task", "rows"), [
    (SitePolicy(allowed_base_models=(OTHER, BASE)), _task(), 100),
    (SitePolicy(allowed_modes=("dpo",)), _task(mode="dpo"), 100),
    (SitePolicy(max_steps=10), _task(steps=10), 100),
    (SitePolicy(max_epochs=4.0), _task(steps=10, batch=4, accum=2), 20),  # exactly at the limit
    (SitePolicy(max_upload_bytes=1024), _task(), 100),
])
def test_each_rule_allows_its_boundary(policy: SitePolicy, task: pb.Task, rows: int) -> None:
    check_task(policy, task, train_rows=rows)


def test_the_encoded_upload_is_checked_too() -> None:
    check_upload_size(SitePolicy(max_upload_bytes=2000), 2000)
    with pytest.raises(PolicyRefusal, match="'max_upload_bytes'"):
        check_upload_size(SitePolicy(max_upload_bytes=2000), 2001)


def test_trusted_coordinator_host_and_ca() -> None:
    # Prepare
    pem, other = _ca_pem(), _ca_pem()

    # Execute / Assert
    check_coordinator(SitePolicy(trusted_coordinator_hosts=("fl.example.org",), trusted_ca_sha256=(ca_sha256(pem),)),
                      "fl.example.org:7443", pem)
    with pytest.raises(PolicyRefusal) as host:
        check_coordinator(SitePolicy(trusted_coordinator_hosts=("fl.example.org",)), "evil.example.org:7443", pem)
    with pytest.raises(PolicyRefusal) as ca:
        check_coordinator(SitePolicy(trusted_ca_sha256=(ca_sha256(pem),)), "fl.example.org:7443", other)
    assert host.value.rule == "trusted_coordinator_hosts" and ca.value.rule == "trusted_ca_sha256"


def test_policy_toml_is_checked(tmp_path: Path) -> None:
    # Prepare
    good = tmp_path / "policy.toml"
    good.write_text(f'allowed_base_models = ["{BASE}"]\nallowed_modes = ["sft", "kto"]\nmax_steps = 50\n'
                    'max_upload_bytes = 10_000\n')
    bad_mode = tmp_path / "bad_mode.toml"
    bad_mode.write_text('allowed_modes = ["ppo"]\n')
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("max_step = 5\n")
    bad_hash = tmp_path / "bad_hash.toml"
    bad_hash.write_text('allowed_base_models = ["abc"]\n')

    # Execute / Assert
    policy = load_policy(good)
    assert policy.allowed_modes == ("sft", "kto") and policy.max_steps == 50 and policy.max_upload_bytes == 10_000
    with pytest.raises(ConfigError, match="field 'allowed_modes': 'ppo'"):
        load_policy(bad_mode)
    with pytest.raises(ConfigError, match="field 'max_step': unknown field"):
        load_policy(unknown)
    with pytest.raises(ConfigError, match=r"field 'allowed_base_models\[0\]'"):
        load_policy(bad_hash)


class _FakeClient:
    """Hands out one TRAIN task; records whether anything was downloaded or uploaded."""

    calls: list[str] = []

    def __init__(self, cfg: SiteConfig, **_options: object) -> None:  # chunk_size etc.
        _FakeClient.calls = []

    def join(self, agent_version: str, lora_rank: int = 0) -> pb.JoinResponse:
        return pb.JoinResponse(federation_id="f", site="s1")

    def fetch_task(self, wait_ms: int) -> pb.FetchTaskResponse:
        return pb.FetchTaskResponse(status=pb.TASK_STATUS_TRAIN, task=_task(mode="dpo", steps=10))

    def heartbeats(self, round: int, total_steps: int, phase: str = "train") -> NoHeartbeats:
        return NoHeartbeats()

    def report_error(self, round: int, phase: str, exc: BaseException) -> bool:
        return False

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        def record(*a, **kw):  # type: ignore[no-untyped-def]
            _FakeClient.calls.append(name)

        return record


class _Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def record(self, event: str, fields: dict) -> None:
        self.events.append((event, fields))


def _site(tmp_path: Path, policy: str, coordinator: str = "fl.example.org:7443") -> SiteConfig:
    (tmp_path / "ca.pem").write_bytes(_ca_pem())
    (tmp_path / "sign.pem").write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "train.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    (tmp_path / "policy.toml").write_text(policy)
    tls = SiteTls(ca=tmp_path / "ca.pem", cert=tmp_path / "c.pem", key=tmp_path / "k.pem",
                  signing_key=tmp_path / "sign.pem")
    return SiteConfig(name="s1", coordinator=coordinator, base_model=tmp_path / "model", tls=tls,
                      data=SiteData(train=tmp_path / "train.jsonl"), work_dir=tmp_path / "work",
                      policy=tmp_path / "policy.toml")


def test_refused_task_is_audited_and_nothing_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(agent, "CoordinatorClient", _FakeClient)
    monkeypatch.setattr(agent, "make_trainer", lambda *a, **kw: pytest.fail("a refused task must not train"))
    sink = _Sink()
    cfg = _site(tmp_path, "max_steps = 5\n")

    # Execute
    with pytest.raises(PolicyRefusal, match="rule 'max_steps'"):
        agent.run_site(cfg, show_progress=False, audit=sink)

    # Assert
    assert sink.events == [("task_refused", {"site": "s1", "round": 3, "rule": "max_steps", "mode": "dpo"})]
    assert not {"download_adapter", "upload", "report_metrics"} & set(_FakeClient.calls)
    assert not (tmp_path / "work").exists()


def test_untrusted_coordinator_is_never_dialled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(agent, "CoordinatorClient", lambda cfg: pytest.fail("must not connect"))
    sink = _Sink()
    cfg = _site(tmp_path, 'trusted_coordinator_hosts = ["fl.example.org"]\n', coordinator="evil.example.org:7443")

    # Execute
    with pytest.raises(PolicyRefusal, match="rule 'trusted_coordinator_hosts'"):
        agent.run_site(cfg, show_progress=False, audit=sink)

    # Assert
    assert sink.events == [("coordinator_refused", {"site": "s1", "rule": "trusted_coordinator_hosts"})]
