from __future__ import annotations

from pathlib import Path

import pytest

from fedcommon.manifest import Manifest, ManifestMismatch, verify_model_dir


def _model(tmp_path: Path) -> Path:
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    (d / "sub" / "tok.json").write_text("[]")
    Manifest.of_dir(d).save(d)
    return d


def test_manifest_is_stable_and_excludes_itself(tmp_path: Path) -> None:
    d = _model(tmp_path)
    m1 = Manifest.of_dir(d)
    assert set(m1.files) == {"config.json", "model.safetensors", "sub/tok.json"}
    assert Manifest.load(d / "fedbridge-manifest.json").sha256 == m1.sha256 == Manifest.of_dir(d).sha256
    verify_model_dir(d, m1.sha256)


@pytest.mark.parametrize("tamper,named", [
    (lambda d: (d / "model.safetensors").write_bytes(b"\x01" + b"\x00" * 99), "changed: ['model.safetensors']"),
    (lambda d: (d / "sub" / "tok.json").unlink(), "missing: ['sub/tok.json']"),
    (lambda d: (d / "extra.py").write_text("print(1)"), "unexpected: ['extra.py']"),
])
def test_verify_names_what_changed(tmp_path: Path, tamper, named: str) -> None:  # type: ignore[no-untyped-def]
    d = _model(tmp_path)
    want = Manifest.of_dir(d).sha256
    tamper(d)
    with pytest.raises(ManifestMismatch) as e:
        verify_model_dir(d, want)
    assert named in str(e.value)
