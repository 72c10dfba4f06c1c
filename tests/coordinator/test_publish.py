"""Publishing: the registry version loads with stock transformers/peft, SHA256SUMS verifies, the model card states
every provenance field, the ledger ties update hashes to global adapters, and an offline push fails leaving the
local version intact."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from coord_helpers import LORA, config, run_federation, small_delta

from coordinator.release.modelcard import parse_model_card
from coordinator.release.publish import PushError, parse_target, push_version, verify_sha256sums
from coordinator.rounds.adapter import init_adapter, peft_model_with
from coordinator.rounds.store import Store
from fedcommon import tensors
from fedcommon.manifest import Manifest
from protos import codec
from sandbox.benchmarks import make_shared_benchmark

SCORES = {1: {"general_qa": 0.625, "general_mcq": 0.25}, 2: {"general_qa": 0.8125, "general_mcq": 0.5}}


@pytest.fixture(scope="module")
def published(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Store]:
    """Two sites, two rounds, evaluation scores recorded up front, a gate, licence and regions: published v1."""
    tmp = tmp_path_factory.mktemp("publish")
    bench = make_shared_benchmark(tmp / "bench", n_sites=2, per_family=2)
    init = init_adapter(tiny_model_dir, LORA)
    cfg = config(tmp, tiny_model_dir, rounds=2, min_sites=2,
                 lora={"rank": 16, "alpha": 32.0, "target_modules": ["all-linear"]},
                 evaluation={"enabled": True, "benchmarks": bench.benchmark_tables()},
                 gate={"thresholds": {"general_qa": 0.5}, "max_regression": 0.05},
                 publish={"license": "apache-2.0", "site_regions": {"site-a": "EU/DE"}, "max_shard_mb": 4})

    def prepare(store: Store) -> None:
        for r, s in SCORES.items():
            store.put_eval_run(r, status="ok", error="", adapter_sha256="-", seconds=1.0, work_dir=tmp,
                               scores={b: {"score": (v, 4), "subset/capitals": (v, 2)} for b, v in s.items()},
                               primary_metrics={"general_qa": "Rouge-L-R", "general_mcq": "acc"})

    deltas = {r: {"site-a": small_delta(init, 10 + r), "site-b": small_delta(init, 20 + r)} for r in (1, 2)}
    store = run_federation(cfg, init, deltas, epsilon={"site-a": {1: 0.5, 2: 0.8}}, prepare=prepare)
    [pub] = store.publications()
    return Path(pub["path"]), store


def test_layout(published: tuple[Path, Store]) -> None:
    path, _ = published
    assert path.name == "v1" and path.parent.name == "fed" and path.parent.parent.name == "registry"
    top = sorted(p.name for p in path.iterdir())
    assert top == ["README.md", "SHA256SUMS", "adapter", "fedbridge-manifest.json", "merged", "provenance.json"]
    adapter_files = {p.name for p in (path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= adapter_files
    shards = sorted(p.name for p in (path / "merged").glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"  # 4 MiB shards of 17 MB
    assert (path / "merged" / "model.safetensors.index.json").exists()


def test_published_dir_loads_with_stock_transformers_and_peft(published: tuple[Path, Store], tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, store = published
    merged = AutoModelForCausalLM.from_pretrained(path / "merged")
    tok = AutoTokenizer.from_pretrained(path / "merged")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path / "adapter")
    # The reference: the final global adapter from the coordinator's store on a fresh base.
    init = init_adapter(tiny_model_dir, LORA)
    final = tensors.decode_state(store.adapter_path(3).read_bytes())
    reference = peft_model_with(tiny_model_dir, init.spec, final)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Zorvania?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        a, b, c = (m(**prompt).logits for m in (merged, with_adapter, reference))
    assert torch.allclose(a, c, atol=1e-4) and torch.allclose(b, c, atol=1e-5)
    assert json.loads((path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "fedbridge/tiny-llama"


def test_sha256sums_verify_and_detect_tampering(published: tuple[Path, Store], tmp_path: Path) -> None:
    path, store = published
    sums = (path / "SHA256SUMS").read_text().splitlines()
    listed = {line.split("  ", 1)[1] for line in sums}
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert listed == on_disk - {"SHA256SUMS", "fedbridge-manifest.json"}
    assert verify_sha256sums(path) == []
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=path).returncode == 0
    assert Manifest.of_dir(path).sha256 == store.publications()[0]["manifest_sha256"]
    copy = tmp_path / "v1"
    shutil.copytree(path, copy)
    with open(copy / "merged" / "config.json", "a") as f:
        f.write(" ")
    assert verify_sha256sums(copy) == ["merged/config.json"]


def test_model_card_fields(published: tuple[Path, Store], tiny_model_dir: Path) -> None:
    path, store = published
    meta, body = parse_model_card((path / "README.md").read_text())
    rounds = store.rounds()
    assert meta["license"] == "apache-2.0" and "license_name" not in meta
    assert meta["base_model"] == "fedbridge/tiny-llama"
    assert meta["library_name"] == "transformers" and "federated-learning" in meta["tags"]
    fb = meta["fedbridge"]
    assert fb["federation"] == "fed" and fb["version"] == 1 and fb["rounds"] == 2
    assert fb["base_model"] == {"ref": "fedbridge/tiny-llama", "manifest_sha256": Manifest.of_dir(tiny_model_dir).sha256}
    assert fb["global_adapter_sha256"] == codec.sha256_hex(store.adapter_path(3).read_bytes()) == rounds[-1].output_sha256
    assert fb["sites"] == [{"name": "site-a", "region": "EU/DE", "rounds": [1, 2]},
                           {"name": "site-b", "region": "unspecified", "rounds": [1, 2]}]
    assert fb["strategy"]["name"] == "fedavg"
    assert fb["strategy"]["aggregation_error"] == pytest.approx(rounds[-1].info["aggregation_error"]["mean"])
    assert fb["strategy"]["aggregation_error_max"] == pytest.approx(rounds[-1].info["aggregation_error"]["max"])
    assert fb["training_modes"] == ["sft"]
    # Envelopes carry the site's cumulative epsilon: the card shows the latest (0.8 after round 2), not a sum.
    assert fb["dp_epsilon"] == {"site-a": 0.8, "site-b": 0.0}
    assert fb["dp"]["delta"] == {"site-a": 1e-5, "site-b": 0.0} and fb["dp"]["mode"] == "none"
    assert store.site_epsilon() == {"site-a": 0.8, "site-b": 0.0}
    assert fb["evaluation"] == {"round": 2, "status": "ok", "scores": SCORES[2]}
    assert fb["release_gate"] == {"passed": True, "thresholds": {"general_qa": 0.5}, "max_regression": 0.05,
                                  "previous_version": None}
    [index] = meta["model-index"]
    assert index["name"] == "fed-v1"
    assert {(r["dataset"]["name"], r["metrics"][0]["type"], r["metrics"][0]["value"]) for r in index["results"]} == {
        ("general_qa", "Rouge-L-R", 0.8125), ("general_mcq", "acc", 0.5)}
    # The prose says the same.
    assert "| site-a | EU/DE | 1, 2 | 0.8 |" in body and "| site-b | unspecified | 1, 2 | 0 |" in body
    assert "| general_qa | Rouge-L-R | 0.8125 | capitals 0.812 |" in body
    assert "| 1 | 0.2500 | 0.6250 |" in body and "| 2 | 0.5000 | 0.8125 |" in body  # history: mcq, qa per round
    assert "`apache-2.0`" in body


def test_provenance_ledger_ties_update_hashes_to_global_adapters(published: tuple[Path, Store]) -> None:
    path, store = published
    prov = json.loads((path / "provenance.json").read_text())
    assert [e["round"] for e in prov["ledger"]] == [1, 2]
    for entry in prov["ledger"]:
        r = entry["round"]
        assert entry["input_sha256"] == codec.sha256_hex(store.adapter_path(r).read_bytes())
        assert entry["output_sha256"] == codec.sha256_hex(store.adapter_path(r + 1).read_bytes())
        assert [(u["site"], u["payload_sha256"]) for u in entry["updates"]] == \
            [(u.site, codec.sha256_hex(u.path.read_bytes())) for u in store.updates(r)]
    assert prov["version"] == 1 and prov["sites"] == ["site-a", "site-b"]


def test_push_offline_fails_clearly_and_leaves_the_version_intact(published: tuple[Path, Store],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from coordinator.admin.cli import app

    path, _ = published
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    monkeypatch.setenv("FEDBRIDGE_OFFLINE", "1")
    for target in ("hf://org/name", "modelscope://org/name"):
        with pytest.raises(PushError, match=r"cannot reach .*intact"):
            push_version(path, target)
    result = CliRunner().invoke(app, ["publish", "--registry", str(path.parent.parent), "--federation", "fed",
                                      "--version", "1", "--to", "hf://org/name"])
    assert result.exit_code == 1 and "push failed" in result.output and "intact" in result.output
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before
    assert verify_sha256sums(path) == []


def test_push_refuses_bad_targets_and_damaged_versions(published: tuple[Path, Store], tmp_path: Path) -> None:
    path, _ = published
    assert parse_target("hf://org/name") == ("huggingface", "org/name")
    assert parse_target("modelscope://org/name") == ("modelscope", "org/name")
    for bad in ("s3://org/name", "hf://name", "hf://org/", "org/name"):
        with pytest.raises(PushError, match="must be"):
            parse_target(bad)
    copy = tmp_path / "v1"
    shutil.copytree(path, copy)
    (copy / "README.md").write_text("changed")
    with pytest.raises(PushError, match="does not match its SHA256SUMS"):
        push_version(copy, "hf://org/name")


def test_no_host_path_in_a_version_with_local_benchmarks(published: tuple[Path, Store], tiny_model_dir: Path) -> None:
    """The benchmark data's own name may appear (provenance's eval spec), never where it lies on this host."""
    path, _ = published
    tmp = path.parents[2]  # the fixture's folder: state, registry and benchmark data all live under it
    host_paths = {str(p) for p in (tiny_model_dir, tiny_model_dir.resolve(), tmp, tmp.resolve())}
    leaks = {(str(p.relative_to(path)), h) for p in path.rglob("*") if p.is_file() for h in host_paths
             if h.encode() in p.read_bytes()}
    assert not leaks
    spec = json.loads((path / "provenance.json").read_text())["evaluation"]["spec"]
    assert spec and all(s["local_path"] is None or "/" not in s["local_path"] for s in spec)
