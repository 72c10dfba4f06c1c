"""The demo's shared benchmark: EvalScope custom datasets that ask about every site's facts.

Each site of the demo learns one fact family (:mod:`sandbox.synthetic`); no site sees another's. The coordinator judges
every merged model on the same benchmark, which covers the families of all sites, so its scores rise only as far as
federation brings the sites' knowledge together. Two local datasets, in EvalScope's offline formats:

- ``general_mcq``: ``<subset>_val.jsonl`` rows ``{"id", "question", "A".."D", "answer"}``; the distractors are other
  answers of the same family, so only the fact itself tells them apart.
- ``general_qa``: ``<subset>.jsonl`` rows ``{"question", "answer"}``, the answer being the site's exact reply, scored
  by Rouge (recall of the reference's tokens).

Subsets are the fact families (``capitals``, ``animal_colours``, ...), so EvalScope reports a score per family too.
Questions use the held-out phrasings, never the training ones: the benchmark measures the facts, not the wording.
The prompt templates are English (EvalScope's defaults are Chinese). Everything is generated here; nothing is read
from the network.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox import synthetic

# One subset name per fact family, in the order of ``synthetic._FAMILIES`` (site i learns family i).
SUBSETS = ("capitals", "animal_colours", "add_three", "inventors", "reverse_codes")

MCQ_PROMPT = ("Answer the following multiple choice question. Reply in the form 'ANSWER: [LETTER]' where [LETTER] is "
              "one of {letters}.\n\n{choices}\n\n{question}")
QA_PROMPT = "{question}"


@dataclass(frozen=True)
class SharedBenchmark:
    """The generated datasets on disk.

    Attributes:
        mcq_dir: Folder of ``<subset>_val.jsonl`` files (``general_mcq`` ``local_path``).
        qa_dir: Folder of ``<subset>.jsonl`` files (``general_qa`` ``local_path``).
        subsets: Subset names, one per covered fact family.
        n_mcq: Multiple-choice questions in all.
        n_qa: Open questions in all.
    """

    mcq_dir: Path
    qa_dir: Path
    subsets: tuple[str, ...]
    n_mcq: int
    n_qa: int

    def benchmark_tables(self, names: tuple[str, ...] = ("general_mcq", "general_qa")) -> list[dict[str, Any]]:
        """The ``[[evaluation.benchmarks]]`` entries of ``federation.toml`` that run this benchmark.

        Args:
            names: Which formats to run. The sandbox's sites train only the open-question form, so the demo runs
                ``general_qa`` alone: no site ever learns to answer ``ANSWER: <letter>``, and ``general_mcq`` would
                read 0 after every round whatever the sites learned.
        """
        tables = {
            "general_mcq": {"name": "general_mcq", "local_path": str(self.mcq_dir), "subsets": list(self.subsets),
                            "prompt_template": MCQ_PROMPT},
            "general_qa": {"name": "general_qa", "local_path": str(self.qa_dir), "subsets": list(self.subsets),
                           "prompt_template": QA_PROMPT, "metrics": ["Rouge"]},
        }
        unknown = [n for n in names if n not in tables]
        if unknown:
            raise ValueError(f"unknown shared benchmark(s) {unknown}; there are {sorted(tables)}")
        return [tables[n] for n in names]


def _families(n_sites: int) -> list[Any]:
    if len(SUBSETS) != len(synthetic._FAMILIES):  # a family was added to synthetic.py without a subset name here
        raise RuntimeError(f"sandbox.benchmarks.SUBSETS names {len(SUBSETS)} families, synthetic has "
                           f"{len(synthetic._FAMILIES)}")
    if not 1 <= n_sites <= synthetic.MAX_SITES:
        raise ValueError(f"n_sites must be between 1 and {synthetic.MAX_SITES}, got {n_sites}")
    return [make() for make in synthetic._FAMILIES[:n_sites]]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_shared_benchmark(out_dir: str | Path, n_sites: int = 3, per_family: int = 4, seed: int = 0) -> SharedBenchmark:
    """Write the shared benchmark for the first ``n_sites`` fact families under ``out_dir``.

    Args:
        out_dir: Folder to write ``mcq/`` and ``qa/`` into (created if missing).
        n_sites: Families to cover: those of the demo's first ``n_sites`` sites.
        per_family: Questions per family in each format (distinct facts, at most the family's size).
        seed: Seeds the choice of facts, phrasings, distractors and the correct option's position.

    Returns:
        The written :class:`SharedBenchmark`.

    Raises:
        ValueError: If ``n_sites`` is out of range or ``per_family`` is not positive.
    """
    if per_family < 1:
        raise ValueError(f"per_family must be >= 1, got {per_family}")
    root = Path(out_dir)
    mcq_dir, qa_dir = root / "mcq", root / "qa"
    n_mcq = n_qa = 0
    families = _families(n_sites)
    for subset, family in zip(SUBSETS[:len(families)], families, strict=True):
        rng = random.Random(f"{seed}:{subset}")
        facts = list(family.facts)
        rng.shuffle(facts)
        answers = sorted({f.answer.rstrip(".") for f in family.facts})
        mcq, qa = [], []
        for i, fact in enumerate(facts[:per_family]):
            right = fact.answer.rstrip(".")
            options = rng.sample([a for a in answers if a != right], 3) + [right]
            rng.shuffle(options)
            question = rng.choice(fact.heldout_templates).format(s=fact.subject)
            mcq.append({"id": f"{subset}-{i}", "question": question, **dict(zip("ABCD", options, strict=True)),
                        "answer": "ABCD"[options.index(right)]})
            qa.append({"question": rng.choice(fact.heldout_templates).format(s=fact.subject), "answer": fact.answer})
        _write_jsonl(mcq_dir / f"{subset}_val.jsonl", mcq)
        _write_jsonl(qa_dir / f"{subset}.jsonl", qa)
        n_mcq, n_qa = n_mcq + len(mcq), n_qa + len(qa)
    return SharedBenchmark(mcq_dir, qa_dir, SUBSETS[:len(families)], n_mcq, n_qa)
