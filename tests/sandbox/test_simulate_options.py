"""``fedbridge simulate``: bad arguments end as one clear line naming the option, before anything starts.

The simulation itself (Ray start-up alone is ~35 s on a loaded 2-core box) runs in
tests/integration/test_simulate.py (marked ``slow`` and ``flower``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sandbox.cli import app
from sandbox.simulate import SimulateConfig, parse_client_resources, parse_lora_ranks, rule_name

CASES = [
    (["--sites", "1"], "--sites: a federation needs at least 2 sites, got 1"),
    (["--rounds", "0"], "--rounds: must be >= 1, got 0"),
    (["--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--alpha", "0"], "--alpha: the Dirichlet concentration must be > 0, got 0.0"),
    (["--alpha", "-1"], "--alpha: the Dirichlet concentration must be > 0, got -1.0"),
    (["--fraction", "0"], "--fraction: the share of sites sampled per round must be in (0, 1], got 0.0"),
    (["--fraction", "1.5"], "--fraction: the share of sites sampled per round must be in (0, 1], got 1.5"),
    (["--strategy", "fedsgd"], "--strategy: unknown 'fedsgd'; choose from fedavg, fedex-lora or any of "),
    (["--lora-ranks", "4,x"], "--lora-ranks: expected integers separated by commas (e.g. 8,4,2), got '4,x'"),
    (["--lora-ranks", "4,9"], "--lora-ranks: rank 9 is outside 1..8 (--rank)"),
    (["--lora-ranks", "8,4"], "--lora-ranks: sites below --rank 8 need a mixed-rank strategy (flexlora, hetlora), "
     "not 'fedavg'"),
    (["--client-resources", "one"], "--client-resources: expected CPUS or CPUS,GPUS"),
    (["--client-resources", "1,0,2"], "--client-resources: expected CPUS or CPUS,GPUS"),
    (["--client-resources", "0"], "--client-resources: CPUs per site must be > 0 and GPUs >= 0"),
    (["--num-cpus", "2", "--client-resources", "3"], "--client-resources: 3.0 CPUs per site is more than the 2"),
    (["--ray-address", "auto", "--num-cpus", "2"], "--num-cpus: sizes a local Ray; a cluster joined with "
     "--ray-address has its own CPUs"),
    (["--ray-address", " "], "--ray-address: empty"),
    (["--learning-rate", "2"], "--learning-rate: must be in (0, 1), got 2.0"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_arguments_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["simulate", "--out", str(out), *args])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not out.exists()  # refused before anything was written


def test_out_and_base_model_must_be_folders(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    r = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "file")])
    assert r.exit_code == 2 and "--out: " in r.output and "is not a folder" in r.output
    r = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "o"), "--base-model", str(tmp_path)])
    assert r.exit_code == 2 and "--base-model: " in r.output and "no config.json" in r.output


def test_config_defaults_and_sampling() -> None:
    assert parse_client_resources("0.5,0.25") == (0.5, 0.25) and parse_client_resources("2") == (2.0, 0.0)
    assert SimulateConfig(sites=100, fraction=0.1).sampled_per_round == 10
    assert SimulateConfig(sites=3, fraction=0.1).sampled_per_round == 1  # at least one site
    assert SimulateConfig(alpha=math.inf).alpha == math.inf
    assert SimulateConfig(strategy="ffa-lora").strategy == "ffa-lora" and rule_name("ffa-lora") == "ffa_lora"
    assert rule_name("fedex-lora") == "fedex_lora" and parse_lora_ranks(" 8, 4 ") == (8, 4) and not parse_lora_ranks("")
    assert SimulateConfig(strategy="hetlora", rank=8, lora_ranks=(8, 4, 2)).lora_ranks == (8, 4, 2)
    with pytest.raises(ValueError, match="--alpha"):
        SimulateConfig(alpha=math.nan)


def test_backend_config_starts_a_private_local_ray_or_joins_a_cluster(tmp_path: Path) -> None:
    from sandbox.simulate import backend_config

    local = backend_config(SimulateConfig(num_cpus=2, client_cpus=0.5), tmp_path / "ray")
    assert local["init_args"]["num_cpus"] == 2 and local["init_args"]["_temp_dir"] == str(tmp_path / "ray")
    assert local["init_args"]["include_dashboard"] is False and "address" not in local["init_args"]
    assert local["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    joined = backend_config(SimulateConfig(ray_address="ray://10.0.0.5:10001", client_gpus=0.5), tmp_path / "ray")
    # Ray refuses num_cpus/num_gpus when joining a cluster, and the cluster has its own temp folder.
    assert joined["init_args"]["address"] == "ray://10.0.0.5:10001"
    assert not {"num_cpus", "num_gpus", "_temp_dir"} & set(joined["init_args"])
    assert joined["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.5}


def test_a_slow_ray_start_is_retried_then_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from sandbox.simulate import SimulationError, start_ray

    ray = types.ModuleType("ray")  # a stand-in: importing the real Ray costs seconds, and nothing here starts it
    monkeypatch.setitem(sys.modules, "ray", ray)

    calls: list[dict] = []

    def flaky(**kw: object) -> None:
        calls.append(kw)
        if len(calls) < 4:
            raise Exception("The current node timed out during startup. This could happen because ...")

    ray.init = flaky  # type: ignore[attr-defined]
    ray.is_initialized = lambda: False  # type: ignore[attr-defined]
    start_ray({"num_cpus": 2})
    assert len(calls) == 4 and calls[-1]["num_cpus"] == 2 and "PYTHONPATH" in calls[-1]["runtime_env"]["env_vars"]

    calls.clear()
    ray.init = lambda **kw: (_ for _ in ()).throw(Exception("The current node timed out\nx"))  # type: ignore[attr-defined]
    with pytest.raises(SimulationError, match=r"^could not start a local Ray \(5 tries\): Exception: The current node "
                                              r"timed out$"):
        start_ray({"num_cpus": 2})
    with pytest.raises(SimulationError, match=r"could not start 10\.0\.0\.5:6379 \(1 tries\)"):
        start_ray({"address": "10.0.0.5:6379"})  # a cluster that cannot be joined is not retried
