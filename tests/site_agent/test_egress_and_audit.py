"""The egress guard lets only adapter-spec tensors and allow-listed finite metrics leave; ``fedbridge-site audit
verify`` (the real CLI) finds edited, removed, reordered and appended lines in the site's audit log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcommon import tensors
from fedcommon.auditlog import AuditLog
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent import agent
from site_agent.egress.guard import EgressGuard, EgressRefusal

ROOT = Path(__file__).resolve().parents[2]
STATE = {"m.lora_A.weight": torch.ones(2, 4), "m.lora_B.weight": torch.zeros(4, 2)}
SPEC = tensors.make_adapter_spec(STATE, 2, 4.0, 0.0, ["m"])


def _env(payload: bytes) -> pb.UpdateEnvelope:
    return codec.make_envelope(federation_id="f", round=1, site="s", base_model_sha256="a" * 64, payload=payload,
                               adapter_spec_sha256=SPEC.sha256, num_examples=1)


def test_guard_passes_an_update_of_the_agreed_spec() -> None:
    payload = tensors.encode_state(STATE)
    EgressGuard().check_update(payload, _env(payload), SPEC)


@pytest.mark.parametrize("case", ["extra_tensor", "missing_tensor", "shape", "dtype", "nan", "not_safetensors",
                                  "envelope_mismatch", "other_spec"])
def test_guard_refuses_anything_but_the_agreed_tensors(case: str) -> None:
    state = {k: v.clone() for k, v in STATE.items()}
    if case == "extra_tensor":
        state["embed_tokens.weight"] = torch.zeros(3, 2)  # e.g. a trainer that leaks a full weight
    elif case == "missing_tensor":
        del state["m.lora_B.weight"]
    elif case == "shape":
        state["m.lora_A.weight"] = torch.ones(3, 4)
    elif case == "dtype":
        state["m.lora_A.weight"] = state["m.lora_A.weight"].double()
    elif case == "nan":
        state["m.lora_B.weight"][0, 0] = float("nan")
    payload = b"raw training text" if case == "not_safetensors" else tensors.encode_state(state)
    env = _env(payload)
    if case == "envelope_mismatch":
        payload = payload + b" "
    elif case == "other_spec":
        env.adapter_spec_sha256 = "0" * 64
    with pytest.raises(EgressRefusal) as e:
        EgressGuard().check_update(payload, env, SPEC)
    assert e.value.rule == "adapter_spec"


def test_guard_allows_listed_finite_metrics_and_refuses_others() -> None:
    guard = EgressGuard()
    guard.check_metrics({"loss": 1.2, "accuracy": 0.5, "tokens": 300.0})
    for bad in ({"patient_name_length": 5.0}, {"loss": float("nan")}, {"loss": float("inf")},
                {f"loss{i}": 1.0 for i in range(40)}):
        with pytest.raises(EgressRefusal) as e:
            guard.check_metrics(bad)
        assert e.value.rule == "metrics_allow_list"


class _Client:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def report_metrics(self, *args: object) -> None:
        self.sent.append(args)


def test_agent_sends_no_metric_off_the_allow_list_and_audits_the_refusal(tmp_path: Path) -> None:
    # Prepare
    client, log = _Client(), AuditLog(tmp_path / "audit.jsonl")

    # Execute
    with pytest.raises(agent.SiteRefusal, match="not on the allow-list"):
        agent._send_metrics(client, EgressGuard(), log, "s", 1, "train", {"loss": 1.0, "secret_count": 3.0}, 4)
    agent._send_metrics(client, EgressGuard(), log, "s", 1, "train", {"loss": 1.0}, 4)

    # Assert: only the allowed report went out, and both decisions are in the chained log
    assert client.sent == [(1, "train", {"loss": 1.0}, 4)]
    events = [json.loads(line)["event"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert events == ["egress_refused", "metrics_sent"]


# -- fedbridge-site audit verify --------------------------------------------------------------------------------------
def _site_log(path: Path) -> None:
    log = AuditLog(path)
    log.record("task_accepted", {"site": "s", "round": 1, "mode": "sft", "max_steps": 4, "base_model_sha256": "a" * 64})
    for r in (1, 2):
        log.record("update_sent", {"site": "s", "round": r, "bytes": 1000 + r, "payload_sha256": f"{r}" * 64,
                                   "nonce": "00" * 16, "epsilon_spent": 0.0, "num_examples": 8})
        log.record("metrics_sent", {"site": "s", "round": r, "phase": "train", "num_examples": 8,
                                    "metrics": {"loss": 1.0 / r}})


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "site_agent", "audit", "verify", "--log", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_site_audit_verify_ok(tmp_path: Path) -> None:
    _site_log(tmp_path / "audit.jsonl")
    r = _verify(tmp_path / "audit.jsonl")
    assert r.returncode == 0 and r.stdout.startswith("OK") and "5 records" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("tamper,expect", [
    ("edit", "line 2: hash does not match"),       # e.g. lowering the bytes that left
    ("remove", "line 2: seq 3 follows 1"),
    ("reorder", "line 4: seq 5 follows 3"),
    ("cut_tail", "lines were cut off the end"),
    ("append_forged", "without the log's writer"),
])
def test_site_audit_verify_locates_tampering(tmp_path: Path, tamper: str, expect: str) -> None:
    # Prepare
    path = tmp_path / "audit.jsonl"
    _site_log(path)
    lines = path.read_text().splitlines(keepends=True)
    if tamper == "edit":
        rec = json.loads(lines[1])
        rec["fields"]["bytes"] = 10
        lines[1] = json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"
    elif tamper == "remove":
        del lines[1]
    elif tamper == "reorder":
        lines[3], lines[4] = lines[4], lines[3]
    elif tamper == "cut_tail":
        lines = lines[:-1]
    else:
        from fedcommon.auditlog import record_hash

        rec = json.loads(lines[-1])
        forged = {**rec, "seq": rec["seq"] + 1, "prev": rec["hash"], "event": "update_sent"}
        forged["hash"] = record_hash(forged)
        lines.append(json.dumps(forged, sort_keys=True, separators=(",", ":")) + "\n")
    path.write_text("".join(lines))

    # Execute
    r = _verify(path)

    # Assert
    assert r.returncode == 1 and "TAMPERED" in r.stdout, r.stdout + r.stderr
    assert expect in " ".join(r.stdout.split()), r.stdout
