from __future__ import annotations

from pathlib import Path

import pytest

from fedcommon.manifest import Manifest, ManifestMismatch, verify_model_dir


def _model(tmp_path: Path) -> Path:
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    (d / "sub" / "tokenizer.json").write_text("[]")
    Manifest.of_dir(d).save(d)
    return d


def test_manifest_is_stable_and_excludes_itself(tmp_path: Path) -> None:
    d = _model(tmp_path)
    m1 = Manifest.of_dir(d)
    assert set(m1.files) == {"config.json", "model.safetensors", "sub/tokenizer.json"}
    assert Manifest.load(d / "fedbridge-manifest.json").sha256 == m1.sha256 == Manifest.of_dir(d).sha256
    verify_model_dir(d, m1.sha256)


@pytest.mark.parametrize("tamper,named", [
    (lambda d: (d / "model.safetensors").write_bytes(b"\x01" + b"\x00" * 99), "changed: ['model.safetensors']"),
    (lambda d: (d / "sub" / "tokenizer.json").unlink(), "missing: ['sub/tokenizer.json']"),
    (lambda d: (d / "model-00002.safetensors").write_bytes(b"\x00"), "unexpected model files: ['model-00002.safetensors']"),
    (lambda d: (d / "config.json").write_text('{"n_layer": 2}'), "changed: ['config.json']"),
])
def test_verify_names_what_changed(tmp_path: Path, tamper, named: str) -> None:  # type: ignore[no-untyped-def]
    d = _model(tmp_path)
    want = Manifest.of_dir(d).sha256
    tamper(d)
    with pytest.raises(ManifestMismatch) as e:
        verify_model_dir(d, want)
    assert named in str(e.value)


def test_files_that_do_not_make_the_model_are_ignored(tmp_path: Path) -> None:
    """A hub download's README, .gitattributes and images change nothing the model computes: still the same pin."""
    d = _model(tmp_path)
    want = Manifest.of_dir(d).sha256
    (d / "README.md").write_text("# a model card\n")
    (d / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (d / "figure.png").write_bytes(b"\x89PNG")
    (d / "LICENSE").write_text("text")
    assert verify_model_dir(d, want).files.keys() == {"config.json", "model.safetensors", "sub/tokenizer.json"}
    (d / "chat_template.jinja").write_text("{{ messages }}")  # a template decides what the model is trained on
    with pytest.raises(ManifestMismatch, match=r"unexpected model files: \['chat_template.jinja'\]"):
        verify_model_dir(d, want)
