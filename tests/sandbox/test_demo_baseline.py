"""The demo shows what federation buys: local-only baselines beside the federated model, no never-trained column.

The default run checks the parts in seconds (the baseline trains with the site trainer and reports the trainer's
steps; the shared benchmark is only what the sites' data covers; the comparison rows). The ``slow`` test runs the
whole demo in its real setting and checks its results file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coordinator.rounds.adapter import init_adapter
from fedcommon.tomlconfig import load_toml
from sandbox import localfed
from sandbox.demo import DemoConfig, RoundView, comparison, constant_zero_columns, run_demo
from sandbox.local_only import federation_task, run_local_only


def _view(r: int, shared: dict[str, float]) -> RoundView:
    return RoundView(r, "closed", {}, {"site-a": (1.0, 10.0), "site-b": (3.0, 30.0)}, 0.0, shared, "ok")


def test_the_demo_runs_only_the_benchmark_the_sites_data_trains(tmp_path: Path) -> None:
    fed = localfed.prepare(tmp_path, tmp_path, n_sites=3, rounds=1, shared_eval={"every_k_rounds": 1})  # demo's data
    benches = load_toml(fed.federation_toml)["evaluation"]["benchmarks"]
    assert [b["name"] for b in benches] == ["general_qa"]
    # Every reference answer is a reply the sites' own training data gives.
    answers = {json.loads(line)["messages"][-1]["content"] for s in fed.sites for line in s.train_path.open()}
    qa = [json.loads(line) for f in Path(benches[0]["local_path"]).glob("*.jsonl") for line in f.open()]
    assert qa and {q["answer"] for q in qa} <= answers


def test_a_column_that_reads_zero_every_round_is_named() -> None:
    views = [_view(1, {"general_qa": 0.0, "general_mcq": 0.0}), _view(2, {"general_qa": 0.5, "general_mcq": 0.0})]
    assert constant_zero_columns(views) == ["general_mcq"]


def test_comparison_rows_score_every_model_on_the_union() -> None:
    views = [_view(1, {})]
    local = {"site-a": {"steps": 4, "heldout": {"site-a": [0.5, 10.0], "site-b": [5.0, 30.0]}}}
    rows = comparison(views, {"site-a": (8.0, 10.0), "site-b": (8.0, 30.0)}, {"site-a": 4, "site-b": 4}, local)
    assert [r["model"] for r in rows] == ["initial adapter", "federated", "local-only site-a"]
    assert rows[1]["union_heldout_loss"] == pytest.approx((1.0 * 10 + 3.0 * 30) / 40)
    assert rows[2]["union_heldout_loss"] == pytest.approx((0.5 * 10 + 5.0 * 30) / 40)
    assert rows[2]["steps"] == {"site-a": 4}


def test_the_baseline_trains_the_federations_task_with_the_site_trainer(tiny_model_dir: Path, tmp_path: Path) -> None:
    fed = localfed.prepare(tmp_path, tiny_model_dir, n_sites=2, rounds=2, n_train=8, n_heldout=2,
                           training={"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "seed": 7},
                           lora={"rank": 4, "alpha": 8.0, "target_modules": ["q_proj"]})
    task, state = federation_task(fed.federation_toml)
    assert (task.training.max_steps, task.training.per_device_batch_size, task.training.seed) == (2, 4, 7)
    from coordinator.config import load_federation_config

    init = init_adapter(tiny_model_dir, load_federation_config(fed.federation_toml).lora)  # the coordinator's round 1
    assert task.adapter_spec == init.spec and all(torch.equal(state[k], init.state[k]) for k in init.state)
    site = fed.sites[0]
    out = run_local_only(fed.federation_toml, tiny_model_dir, site.train_path,
                         {s.name: s.heldout_path for s in fed.sites}, tmp_path / "work")
    assert out["steps_per_round"] == [2, 2] and out["steps"] == 4  # the trainer's own count, 2 rounds x 2 steps
    assert set(out["heldout"]) == {"site-a", "site-b"} and all(t > 0 for _, t in out["heldout"].values())


@pytest.mark.slow
def test_the_demo_compares_federated_with_each_site_alone(tmp_path: Path) -> None:
    """The demo as README runs it (3 sites, 4 rounds, 30 steps, evaluation every round)."""
    path = run_demo(DemoConfig(workdir=tmp_path / "demo"))
    assert path.is_dir()
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    sites = ["site-a", "site-b", "site-c"]
    rows = {r["model"]: r for r in results["comparison"]}
    fed = rows["federated"]
    assert set(fed["heldout"]) == set(sites) and set(fed["steps"]) == set(sites)
    for s in sites:
        local = rows[f"local-only {s}"]
        assert set(local["heldout"]) == set(sites)  # scored on the union of the held-out tasks
        # Steps as the trainers reported them: each site alone did exactly the work that site did in the federation.
        assert local["steps"] == {s: fed["steps"][s]} and fed["steps"][s] == 4 * 30
    assert results["constant_zero_columns"] == []
    shared = [r["shared"] for r in results["rounds"] if r["shared"]]
    assert shared and all(any(r.get(b, 0.0) != 0.0 for r in shared) for b in shared[0])
