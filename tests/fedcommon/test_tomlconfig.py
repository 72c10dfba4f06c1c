from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import FederationConfig, load_federation_config
from fedcommon.tomlconfig import ConfigError, dumps, load_toml

BASE = """
federation_id = "f"
base_model = "model"
state_dir = "state"
registry_dir = "reg"
[tls]
ca = "ca.pem"
cert = "s.pem"
key = "s.key"
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "federation.toml"
    p.write_text(text)
    return p


def test_loads_and_resolves_relative_paths(tmp_path: Path) -> None:
    cfg = load_federation_config(_write(tmp_path, BASE + "[training]\nmax_steps = 7\n"))
    assert isinstance(cfg, FederationConfig)
    assert cfg.training.max_steps == 7
    assert cfg.base_model == tmp_path / "model"
    assert cfg.tls.ca == tmp_path / "ca.pem"


@pytest.mark.parametrize("extra,field", [
    ("rounds = 0\n", "rounds"),
    ("rounds = \"three\"\n", "rounds"),
    ("colour = 1\n", "colour"),
    ("[training]\nmax_steps = -1\n", "training.max_steps"),
    ("[training]\nmode = \"rlhf\"\n", "training.mode"),
    ("[lora]\nrank = 1.5\n", "lora.rank"),
    ("[lora]\nwire_dtype = \"float16\"\n", "lora.wire_dtype"),
    ("strategy = \"nope\"\n", "strategy"),
])
def test_errors_name_file_and_field(tmp_path: Path, extra: str, field: str) -> None:
    text = BASE.replace('federation_id = "f"\n', 'federation_id = "f"\n' + extra) if not extra.startswith("[") else BASE + extra
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_federation_config(p)
    assert str(p) in str(e.value)
    assert f"'{field}'" in str(e.value)


def test_missing_required_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'federation_id': required"):
        load_federation_config(_write(tmp_path, BASE.replace('federation_id = "f"\n', "")))
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_federation_config(_write(tmp_path, "a = = 1"))


def test_dumps_roundtrips(tmp_path: Path) -> None:
    data = {"a": 1, "b": "x\"y", "c": [1.5, 2.0], "t": {"d": True, "e": ["p", "q"]}}
    p = tmp_path / "x.toml"
    p.write_text(dumps(data))
    assert load_toml(p) == data


@pytest.mark.parametrize("extra,msg", [
    ('strategy = "fedadam"\n[strategy_params]\neta = -1.0\n', "eta"),
    ('strategy = "fedavg"\n[strategy_params]\nwarp = 1\n', "warp"),
    ('strategy = "flora"\n[strategy_params]\nmax_rank = 64\n', "max_rank = 0"),
])
def test_strategy_is_checked_at_start(tmp_path: Path, extra: str, msg: str) -> None:
    p = _write(tmp_path, BASE.replace('federation_id = "f"\n', 'federation_id = "f"\n' + extra.split("[")[0])
               + ("[" + extra.split("[", 1)[1] if "[" in extra else ""))
    with pytest.raises(ConfigError) as e:
        load_federation_config(p)
    assert "'strategy'" in str(e.value) and msg in str(e.value)


def test_known_strategy_with_params_loads(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE.replace('federation_id = "f"\n', 'federation_id = "f"\nstrategy = "fedadam"\n')
               + "[strategy_params]\neta = 0.01\nclip_norm = 5.0\n")
    assert load_federation_config(p).strategy_params == {"eta": 0.01, "clip_norm": 5.0}
