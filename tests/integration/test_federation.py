"""End to end: a real coordinator and 2 real site processes, 2 rounds, on loopback with mutual TLS."""

from __future__ import annotations

from pathlib import Path

import torch

from coordinator.rounds.store import Store
from coordinator.server import read_recording
from fedcommon import tensors
from fedcommon.manifest import Manifest, verify_model_dir
from protos.fedbridge.v1 import federation_service_pb2 as pb
from sandbox import localfed


def test_two_sites_two_rounds_aggregate_and_publish(finished_federation: localfed.LocalFederation) -> None:
    fed = finished_federation
    store = Store(fed.state_dir)
    rounds = store.rounds()
    assert [(r.round, r.state) for r in rounds] == [(1, "closed"), (2, "closed")]
    for r in (1, 2):
        ups = store.updates(r)
        assert [u.site for u in ups] == ["site-a", "site-b"]
        # The stored global is exactly FedAvg of the stored deltas.
        g_in = tensors.decode_state(store.adapter_path(r).read_bytes())
        g_out = tensors.decode_state(store.adapter_path(r + 1).read_bytes())
        deltas = [(tensors.decode_state(u.path.read_bytes()), u.num_examples) for u in ups]
        total = sum(n for _, n in deltas)
        for k in g_in:
            want = g_in[k].double() + sum(d[k].double() * n for d, n in deltas) / total
            assert torch.allclose(g_out[k].double(), want, atol=1e-6)
    pubs = store.publications()
    assert len(pubs) == 1 and Path(pubs[0]["path"]).is_dir()
    # Learning is visible: the union held-out loss of the final global is below the initial adapter's.
    def union(r: int) -> float:
        ms = [m for m in store.metrics(r) if m[2] == "eval_global"]
        tok = {m[1]: m[4] for m in ms if m[3] == "tokens"}
        return sum(m[4] * tok[m[1]] for m in ms if m[3] == "loss") / sum(tok.values())
    assert {m[1] for m in store.metrics(3) if m[2] == "eval_global"} == {"site-a", "site-b"}
    assert union(3) < union(1) - 0.5


def test_published_model_loads_with_stock_transformers_and_peft(finished_federation: localfed.LocalFederation,
                                                                tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(Store(finished_federation.state_dir).publications()[0]["path"])
    verify_model_dir(path, Manifest.load(path / "fedbridge-manifest.json").sha256)
    merged = AutoModelForCausalLM.from_pretrained(path / "merged")
    tok = AutoTokenizer.from_pretrained(path / "merged")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path / "adapter")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Zorvia?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        a = merged(**prompt).logits
        b = peft_model(**prompt).logits
        out = merged.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.allclose(a, b, atol=1e-4)  # merged == base + adapter
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0, prompt["input_ids"].shape[1]:]), str)
    prov = (path / "provenance.json").read_text()
    assert "site-a" in prov and "fedavg" in prov and "manifest_sha256" in prov


def test_canary_never_reaches_the_coordinator(finished_federation: localfed.LocalFederation, canary: str) -> None:
    fed, MARKER = finished_federation, canary
    # The canary is really in every site's private training data ...
    for s in fed.sites:
        assert MARKER in s.train_path.read_text()
    # ... and every byte the coordinator received was recorded (uploads included) ...
    assert fed.record_inbound is not None
    recorded = read_recording(fed.record_inbound)
    methods = {m.rsplit("/", 1)[1] for m, _ in recorded}
    assert {"Join", "FetchTask", "DownloadAdapter", "UploadUpdate", "ReportMetrics"} <= methods
    uploaded = sum(len(raw) for m, raw in recorded if m.endswith("/UploadUpdate"))
    assert uploaded > 4 * 100_000
    # ... yet no form of the marker appears in them.
    blob = b"".join(raw for _, raw in recorded)
    for form in (MARKER.encode(), MARKER.encode("utf-16-le"), MARKER.lower().encode(), MARKER[:16].encode()):
        assert form not in blob


def test_only_adapter_tensors_of_the_spec_were_uploaded(finished_federation: localfed.LocalFederation) -> None:
    store = Store(finished_federation.state_dir)
    spec_keys = set(tensors.decode_state(store.adapter_path(1).read_bytes()))
    for u in store.updates():
        env = pb.UpdateEnvelope.FromString(
            store._q("SELECT envelope FROM updates WHERE round=? AND site=?", (u.round, u.site))[0][0])
        assert env.payload_kind == pb.PAYLOAD_KIND_DIFF
        assert set(tensors.decode_state(u.path.read_bytes())) == spec_keys


def test_every_upload_is_in_the_sites_and_the_coordinators_audit_logs(finished_federation: localfed.LocalFederation,
                                                                      canary: str) -> None:
    """Each site's hash-chained log records each update that left it (hash, bytes, epsilon), and it matches what
    the coordinator accepted and audited; no log holds a training byte."""
    from fedcommon.auditlog import read_records, verify

    fed = finished_federation
    store = Store(fed.state_dir)
    coord = verify(fed.state_dir / "audit.jsonl")
    assert coord.ok, coord.problems
    accepted = {(r["fields"]["round"], r["fields"]["site"], r["fields"]["payload_sha256"])
                for r in read_records(fed.state_dir / "audit.jsonl") if r["event"] == "update_accepted"}
    assert accepted == {(u.round, u.site, u.payload_sha256) for u in store.updates()}
    assert "model_published" in {r["event"] for r in read_records(fed.state_dir / "audit.jsonl")}
    for site in fed.sites:
        log = fed.root / "sites" / site.name / "work" / "audit.jsonl"
        report = verify(log)
        assert report.ok, report.problems
        sent = [r["fields"] for r in read_records(log) if r["event"] == "update_sent"]
        assert [(f["round"], f["payload_sha256"], f["bytes"]) for f in sent] == [
            (u.round, u.payload_sha256, u.size) for u in store.updates() if u.site == site.name]
        assert all(f["epsilon_spent"] == 0.0 for f in sent)
        assert canary not in log.read_text()
