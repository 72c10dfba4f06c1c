"""A site whose base model differs from the federation's pinned manifest refuses to train and sends nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

from coordinator.rounds.store import Store
from sandbox import localfed


def test_tampered_base_model_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: the coordinator pins the genuine model; the site holds a copy with one byte flipped.
    tampered = tmp_path / "tampered-model"
    shutil.copytree(tiny_model_dir, tampered)
    weights = tampered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    fed = localfed.prepare(tmp_path / "fed", tiny_model_dir, n_sites=1, rounds=1, training={"max_steps": 2})
    # Execute
    with fed:
        fed.start_coordinator()
        site = fed.sites[0]
        fed.start_site(site, extra={"base_model": str(tampered)})
        codes = fed.wait([site.name], timeout=240)
        store = Store(fed.state_dir)
        updates = store.updates()
    # Assert: a clear refusal naming the changed file, no training, nothing uploaded.
    log = fed.log_path(site.name).read_text()
    assert codes[site.name] == 2
    assert "refusing to train" in log and "model.safetensors" in log
    assert "[Site.train]" not in log and "UploadUpdate" not in log
    assert updates == []
