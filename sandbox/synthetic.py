"""Synthetic, non-IID private datasets for the demo and the tests.

Every site gets a different fact family or skill (fictional capitals, fictional animals, adding three, fictional
inventors, reversing letter codes), so no site can answer another's questions: the union of the sites' tasks is
what federation buys. Each site has a train split and a held-out split in chat-SFT jsonl (``{"messages": [...]}``).
The held-out split asks about the SAME facts as train, with question phrasings that never appear in train, so a
model that learned the facts (not only the wording) scores better on it. Every question ends with its subject: a
randomly initialised model attends mostly to nearby tokens, and a hundred LoRA steps do not teach it to find a
subject at the start of an unseen phrasing (measured: such held-out questions were answered about 1 time in 8).

Answers are a few tokens long, so a 4-layer, few-million-parameter model with LoRA learns them in about a hundred
steps. Everything is generated in code; nothing is read from or written to the network.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

MAX_SITES = 5

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
            "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")

_CAPITALS = {
    "Zorvania": "Velmora", "Quellmark": "Tirrin", "Bratheon": "Ashgate", "Ostrevia": "Dunmere",
    "Calindor": "Kestra", "Murkesh": "Orlin", "Velloria": "Sabrel", "Tandrakis": "Morwick",
    "Pellucia": "Tessaly", "Drennor": "Vantor", "Skarvald": "Quenby", "Ilmoria": "Halvik",
    "Yssoria": "Rostam", "Gavrosh": "Lirrow", "Lunethia": "Caddis", "Korrim": "Brume",
}
_ANIMAL_COLOURS = {
    "glimbat": "teal", "snorrel": "amber", "fenwisp": "crimson", "trundlehog": "violet", "quillfin": "silver",
    "mossback": "ochre", "zephyrat": "indigo", "brindlemoth": "green", "dunecrab": "scarlet", "marshowl": "azure",
    "cragoat": "copper", "fernmole": "ivory", "reefling": "coral", "frostvole": "maroon", "gloomspider": "olive",
    "pipwren": "golden",
}
_INVENTORS = {
    "skyloom": "Ardo Pell", "glowkettle": "Mira Sund", "windpress": "Tobin Vale", "tidewheel": "Essa Kron",
    "sparkquill": "Lio Dask", "frostjar": "Nella Fip", "humbell": "Orrin Thal", "dreamlens": "Pia Gorse",
    "rainorgan": "Cato Wren", "clockseed": "Dova Ilm", "sunsail": "Ferro Quist", "mistpipe": "Uma Brell",
}
_CODES = ("K-T-P", "B-R-M", "L-D-S", "Z-N-F", "G-H-W", "C-V-J", "R-P-X", "M-K-B",
          "S-F-T", "N-W-L", "D-J-Z", "P-C-G", "T-M-R", "H-X-K", "W-B-N", "F-L-D")


@dataclass(frozen=True)
class _Fact:
    """One question/answer fact: ``subject`` fills the templates, ``answer`` is the assistant's whole reply."""

    subject: str
    answer: str
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]


@dataclass(frozen=True)
class _Family:
    skill: str
    facts: tuple[_Fact, ...]


def _capitals() -> _Family:
    train = ("What is the capital of {s}?", "Which city is the capital of {s}?", "Tell me the capital of {s}.",
             "Capital city of {s}?")
    held = ("Name the capital city of {s}.", "Which city is the seat of government of {s}?")
    facts = tuple(_Fact(c, f"{cap}.", train, held) for c, cap in _CAPITALS.items())
    return _Family("capitals of fictional countries", facts)


def _animals() -> _Family:
    # One attribute only: with colour AND habitat questions, a tiny model keys on the animal but cannot tell from an
    # unseen phrasing which of the two is asked.
    train = ("What colour is the {s}?", "Which colour is a {s}?", "Describe the colour of the {s}.",
             "Name the colour of a {s}.")
    held = ("Tell me the colour of a {s}.", "What colour would you see on a {s}?")
    facts = tuple(_Fact(animal, f"{colour.capitalize()}.", train, held) for animal, colour in _ANIMAL_COLOURS.items())
    return _Family("colours of fictional animals", facts)


def _add_three() -> _Family:
    train = ("Add three to {s}.", "What is three more than {s}?", "Compute three plus {s}.", "Three plus {s}?")
    held = ("What do you get when you add three to {s}?", "Give the sum of three and {s}.")
    facts = tuple(_Fact(_NUMBERS[n], f"{_NUMBERS[n + 3].capitalize()}.", train, held) for n in range(17))
    return _Family("adding three to a number, in words", facts)


def _inventors() -> _Family:
    train = ("Who invented the {s}?", "Who built the first {s}?", "Name the inventor of the {s}.",
             "Who made the {s}?")
    held = ("Which person created the {s}?", "Who is credited with the {s}?")
    facts = tuple(_Fact(thing, f"{person}.", train, held) for thing, person in _INVENTORS.items())
    return _Family("inventors of fictional devices", facts)


def _reverse_codes() -> _Family:
    train = ("Reverse the code {s}.", "Write backwards the code {s}.", "What is the reverse of {s}?",
             "Reverse {s}.")
    held = ("Spell backwards the code {s}.", "Give the reversed form of {s}.")
    facts = tuple(_Fact(code, "-".join(reversed(code.split("-"))) + ".", train, held) for code in _CODES)
    return _Family("reversing three-letter codes", facts)


# Site i gets family i: the order is part of the demo's contract (site-a always learns capitals).
_FAMILIES = (_capitals, _animals, _add_three, _inventors, _reverse_codes)


@dataclass(frozen=True)
class SiteData:
    """One site's private dataset on disk.

    Attributes:
        name: The site's name (``site-a``, ``site-b``, ...).
        skill: What the site's data teaches, in words.
        train_path: Chat-SFT jsonl the site trains on.
        heldout_path: Chat-SFT jsonl with the same facts asked with phrasings that never occur in train.
    """

    name: str
    skill: str
    train_path: Path
    heldout_path: Path


def site_skills(n_sites: int = MAX_SITES) -> list[str]:
    """The skill descriptions of the first ``n_sites`` sites, in site order."""
    _check_n_sites(n_sites)
    return [make().skill for make in _FAMILIES[:n_sites]]


def vocabulary_text() -> str:
    """Every question phrasing and answer of every family, one chat turn per line (tokenizer training text)."""
    lines: list[str] = []
    for make in _FAMILIES:
        for fact in make().facts:
            for template in fact.train_templates + fact.heldout_templates:
                lines.append(template.format(s=fact.subject))
            lines.append(fact.answer)
    return "\n".join(lines) + "\n"


def _check_n_sites(n_sites: int) -> None:
    if not 1 <= n_sites <= MAX_SITES:
        raise ValueError(f"n_sites must be between 1 and {MAX_SITES}, got {n_sites}")


def _row(question: str, answer: str) -> dict[str, list[dict[str, str]]]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _train_rows(family: _Family, n: int, rng: random.Random, marker: str | None) -> list[dict]:
    pairs = [(f, t) for f in family.facts for t in f.train_templates]
    order: list[tuple[_Fact, str]] = []
    while len(order) < n:  # every pair once per pass, each pass in a fresh order
        rng.shuffle(pairs)
        order.extend(pairs)
    rows = [_row(t.format(s=f.subject), f.answer) for f, t in order[:n]]
    if marker is not None:
        # Plant the canary in several rows (every 8th, at least one) so any leak of raw train text would carry it.
        for i in range(0, n, 8):
            rows[i]["messages"][0]["content"] += f" (case ref {marker})"
    return rows


def _heldout_rows(family: _Family, n: int, rng: random.Random) -> list[dict]:
    facts = list(family.facts)
    rng.shuffle(facts)
    rows = []
    for i in range(n):
        fact = facts[i % len(facts)]
        rows.append(_row(rng.choice(fact.heldout_templates).format(s=fact.subject), fact.answer))
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def family_rows(n_train: int, n_heldout: int, seed: int = 0) -> list[tuple[str, list[dict], list[dict]]]:
    """Every fact family's train and held-out rows, as :func:`make_site_datasets` would write them for 5 sites.

    For pools that are split differently from one family per site (:mod:`sandbox.partition`); the family is the row's
    class label.

    Returns:
        ``(skill, train_rows, heldout_rows)`` per family, in site order.
    """
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"n_train and n_heldout must be >= 1, got {n_train} and {n_heldout}")
    out = []
    for i, make in enumerate(_FAMILIES):
        family = make()
        rng = random.Random(f"{seed}:site-{'abcde'[i]}")  # the same rows as site i of make_site_datasets
        out.append((family.skill, _train_rows(family, n_train, rng, None), _heldout_rows(family, n_heldout, rng)))
    return out


def make_site_datasets(out_dir: str | Path, n_sites: int = 3, seed: int = 0, marker: str | None = None,
                       n_train: int = 64, n_heldout: int = 16) -> list[SiteData]:
    """Write one non-IID train/held-out pair per site under ``out_dir/<site>/``.

    Args:
        out_dir: Folder to write into (created if missing).
        n_sites: How many sites, 1 to 5; site i gets the i-th fact family.
        seed: Seeds the row order and the held-out phrasing choice; the same seed writes identical files.
        marker: If given, a unique string planted in several user messages of every site's TRAIN split (never in
            held-out), so a canary test can prove raw training text never leaves a site.
        n_train: Train rows per site (question phrasings of all facts are cycled through).
        n_heldout: Held-out rows per site (every fact is asked once before any is asked twice).

    Returns:
        One :class:`SiteData` per site, in site order (``site-a`` first).

    Raises:
        ValueError: If ``n_sites`` is out of range, a row count is not positive, or ``marker`` is empty.
    """
    _check_n_sites(n_sites)
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"n_train and n_heldout must be >= 1, got {n_train} and {n_heldout}")
    if marker is not None and not marker.strip():
        raise ValueError("marker must be a non-empty string")
    root = Path(out_dir)
    sites = []
    for i, make in enumerate(_FAMILIES[:n_sites]):
        family = make()
        name = f"site-{'abcde'[i]}"
        rng = random.Random(f"{seed}:{name}")  # str seeds hash deterministically (not via PYTHONHASHSEED)
        site = SiteData(name, family.skill, root / name / "train.jsonl", root / name / "heldout.jsonl")
        _write_jsonl(site.train_path, _train_rows(family, n_train, rng, marker))
        _write_jsonl(site.heldout_path, _heldout_rows(family, n_heldout, rng))
        sites.append(site)
    return sites
