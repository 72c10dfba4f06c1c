"""Release gate: thresholds and regression against the last published version; a blocked publication is recorded
with its reason (and shown by ``fedbridge-admin releases``); a non-regressing version is published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from coord_helpers import LORA, config, run_federation, small_delta

from coordinator.release.gate import decide, last_published
from coordinator.rounds.adapter import AdapterInit, init_adapter
from coordinator.rounds.store import Store
from sandbox.benchmarks import make_shared_benchmark

THRESHOLDS = {"general_qa": 0.5, "general_mcq": 0.0}


# -- the rule, with values worked out by hand -----------------------------------------------------------------------
def test_passes_at_or_above_thresholds_without_previous_version() -> None:
    d = decide({"general_qa": 0.5, "general_mcq": 0.0}, THRESHOLDS, 0.05, None)
    assert d.passed and d.reason == "" and d.previous_version is None
    assert [(c.benchmark, c.passed) for c in d.checks] == [("general_mcq", True), ("general_qa", True)]


def test_blocks_below_threshold() -> None:
    d = decide({"general_qa": 0.49, "general_mcq": 0.9}, THRESHOLDS, 0.05, None)
    assert not d.passed
    assert d.reason == "general_qa: 0.4900 < threshold 0.5000"


def test_blocks_regression_beyond_tolerance_and_passes_within() -> None:
    previous = (3, {"general_qa": 0.90, "general_mcq": 0.40})
    blocked = decide({"general_qa": 0.84, "general_mcq": 0.40}, THRESHOLDS, 0.05, previous)  # drop 0.06 > 0.05
    assert not blocked.passed and blocked.previous_version == 3
    assert blocked.reason == "general_qa: 0.8400 regressed by 0.0600 from v3's 0.9000 (tolerance 0.0500)"
    within = decide({"general_qa": 0.86, "general_mcq": 0.40}, THRESHOLDS, 0.05, previous)  # drop 0.04
    assert within.passed
    better = decide({"general_qa": 0.95, "general_mcq": 0.41}, THRESHOLDS, 0.0, previous)
    assert better.passed


def test_only_gated_benchmarks_count() -> None:
    d = decide({"general_qa": 0.9, "general_mcq": 0.0, "other": 0.0}, {"general_qa": 0.5}, 0.0, (1, {"other": 1.0}))
    assert d.passed


def test_no_scores_block_and_no_gate_passes() -> None:
    d = decide(None, THRESHOLDS, 0.0, None, evaluation_error="EvaluationError: metric BLEU could not be computed")
    assert not d.passed and "evaluation failed: EvaluationError: metric BLEU" in d.reason
    assert not decide({"general_mcq": 0.3}, THRESHOLDS, 0.0).passed  # a gated benchmark without a score
    assert decide(None, {}, 0.0).passed  # no thresholds: no gate


def test_last_published_reads_the_newest_version(tmp_path: Path) -> None:
    assert last_published(tmp_path / "none") is None
    for v, s in ((1, 0.5), (2, 0.7), (10, 0.6)):
        (tmp_path / f"v{v}").mkdir()
        (tmp_path / f"v{v}" / "provenance.json").write_text(json.dumps({"evaluation": {"scores": {"general_qa": s}}}))
    (tmp_path / ".v11.tmp-1").mkdir()  # a half-written version is not a version
    assert last_published(tmp_path) == (10, {"general_qa": 0.6})


# -- the engine: gate on the final round's stored scores, against the registry's last version ----------------------
@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[AdapterInit, Path]:
    tmp = tmp_path_factory.mktemp("gate")
    make_shared_benchmark(tmp / "bench", n_sites=2, per_family=2)
    return init_adapter(tiny_model_dir, LORA), tmp / "bench"


def _run(tmp: Path, base: Path, init: AdapterInit, bench: Path, qa_score: float, previous_qa: float | None) -> Store:
    """One round whose evaluation scores are recorded up front (no EvalScope run), with a v1 already published."""
    from sandbox.benchmarks import SharedBenchmark

    tables = SharedBenchmark(bench / "mcq", bench / "qa", ("capitals", "animal_colours"), 4, 4).benchmark_tables()
    cfg = config(tmp, base, lora={"rank": 16, "alpha": 32.0, "target_modules": ["all-linear"]},
                 evaluation={"enabled": True, "benchmarks": tables}, gate={"thresholds": THRESHOLDS, "max_regression": 0.05})
    if previous_qa is not None:
        v1 = tmp / "registry" / "fed" / "v1"
        v1.mkdir(parents=True)
        (v1 / "provenance.json").write_text(json.dumps({"evaluation": {"scores": {"general_qa": previous_qa,
                                                                                  "general_mcq": 0.0}}}))

    def prepare(store: Store) -> None:
        store.put_eval_run(1, status="ok", error="", adapter_sha256="-", seconds=0.0, work_dir=tmp,
                           scores={"general_qa": {"score": (qa_score, 4)}, "general_mcq": {"score": (0.0, 4)}},
                           primary_metrics={"general_qa": "Rouge-L-R", "general_mcq": "acc"})

    return run_federation(cfg, init, {1: {"site-a": small_delta(init, 0)}}, prepare=prepare)


def test_engine_blocks_a_regressing_version_and_records_why(setup: tuple[AdapterInit, Path], tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    init, bench = setup
    store = _run(tmp_path, tiny_model_dir, init, bench, qa_score=0.80, previous_qa=0.90)
    assert store.publications() == []
    [blocked] = store.blocked_publications()
    assert blocked["round"] == 1
    assert blocked["reason"] == "general_qa: 0.8000 regressed by 0.1000 from v1's 0.9000 (tolerance 0.0500)"
    assert blocked["detail"]["previous_version"] == 1 and blocked["detail"]["passed"] is False
    assert sorted(p.name for p in (tmp_path / "registry" / "fed").iterdir()) == ["v1"]  # nothing new written

    from typer.testing import CliRunner

    from coordinator.admin.cli import app

    result = CliRunner().invoke(app, ["releases", "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 0, result.output
    assert "blocked" in result.output and "regressed by 0.1000" in result.output


def test_engine_publishes_a_non_regressing_version(setup: tuple[AdapterInit, Path], tiny_model_dir: Path,
                                                   tmp_path: Path) -> None:
    init, bench = setup
    store = _run(tmp_path, tiny_model_dir, init, bench, qa_score=0.87, previous_qa=0.90)  # drop 0.03 <= 0.05
    assert store.blocked_publications() == []
    [pub] = store.publications()
    assert pub["version"] == 2 and Path(pub["path"]) == tmp_path / "registry" / "fed" / "v2"
    prov = json.loads((Path(pub["path"]) / "provenance.json").read_text())
    assert prov["release_gate"]["passed"] is True and prov["release_gate"]["previous_version"] == 1
    assert prov["evaluation"]["scores"] == {"general_mcq": 0.0, "general_qa": 0.87}


def test_failed_evaluation_is_recorded_and_blocks_the_gated_publication(setup: tuple[AdapterInit, Path],
                                                                       tiny_model_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.release import evaluation

    def broken(**_: object) -> None:
        raise evaluation.EvaluationError("benchmark 'general_qa': metric BLEU could not be computed")

    monkeypatch.setattr(evaluation, "evaluate_adapter", broken)
    init, bench = setup
    from sandbox.benchmarks import SharedBenchmark

    tables = SharedBenchmark(bench / "mcq", bench / "qa", ("capitals",), 2, 2).benchmark_tables()
    cfg = config(tmp_path, tiny_model_dir, lora={"rank": 16, "alpha": 32.0, "target_modules": ["all-linear"]},
                 evaluation={"enabled": True, "benchmarks": tables}, gate={"thresholds": {"general_qa": 0.5}})
    store = run_federation(cfg, init, {1: {"site-a": small_delta(init, 0)}})
    [run] = store.eval_runs()
    assert run["status"] == "failed" and "BLEU could not be computed" in run["error"]
    assert store.eval_scores() == {} and store.publications() == []
    [blocked] = store.blocked_publications()
    assert blocked["reason"].startswith("no scores for gated benchmarks ['general_qa']: evaluation failed: "
                                        "EvaluationError: benchmark 'general_qa': metric BLEU")


def test_config_refuses_a_gate_on_what_is_not_evaluated(tmp_path: Path) -> None:
    from fedcommon.tomlconfig import ConfigError

    bench = make_shared_benchmark(tmp_path / "b", n_sites=1, per_family=1)
    tables = bench.benchmark_tables()
    with pytest.raises(ConfigError, match="needs evaluation.enabled"):
        config(tmp_path, tmp_path, gate={"thresholds": {"general_qa": 0.5}})
    with pytest.raises(ConfigError, match="'mmlu' is not one of evaluation.benchmarks"):
        config(tmp_path, tmp_path, evaluation={"enabled": True, "benchmarks": tables}, gate={"thresholds": {"mmlu": 0.5}})
    with pytest.raises(ConfigError, match=r"gate.thresholds.general_qa.*\[0, 1\]"):
        config(tmp_path, tmp_path, evaluation={"enabled": True, "benchmarks": tables}, gate={"thresholds": {"general_qa": 2}})
    with pytest.raises(ConfigError, match="needs the folder"):
        config(tmp_path, tmp_path, evaluation={"enabled": True, "benchmarks": [{"name": "general_qa"}]})
    with pytest.raises(ConfigError, match="'BLEU2' is not one of"):
        config(tmp_path, tmp_path, evaluation={"enabled": True, "benchmarks": [
            {"name": "general_qa", "local_path": str(bench.qa_dir), "metrics": ["BLEU2"]}]})
    with pytest.raises(ConfigError, match="lists no benchmark"):
        config(tmp_path, tmp_path, evaluation={"enabled": True})
