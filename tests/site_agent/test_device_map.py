"""``device_map`` in site.toml (checked at load, refused with a multi-rank launch, handed to the base's loader) and the
trainer's precision flags under DeepSpeed."""

from __future__ import annotations

from pathlib import Path

import pytest

from site_agent.config import SiteConfig, SiteData, SiteTls
from site_agent.training.trainer import SftSiteTrainer, precision_args


def _cfg(tmp_path: Path, device_map: str) -> SiteConfig:
    tls = SiteTls(ca=tmp_path / "ca", cert=tmp_path / "c", key=tmp_path / "k", signing_key=tmp_path / "s")
    return SiteConfig(name="s", coordinator="localhost:1", base_model=tmp_path, tls=tls,
                      data=SiteData(train=tmp_path / "t.jsonl"), work_dir=tmp_path, device_map=device_map)


@pytest.mark.parametrize("value", ["", "auto", "balanced", "sequential", "cuda:1"])
def test_known_device_maps_load(tmp_path: Path, value: str) -> None:
    assert _cfg(tmp_path, value).device_map == value


def test_an_unknown_device_map_is_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="field 'device_map': 'everywhere'"):
        _cfg(tmp_path, "everywhere")


def test_device_map_is_refused_under_a_multi_rank_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="multi-rank launch"):
        SftSiteTrainer(tmp_path, [], tmp_path, device_map="auto")


def test_device_map_reaches_the_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import site_agent.training.trainer as trainer_mod

    seen = {}

    def fake_load(base: Path, quantize: bool = False, device_map: str = "") -> object:
        seen.update(quantize=quantize, device_map=device_map)
        raise RuntimeError("stop after the loader")

    class Tok:
        @staticmethod
        def from_pretrained(path: Path) -> object:
            return object()

    monkeypatch.setattr(trainer_mod, "load_base", fake_load)
    monkeypatch.setattr("transformers.AutoTokenizer", Tok)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="stop after the loader"):
        SftSiteTrainer(tmp_path, [], tmp_path, quantize=True, device_map="balanced")
    assert seen == {"quantize": True, "device_map": "balanced"}


@pytest.mark.parametrize(("ds", "device", "want"), [
    (None, (True, True), {"use_cpu": False, "bf16": True, "fp16": False}),
    ({"bf16": {"enabled": False}}, (True, True), {"use_cpu": False, "bf16": False, "fp16": False}),
    ({"bf16": {"enabled": "auto"}}, (True, True), {"use_cpu": False, "bf16": True, "fp16": False}),
    ({"fp16": {"enabled": True}}, (True, True), {"use_cpu": False, "bf16": False, "fp16": True}),
    ({"zero_optimization": {"stage": 2}}, (False, False), {"use_cpu": True, "bf16": False, "fp16": False}),
])
def test_an_explicit_deepspeed_precision_wins(ds: dict | None, device: tuple[bool, bool], want: dict) -> None:
    assert precision_args(ds, device) == want
