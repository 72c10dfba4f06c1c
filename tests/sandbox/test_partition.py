"""Dirichlet(α) partitions of the synthetic pool (sandbox.partition)."""

from __future__ import annotations

import json
import math

import pytest

from sandbox.partition import dirichlet_counts, write_partition
from sandbox.synthetic import family_rows


def _family_train(n: int) -> list[list[dict]]:
    return [train for _, train, _ in family_rows(n, 1, seed=1)]


def _skew(counts: list[list[int]]) -> float:
    """Mean over sites of the share of the site's rows in its largest class (1/classes = IID, 1 = one class)."""
    return sum(max(c) / sum(c) for c in counts) / len(counts)


def test_sizes_sum_to_the_pool_and_every_site_gets_a_row() -> None:
    sizes = [40, 40, 40, 40, 40]
    for alpha in (0.01, 0.1, 1.0, 100.0, math.inf):
        counts = dirichlet_counts(sizes, 100, alpha, seed=3)
        assert len(counts) == 100
        assert [sum(site[c] for site in counts) for c in range(5)] == sizes
        assert min(sum(site) for site in counts) >= 1, alpha


def test_small_alpha_is_skewed_and_large_alpha_is_close_to_iid() -> None:
    sizes = [200] * 5
    skewed = _skew(dirichlet_counts(sizes, 20, 0.1, seed=0))
    iid = _skew(dirichlet_counts(sizes, 20, 1e4, seed=0))
    exact = _skew(dirichlet_counts(sizes, 20, math.inf, seed=0))
    assert skewed > 0.7  # most of a site's rows are one family
    assert iid < 0.3 and exact == pytest.approx(0.2)  # 5 classes: about a fifth each
    # Per-site class counts of a large alpha are within a few rows of the equal split (10 per class per site).
    assert all(abs(k - 10) <= 3 for site in dirichlet_counts(sizes, 20, 1e4, seed=0) for k in site)


def test_deterministic_with_the_seed_and_different_across_seeds() -> None:
    sizes = [30, 30, 30, 30, 30]
    assert dirichlet_counts(sizes, 10, 0.5, seed=7) == dirichlet_counts(sizes, 10, 0.5, seed=7)
    assert dirichlet_counts(sizes, 10, 0.5, seed=7) != dirichlet_counts(sizes, 10, 0.5, seed=8)


def test_refuses_more_sites_than_rows_and_a_bad_alpha() -> None:
    with pytest.raises(ValueError, match="cannot give 11 sites at least one row each from 10 rows"):
        dirichlet_counts([5, 5], 11, 1.0, seed=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_counts([5, 5], 2, 0.0, seed=0)


def test_write_partition_files(tmp_path) -> None:
    p = write_partition(tmp_path / "a", n_sites=12, alpha=0.3, seed=1, rows_per_site=5, heldout_per_class=4)
    assert [x.name for x in p.site_paths] == [f"site-{i}.jsonl" for i in range(12)]
    rows = [[json.loads(line) for line in x.read_text().splitlines()] for x in p.site_paths]
    assert [len(r) for r in rows] == list(p.sizes) and sum(p.sizes) == 60 and min(p.sizes) >= 1
    # Each site's rows are of the classes its counts say (a family's answers never occur in another family).
    answers = [{r["messages"][1]["content"] for r in x} for x in _family_train(60)]
    for site_rows, counts in zip(rows, p.counts, strict=True):
        assert [sum(r["messages"][1]["content"] in a for r in site_rows) for a in answers] == list(counts)
    heldout = [json.loads(line) for line in p.heldout_path.read_text().splitlines()]
    assert len(heldout) == 5 * 4  # the union of every family's held-out split
    meta = json.loads((tmp_path / "a" / "partition.json").read_text())
    assert meta["counts"] == [list(c) for c in p.counts] and len(meta["classes"]) == 5
    again = write_partition(tmp_path / "b", n_sites=12, alpha=0.3, seed=1, rows_per_site=5, heldout_per_class=4)
    assert [x.read_bytes() for x in again.site_paths] == [x.read_bytes() for x in p.site_paths]
    assert again.heldout_path.read_bytes() == p.heldout_path.read_bytes()
