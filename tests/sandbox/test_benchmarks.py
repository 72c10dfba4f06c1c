"""The demo's shared benchmark: every site's family, EvalScope's local formats, held-out phrasings, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.benchmarks import SUBSETS, make_shared_benchmark
from sandbox.synthetic import make_site_datasets


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_covers_every_site_family_in_evalscope_local_formats(tmp_path: Path) -> None:
    bench = make_shared_benchmark(tmp_path, n_sites=3, per_family=4)
    assert bench.subsets == SUBSETS[:3] == ("capitals", "animal_colours", "add_three")
    assert (bench.n_mcq, bench.n_qa) == (12, 12)
    sites = make_site_datasets(tmp_path / "sites", n_sites=3)
    for subset, site in zip(bench.subsets, sites, strict=True):
        train = rows(site.train_path)
        answers = {r["messages"][-1]["content"] for r in train}
        train_questions = {r["messages"][0]["content"] for r in train}
        for r in rows(bench.mcq_dir / f"{subset}_val.jsonl"):
            assert set(r) == {"id", "question", "A", "B", "C", "D", "answer"}
            options = [r[k] for k in "ABCD"]
            assert len(set(options)) == 4 and all(o + "." in answers for o in options)  # distractors: same family
            assert r["question"] not in train_questions
        qa = rows(bench.qa_dir / f"{subset}.jsonl")
        assert len(qa) == 4 and all(set(r) == {"question", "answer"} for r in qa)
        assert all(r["answer"] in answers and r["question"] not in train_questions for r in qa)


def test_mcq_answer_letter_points_at_the_fact(tmp_path: Path) -> None:
    bench = make_shared_benchmark(tmp_path, n_sites=1, per_family=16)
    [site] = make_site_datasets(tmp_path / "sites", n_sites=1, n_train=200)
    # Every question ends with its subject; the site's train split holds each subject's answer.
    facts = {r["messages"][0]["content"].rstrip("?.").split()[-1]: r["messages"][-1]["content"].rstrip(".")
             for r in rows(site.train_path)}
    mcq = rows(bench.mcq_dir / "capitals_val.jsonl")
    assert len(mcq) == 16 == len(facts)
    for r in mcq:
        assert r[r["answer"]] == facts[r["question"].rstrip("?.").split()[-1]]
    assert len({r["answer"] for r in mcq}) > 1  # the right option is not always in the same place


def test_same_seed_same_files_and_bad_arguments(tmp_path: Path) -> None:
    a = make_shared_benchmark(tmp_path / "a", seed=3)
    b = make_shared_benchmark(tmp_path / "b", seed=3)
    assert (a.qa_dir / "capitals.jsonl").read_bytes() == (b.qa_dir / "capitals.jsonl").read_bytes()
    assert (a.mcq_dir / "add_three_val.jsonl").read_bytes() == (b.mcq_dir / "add_three_val.jsonl").read_bytes()
    with pytest.raises(ValueError):
        make_shared_benchmark(tmp_path, n_sites=6)
    with pytest.raises(ValueError):
        make_shared_benchmark(tmp_path, per_family=0)
