"""Synthetic site datasets: non-IID across sites, held-out phrasing unseen in train, canary planted in train only."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.synthetic import MAX_SITES, make_site_datasets, site_skills, vocabulary_text
from site_agent.training.data import load_sft

MARKER = "CANARY-7f3a9c1e-d0not-leak"


def questions(path: Path) -> list[str]:
    return [row["messages"][0]["content"] for row in load_sft(path)]


def answers(path: Path) -> set[str]:
    return {row["messages"][-1]["content"] for row in load_sft(path)}


def test_sites_get_different_skills_and_disjoint_facts(tmp_path: Path) -> None:
    # Execute
    sites = make_site_datasets(tmp_path, n_sites=MAX_SITES)

    # Assert
    assert [s.name for s in sites] == ["site-a", "site-b", "site-c", "site-d", "site-e"]
    assert len({s.skill for s in sites}) == MAX_SITES
    assert [s.skill for s in sites] == site_skills()
    for i, a in enumerate(sites):
        for b in sites[i + 1:]:
            assert not set(questions(a.train_path)) & set(questions(b.train_path)), (a.name, b.name)
            assert not answers(a.train_path) & answers(b.train_path), (a.name, b.name)


def test_heldout_asks_the_same_facts_with_unseen_phrasings(tmp_path: Path) -> None:
    # Execute
    sites = make_site_datasets(tmp_path, n_sites=MAX_SITES, n_train=64, n_heldout=16)

    # Assert
    for site in sites:
        train_rows, held_rows = load_sft(site.train_path), load_sft(site.heldout_path)
        assert (len(train_rows), len(held_rows)) == (64, 16)
        assert not set(questions(site.heldout_path)) & set(questions(site.train_path)), site.name
        assert answers(site.heldout_path) <= answers(site.train_path), site.name  # same facts
        assert len(answers(site.heldout_path)) > 1


def test_capital_facts_are_consistent_between_train_and_heldout(tmp_path: Path) -> None:
    # Prepare: worked by hand from the capitals table
    site_a = make_site_datasets(tmp_path, n_sites=1, n_heldout=16)[0]

    # Execute
    train = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in load_sft(site_a.train_path)}
    held = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in load_sft(site_a.heldout_path)}

    # Assert
    assert train["What is the capital of Zorvania?"] == "Velmora."
    zorvania = [a for q, a in held.items() if "Zorvania" in q]
    assert zorvania == ["Velmora."]


def test_marker_is_in_every_sites_train_split_only(tmp_path: Path) -> None:
    # Execute
    sites = make_site_datasets(tmp_path, n_sites=MAX_SITES, marker=MARKER, n_train=20)

    # Assert
    for site in sites:
        planted = [q for q in questions(site.train_path) if MARKER in q]
        assert len(planted) == 3, site.name  # rows 0, 8 and 16 of 20
        assert MARKER not in site.heldout_path.read_text(), site.name


def test_no_marker_means_no_marker_text(tmp_path: Path) -> None:
    # Execute
    sites = make_site_datasets(tmp_path, n_sites=2)

    # Assert
    assert all("case ref" not in s.train_path.read_text() for s in sites)


def test_same_seed_same_files_other_seed_other_order(tmp_path: Path) -> None:
    # Execute
    a = make_site_datasets(tmp_path / "a", seed=3)
    b = make_site_datasets(tmp_path / "b", seed=3)
    c = make_site_datasets(tmp_path / "c", seed=4)

    # Assert
    assert [s.train_path.read_bytes() for s in a] == [s.train_path.read_bytes() for s in b]
    assert [s.train_path.read_bytes() for s in a] != [s.train_path.read_bytes() for s in c]


def test_answers_are_short_and_covered_by_the_tokenizer_text(tmp_path: Path) -> None:
    # Prepare
    text = vocabulary_text()

    # Execute
    sites = make_site_datasets(tmp_path, n_sites=MAX_SITES)

    # Assert
    for site in sites:
        for row in load_sft(site.train_path) + load_sft(site.heldout_path):
            question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
            assert len(answer.split()) <= 2
            assert question in text and answer in text


@pytest.mark.parametrize("kwargs", [{"n_sites": 0}, {"n_sites": 6}, {"n_train": 0}, {"marker": " "}])
def test_bad_arguments_are_refused(kwargs: dict, tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        make_site_datasets(tmp_path, **kwargs)
