"""Published artifacts tell the truth: site regions from the certificates, the base model's reference and hash, no
path of the coordinator's host anywhere in the folder, and under FedEx-LoRA an ``adapter/`` labelled as not the
published model on its own (with a residual that makes it so)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from coord_helpers import LORA, config, run_federation, small_delta

from coordinator.release.modelcard import parse_model_card
from coordinator.release.publish import FEDEX_ADAPTER_NOTE, publish
from coordinator.release.records import site_regions
from coordinator.rounds.adapter import init_adapter
from coordinator.rounds.store import Store
from coordinator.trust.enrolment import Enrolment, save_registry
from fedcommon.manifest import Manifest


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Store]:
    """One round, two sites that joined with region-bearing certificates, no base_model_ref, no config regions."""
    tmp = tmp_path_factory.mktemp("truth")
    init = init_adapter(tiny_model_dir, LORA)
    cfg = config(tmp, tiny_model_dir, rounds=1, min_sites=2, base_model_ref="",
                 lora={"rank": 16, "alpha": 32.0, "target_modules": ["all-linear"]}, publish={"max_shard_mb": 4})

    def prepare(store: Store) -> None:  # what Join records from each site's certificate (engine: gate.region(peer))
        store.set_site_region("site-a", "EU-DE")
        store.set_site_region("site-b", "EU-FR")

    store = run_federation(cfg, init, {1: {"site-a": small_delta(init, 1), "site-b": small_delta(init, 2)}},
                           prepare=prepare)
    [pub] = store.publications()
    return Path(pub["path"]), tmp, store


def test_card_regions_come_from_the_site_certificates(plain: tuple[Path, Path, Store]) -> None:
    path, _, _ = plain
    meta, body = parse_model_card((path / "README.md").read_text())
    assert meta["fedbridge"]["sites"] == [{"name": "site-a", "region": "EU-DE", "rounds": [1]},
                                          {"name": "site-b", "region": "EU-FR", "rounds": [1]}]
    assert "| site-a | EU-DE |" in body and "| site-b | EU-FR |" in body


def test_card_names_the_base_model_and_its_hash_without_a_configured_ref(plain: tuple[Path, Path, Store],
                                                                        tiny_model_dir: Path) -> None:
    path, _, _ = plain
    meta, body = parse_model_card((path / "README.md").read_text())
    sha = Manifest.of_dir(tiny_model_dir).sha256
    assert meta["fedbridge"]["base_model"] == {"ref": tiny_model_dir.name, "manifest_sha256": sha}
    assert "base_model" not in meta  # the Hub's key takes a hub id only; "unspecified" was not true either
    assert f"- reference: `{tiny_model_dir.name}`" in body and sha in body
    adapter_cfg = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == tiny_model_dir.name


def test_no_host_path_appears_in_any_published_file(plain: tuple[Path, Path, Store], tiny_model_dir: Path) -> None:
    path, tmp, _ = plain
    host_paths = {str(p) for p in (tiny_model_dir, tiny_model_dir.resolve(), tmp, tmp.resolve(), path, path.parent)}
    files = [p for p in path.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaks = {(str(p.relative_to(path)), h) for p in files for h in host_paths if h.encode() in p.read_bytes()}
    assert not leaks


def test_site_regions_prefer_the_certificate_then_the_enrolment_record(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Prepare: an enrolment registry (enroll-site --region) and a stale config region
    registry = tmp_path / "enrolment.json"
    save_registry(registry, {n: Enrolment(name=n, region=r, serial=1, fingerprint="f" * 64, enrolled_ms=1)
                             for n, r in (("site-a", "EU-DE"), ("site-b", "EU-FR"))})
    cfg = config(tmp_path, tiny_model_dir, enrolment_registry=str(registry),
                 publish={"site_regions": {"site-a": "US-CA", "site-c": "EU-IT"}})

    # Execute / Assert: Join's certificate region wins, then the registry's, then the config's
    assert site_regions(cfg, {"site-b": "EU-NL"}) == {"site-a": "EU-DE", "site-b": "EU-NL", "site-c": "EU-IT"}


def test_fedex_adapter_is_labelled_as_not_the_published_model(plain: tuple[Path, Path, Store], tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    from safetensors import safe_open

    # Prepare: the plain version's provenance, republished with a FedEx residual on one base weight
    path, _, _ = plain
    prov = json.loads((path / "provenance.json").read_text())
    for key in ("version", "adapter"):
        prov.pop(key, None)
    init = init_adapter(tiny_model_dir, LORA)
    name = next(k for k in init.state if k.endswith("lora_A.weight")).removeprefix("base_model.model.").replace(
        ".lora_A.weight", ".weight")
    out_features = init.state[f"base_model.model.{name[:-7]}.lora_B.weight"].shape[0]
    in_features = init.state[f"base_model.model.{name[:-7]}.lora_A.weight"].shape[1]
    residual = {name: torch.full((out_features, in_features), 1e-3)}

    # Execute
    _, fedex, _ = publish(base_model=tiny_model_dir, spec=init.spec, state=small_delta(init, 3), registry_dir=tmp_path,
                          federation_id="fed", provenance=prov, residual=residual)

    # Assert: every place a reader would look says so
    assert (fedex / "base_residual.safetensors").is_file()
    readme = (fedex / "adapter" / "README.md").read_text()
    assert "not the published model" in readme and "merged/" in readme and "base_residual.safetensors" in readme
    with safe_open(str(fedex / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["fedbridge_note"] == FEDEX_ADAPTER_NOTE
    meta, body = parse_model_card((fedex / "README.md").read_text())
    assert meta["fedbridge"]["adapter_alone_is_the_model"] is False
    assert FEDEX_ADAPTER_NOTE in body and 'PeftModel.from_pretrained(base, "adapter")' not in body
    assert json.loads((fedex / "provenance.json").read_text())["adapter"] == {
        "reproduces_merged_on_plain_base": False, "note": FEDEX_ADAPTER_NOTE}
    # Without a residual the adapter is the model, and the card says both load.
    meta, body = parse_model_card((path / "README.md").read_text())
    assert meta["fedbridge"]["adapter_alone_is_the_model"] is True and not (path / "adapter" / "README.md").exists()
    assert 'PeftModel.from_pretrained(base, "adapter")' in body
