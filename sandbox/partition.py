"""Dirichlet(α) non-IID partitions of the synthetic task data, for simulations with many virtual sites.

The pool is every fact family of :mod:`sandbox.synthetic` (capitals, animals, adding three, inventors, codes); the
family is each row's class. For each class, site shares are drawn from a symmetric Dirichlet(α) over the N sites and
the class's rows are cut by those shares (the usual label-skew partition): a small α gives each site rows of one or
two families, a large α gives every site about the same mix (α → ∞ is IID). Every site gets at least one row (a
site left empty takes one row from the largest site), the sizes sum to the pool, and the same seed writes the same
files. The held-out set is the union of the families' held-out splits: the federation is scored on every task.

Files written in ``out_dir``: ``site-{i}.jsonl`` (i = 0..N-1, chat-SFT rows), ``heldout.jsonl`` (the union held-out
set) and ``partition.json`` (the settings and each site's row count per class).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from fedcommon.durable import write_durable
from sandbox.synthetic import family_rows


@dataclass(frozen=True)
class Partition:
    """What :func:`write_partition` wrote.

    Attributes:
        out_dir: The folder.
        site_paths: ``site-{i}.jsonl`` per site, in site order.
        heldout_path: The union held-out set.
        counts: ``counts[i][c]``: rows of class ``c`` at site ``i``.
        classes: The class (skill) names, in class order.
    """

    out_dir: Path
    site_paths: tuple[Path, ...]
    heldout_path: Path
    counts: tuple[tuple[int, ...], ...]
    classes: tuple[str, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Rows per site."""
        return tuple(sum(c) for c in self.counts)


def dirichlet_counts(class_sizes: list[int], n_sites: int, alpha: float, seed: int) -> list[list[int]]:
    """Split each class's rows over ``n_sites`` by Dirichlet(α) shares; every site gets at least one row.

    Args:
        class_sizes: Rows per class.
        n_sites: Sites, at least 1 and at most the total number of rows.
        alpha: Dirichlet concentration (> 0; ``math.inf`` gives equal shares).
        seed: Seeds the draws.

    Returns:
        ``counts[i][c]``, summing over sites to ``class_sizes[c]``.

    Raises:
        ValueError: If there are fewer rows than sites, or ``n_sites`` or ``alpha`` is out of range.
    """
    import numpy as np

    total = sum(class_sizes)
    if n_sites < 1 or total < n_sites:
        raise ValueError(f"cannot give {n_sites} sites at least one row each from {total} rows")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_sites, len(class_sizes)), dtype=np.int64)
    for c, size in enumerate(class_sizes):
        shares = np.full(n_sites, 1.0 / n_sites) if math.isinf(alpha) else rng.dirichlet(np.full(n_sites, alpha))
        # Largest-remainder rounding: the cuts sum exactly to the class size.
        raw = shares * size
        base = np.floor(raw).astype(np.int64)
        order = np.argsort(-(raw - base), kind="stable")
        base[order[: size - int(base.sum())]] += 1
        counts[:, c] = base
    while (empty := np.flatnonzero(counts.sum(axis=1) == 0)).size:
        donor = int(np.argmax(counts.sum(axis=1)))  # the largest site gives up a row of its largest class
        c = int(np.argmax(counts[donor]))
        counts[donor, c] -= 1
        counts[int(empty[0]), c] += 1
    return counts.tolist()


def write_partition(out_dir: str | Path, n_sites: int, alpha: float, seed: int = 0, rows_per_site: int = 8,
                    heldout_per_class: int = 16) -> Partition:
    """Write a Dirichlet(α) partition of the synthetic pool for ``n_sites`` sites (see the module docstring).

    Args:
        out_dir: Folder to write into (created if missing).
        n_sites: Virtual sites (>= 1).
        alpha: Dirichlet concentration (> 0; ``inf`` for IID shares).
        seed: Seeds the pool's row order and the shares.
        rows_per_site: Mean train rows per site: the pool holds ``rows_per_site × n_sites`` rows, as even over the
            classes as the count allows.
        heldout_per_class: Held-out rows per class in the union held-out set.

    Returns:
        The files and each site's counts.

    Raises:
        ValueError: If an argument is out of range.
    """
    if n_sites < 1:
        raise ValueError(f"sites must be >= 1, got {n_sites}")
    if rows_per_site < 1 or heldout_per_class < 1:
        raise ValueError(f"rows_per_site and heldout_per_class must be >= 1, got {rows_per_site} and "
                         f"{heldout_per_class}")
    n_classes = len(family_rows(1, 1, seed))
    total = rows_per_site * n_sites
    class_sizes = [total // n_classes + (1 if c < total % n_classes else 0) for c in range(n_classes)]
    families = family_rows(max(class_sizes), heldout_per_class, seed)
    counts = dirichlet_counts(class_sizes, n_sites, alpha, seed)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    taken = [0] * n_classes
    paths = []
    for i, row_counts in enumerate(counts):
        rows = []
        for c, k in enumerate(row_counts):  # each class's rows are dealt out in order: no row goes to two sites
            rows.extend(families[c][1][taken[c]:taken[c] + k])
            taken[c] += k
        path = root / f"site-{i}.jsonl"
        write_durable(path, _jsonl(rows))
        paths.append(path)
    heldout = root / "heldout.jsonl"
    write_durable(heldout, _jsonl([row for _, _, held in families for row in held]))
    classes = tuple(skill for skill, _, _ in families)
    write_durable(root / "partition.json", (json.dumps({
        "sites": n_sites, "alpha": alpha if math.isfinite(alpha) else "inf", "seed": seed,
        "rows_per_site": rows_per_site, "classes": classes, "counts": counts}, indent=1) + "\n").encode())
    return Partition(root, tuple(paths), heldout, tuple(tuple(c) for c in counts), classes)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
