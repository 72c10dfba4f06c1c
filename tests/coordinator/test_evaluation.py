"""Shared evaluation: EvalScope offline on the tiny model with local datasets, scores stored per round and benchmark,
and every way a score could be silently wrong refused (BLEU without punkt_tab, metric errors, unreachable hubs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from coord_helpers import LORA, config, delta, run_federation, small_delta, train_on_qa

from coordinator.config import BenchmarkSpec, EvalSpec
from coordinator.release.evaluation import (
    STRICT_CHOICE_FILTER,
    EvaluationError,
    check_benchmarks,
    check_reviews,
    ensure_punkt,
    hub_reachable,
    is_due,
    parse_report,
)
from coordinator.release.merge import MergeError, merge_to_dir
from coordinator.rounds.adapter import init_adapter, peft_model_with
from coordinator.rounds.store import Store
from sandbox.benchmarks import SharedBenchmark, make_shared_benchmark


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, SharedBenchmark, Path]:
    """One round whose global adapter was trained on the shared QA set, evaluated by the engine (one EvalScope run)."""
    tmp = tmp_path_factory.mktemp("evaluated")
    bench = make_shared_benchmark(tmp / "bench", n_sites=3, per_family=4)
    init = init_adapter(tiny_model_dir, LORA)
    trained = train_on_qa(tiny_model_dir, init, bench.qa_dir)
    cfg = config(tmp, tiny_model_dir, lora={"rank": 16, "alpha": 32.0, "target_modules": ["all-linear"]},
                 evaluation={"enabled": True, "benchmarks": bench.benchmark_tables(), "max_new_tokens": 8},
                 gate={"thresholds": {"general_qa": 0.5}})
    store = run_federation(cfg, init, {1: {"site-a": delta(trained, init.state)}})
    return store, bench, cfg.state_dir


def test_evalscope_runs_offline_and_scores_are_stored_per_round(evaluated: tuple[Store, SharedBenchmark, Path]) -> None:
    store, bench, _ = evaluated
    runs = store.eval_runs()
    assert [(r["round"], r["status"], r["error"]) for r in runs] == [(1, "ok", "")]
    assert runs[0]["primary_metrics"] == {"general_mcq": "acc", "general_qa": "Rouge-L-R"}
    scores = store.eval_scores()[1]
    assert set(scores) == {"general_mcq", "general_qa"}
    for b in scores.values():
        assert {f"subset/{s}" for s in bench.subsets} <= set(b)
        assert all(0.0 <= v <= 1.0 for v in b.values())
    # The adapter learned the QA answers (40 steps on the 12 rows): far above the untrained model's ~0.
    assert scores["general_qa"]["score"] >= 0.75
    assert scores["general_qa"]["score"] == scores["general_qa"]["Rouge-L-R"]
    # Sites never train the multiple-choice format; strict parsing gives no credit for fact-shaped replies.
    assert scores["general_mcq"]["score"] <= 0.25
    # The gate passed (general_qa >= 0.5), so the round's model was published.
    assert len(store.publications()) == 1 and store.blocked_publications() == []


def test_stored_score_is_the_mean_of_evalscope_per_sample_scores(evaluated: tuple[Store, SharedBenchmark, Path]) -> None:
    store, bench, state_dir = evaluated
    reviews = state_dir / "eval" / "round-00001" / "evalscope" / "reviews" / "merged"
    per_sample = [json.loads(line)["sample_score"]["score"]["value"]["Rouge-L-R"]
                  for f in sorted(reviews.glob("general_qa_*.jsonl")) for line in f.read_text().splitlines()]
    assert len(per_sample) == bench.n_qa == 12
    assert store.eval_scores(1)[1]["general_qa"]["score"] == pytest.approx(sum(per_sample) / len(per_sample), abs=1e-4)
    # The merged weights are deleted after the evaluation; EvalScope's reports stay.
    assert not (state_dir / "eval" / "round-00001" / "merged").exists()


def test_strict_choice_parsing_credits_only_an_explicit_answer() -> None:
    from evalscope.filters.extraction import RegexFilter

    f = RegexFilter(**STRICT_CHOICE_FILTER["regex"])
    got = f.apply(["ANSWER: B", "Ashgate.", "answer: (C) because", "ANSWER: A. No wait, ANSWER: D", "Dunmere."])
    assert got == ["B", "[no answer]", "C", "D", "[no answer]"]


def test_due_every_k_rounds_and_always_the_last() -> None:
    assert [r for r in range(1, 8) if is_due(r, 7, 3)] == [3, 6, 7]
    assert [r for r in range(1, 4) if is_due(r, 3, 1)] == [1, 2, 3]


def test_named_benchmark_unreachable_fails_with_pointer_to_local_config(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = EvalSpec(enabled=True, benchmarks=(BenchmarkSpec("mmlu"),))
    with pytest.raises(EvaluationError, match=r"mmlu.*cannot reach.*general_mcq.*local_path"):
        check_benchmarks(spec, reachable=lambda hub: False)
    check_benchmarks(spec, reachable=lambda hub: True)  # online: accepted
    (tmp_path / "mmlu").mkdir()
    check_benchmarks(EvalSpec(enabled=True, benchmarks=(BenchmarkSpec("mmlu", local_path=tmp_path / "mmlu"),)),
                     reachable=lambda hub: False)  # a local copy needs no hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable("huggingface") is False


def test_local_dataset_missing_subset_is_refused(tmp_path: Path) -> None:
    bench = make_shared_benchmark(tmp_path, n_sites=1, per_family=2)
    spec = EvalSpec(enabled=True, benchmarks=(BenchmarkSpec("general_qa", local_path=bench.qa_dir,
                                                            subsets=("capitals", "nope")),))
    with pytest.raises(EvaluationError, match="'nope'"):
        check_benchmarks(spec)


def test_bleu_without_punkt_tab_is_refused_not_scored_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    bench = make_shared_benchmark(tmp_path / "b", n_sites=2, per_family=2)
    spec = EvalSpec(enabled=True, benchmarks=(BenchmarkSpec("general_qa", local_path=bench.qa_dir, metrics=("BLEU",)),))
    with pytest.raises(EvaluationError, match="punkt_tab"):
        check_benchmarks(spec)


def test_bleu_with_locally_trained_punkt_scores_for_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nltk
    from evalscope.metrics import bleu_ngram_one_sample

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    bench = make_shared_benchmark(tmp_path / "b", n_sites=2, per_family=2)
    spec = EvalSpec(enabled=True, punkt_dir=tmp_path / "nltk",
                    benchmarks=(BenchmarkSpec("general_qa", local_path=bench.qa_dir, metrics=("BLEU", "Rouge")),))
    ensure_punkt(spec)
    assert (tmp_path / "nltk" / "tokenizers" / "punkt_tab" / "english" / "sent_starters.txt").exists()
    assert bleu_ngram_one_sample("Ardo Pell went home.", "Ardo Pell went home.")["bleu-1"] == pytest.approx(1.0)
    assert bleu_ngram_one_sample("Tirrin.", "Velmora.")["bleu-1"] == pytest.approx(0.5)  # only "." matches


def test_metric_error_in_a_review_fails_loudly(tmp_path: Path) -> None:
    row = {"sample_score": {"score": {"value": {"bleu-1": 0.0}, "metadata": {
        "metric_errors": {"BLEU": "LookupError: Resource 'punkt_tab' not found."}}}}}
    (tmp_path / "general_qa_capitals.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(EvaluationError, match=r"general_qa.*BLEU.*punkt_tab"):
        check_reviews(tmp_path, "general_qa")
    check_reviews(tmp_path, "general_mcq")  # another benchmark's files are not read


def test_incomplete_or_unavailable_report_is_refused(tmp_path: Path) -> None:
    metric = {"identity": {"name": "accuracy", "aggregation": "mean", "dimensions": {}}, "score": 0.5, "num": 4,
              "categories": [{"subsets": [{"name": "capitals", "score": 0.5, "num": 4}]}]}
    good = {"metrics": [metric], "primary_metric_identity": metric["identity"],
            "primary_metric_unavailable_reason": None, "execution_summary": {"requested": 4, "errored": 0}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(good))
    r = parse_report(path, "general_mcq")
    assert (r.primary_metric, r.score, r.num_samples, r.subsets) == ("acc", 0.5, 4, {"capitals": (0.5, 4)})
    for bad, match in ((dict(good, execution_summary={"requested": 4, "errored": 1}), "errored"),
                       (dict(good, primary_metric_unavailable_reason="judge failed"), "unavailable"),
                       (dict(good, metrics=[dict(metric, score=float("nan"))]), "finite")):
        path.write_text(json.dumps(bad))
        with pytest.raises(EvaluationError, match=match):
            parse_report(path, "general_mcq")


def test_layer_by_layer_merge_equals_peft_merge_and_adds_the_residual(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    init = init_adapter(tiny_model_dir, LORA)
    state = {k: v + d for (k, v), d in zip(init.state.items(), small_delta(init, 1, 0.05).values(), strict=True)}
    residual = {"model.layers.1.mlp.up_proj.weight": torch.full((688, 256), 0.01)}
    result = merge_to_dir(tiny_model_dir, state, rank=16, alpha=32.0, out_dir=tmp_path / "m", max_shard_bytes=4 << 20,
                          residual=residual)
    assert len(result.shards) > 1 and len(result.merged_modules) == 4 * 7
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    ref = peft_model_with(tiny_model_dir, init.spec, state).merge_and_unload().state_dict()
    ref["model.layers.1.mlp.up_proj.weight"] += 0.01
    assert ours.keys() == ref.keys()
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) < 1e-6
    with pytest.raises(MergeError, match="no tensor"):
        merge_to_dir(tiny_model_dir, {"base_model.model.nope.lora_A.weight": torch.zeros(2, 2),
                                      "base_model.model.nope.lora_B.weight": torch.zeros(2, 2)},
                     rank=2, alpha=2.0, out_dir=tmp_path / "x")
