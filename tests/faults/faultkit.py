"""What every fault case shares: the small deterministic federation, its published adapter, and the check that no
accepted update was lost or counted twice.

The federation (:func:`prepare`) is two sites, two rounds of four steps on the project's tiny model, fixed seeds,
no evaluation. Training is deterministic on CPU given the same inputs (the crash-resume tests rely on it too), so a
fault that only delays or repeats bytes must publish exactly the reference run's adapter (:func:`assert_same_adapter`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.rounds.store import Store
from fedcommon.auditlog import read_records, verify
from sandbox import localfed

FEDERATION_ID = "faults"
ROUNDS = 2
SITES = ("site-a", "site-b")
TRAINING = {"max_steps": 4, "batch_size": 4, "learning_rate": 3e-3, "max_length": 64}
LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


def prepare(root: Path, base: Path, **over: Any) -> localfed.LocalFederation:
    """The fault suite's federation under ``root`` (``over`` overrides :func:`sandbox.localfed.prepare` arguments;
    anything that changes training makes the run incomparable with the reference)."""
    args: dict[str, Any] = dict(n_sites=len(SITES), rounds=ROUNDS, federation_id=FEDERATION_ID, training=TRAINING,
                                lora=LORA, n_train=16, n_heldout=4)
    args.update(over)
    return localfed.prepare(root, base, **args)


def site_extra(coordinator: str | None = None, **more: Any) -> dict[str, Any]:
    """``site.toml`` overrides: ``coordinator`` (e.g. a :class:`proxy.FaultProxy`'s ``127.0.0.1:<port>``; the TLS
    name stays 127.0.0.1, the coordinator certificate's address, so TLS is end-to-end through the proxy)."""
    return {**({"coordinator": coordinator} if coordinator else {}), **more}


def published(fed: localfed.LocalFederation) -> dict[str, torch.Tensor]:
    """The one published version's adapter tensors."""
    from safetensors.torch import load_file

    versions = sorted((fed.registry_dir / FEDERATION_ID).glob("v*"))
    assert [v.name for v in versions] == ["v1"], versions
    return load_file(str(versions[0] / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Bit-for-bit equality of two adapters (same tensor names, dtypes, shapes and values)."""
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@dataclass(frozen=True)
class Accepted:
    """One accepted update as the coordinator recorded it."""

    round: int
    site: str
    trained_round: int
    payload_sha256: str
    num_examples: int


def assert_each_update_once(fed: localfed.LocalFederation, expected: list[tuple[int, str]] | None = None
                            ) -> list[Accepted]:
    """No accepted update lost or counted twice, from the coordinator's own records.

    - the store holds at most one update per (site, trained round), each nonce once;
    - every closed round's aggregate counted exactly the updates stored for it (its ``info``: the fresh updates by
      site and the late ones by (site, trained round), with the same hashes and example counts, so the weight sum
      the aggregate used equals the sum over the accepted updates);
    - the audit log is not tampered with and has exactly one ``update_accepted`` per stored update, with the same hash;
    - with ``expected``: the stored updates are exactly these (round, site) pairs (default: every site in every
      round of a finished federation).

    Returns the accepted updates.
    """
    store = Store(fed.state_dir)
    try:
        rows = store.updates()
        rounds = store.rounds()
        nonces = [bytes(n) for (n,) in store._q("SELECT nonce FROM updates")]
    finally:
        store.close()
    got = [Accepted(u.round, u.site, u.trained_round, u.payload_sha256, u.num_examples) for u in rows]
    twice = [k for k, n in Counter((a.site, a.trained_round) for a in got).items() if n > 1]
    assert not twice, f"updates stored twice: {twice}"
    assert len(set(nonces)) == len(nonces), "an envelope nonce is stored twice"
    if expected is None:
        expected = [(r.round, s) for r in rounds for s in SITES]
    assert sorted((a.round, a.site) for a in got) == sorted(expected), (got, expected)
    for r in rounds:
        if r.state != "closed":
            continue
        mine = [a for a in got if a.round == r.round]
        fresh = {a.site: (a.payload_sha256, a.num_examples) for a in mine if a.trained_round == r.round}
        late = sorted((a.site, a.trained_round, a.payload_sha256, a.num_examples) for a in mine
                      if a.trained_round != r.round)
        counted = {s: (u["payload_sha256"], u["num_examples"]) for s, u in r.info.get("updates", {}).items()}
        counted_late = sorted((u["site"], u["trained_round"], u["payload_sha256"], u["num_examples"])
                              for u in r.info.get("late_updates", []))
        assert counted == fresh, f"round {r.round} aggregated {counted}, the store holds {fresh}"
        assert counted_late == late, f"round {r.round} aggregated late {counted_late}, the store holds {late}"
        assert sum(n for _, n in counted.values()) == sum(a.num_examples for a in mine if a.trained_round == r.round)
    audit = fed.state_dir / "audit.jsonl"
    report = verify(audit)
    assert not report.tampered, report  # a kill mid-append (CRASH) is repaired by the next writer, never tampering
    accepted = Counter((r["fields"]["site"], r["fields"]["round"], r["fields"]["payload_sha256"])
                       for r in read_records(audit) if r["event"] == "update_accepted")
    want = Counter((a.site, a.trained_round, a.payload_sha256) for a in got)
    assert accepted == want, f"audit log update_accepted {dict(accepted)} vs store {dict(want)}"
    return got


def wait_until(cond: Callable[[], bool], fed: localfed.LocalFederation, timeout: float, what: str,
               may_exit: tuple[str, ...] = (), poll: float = 0.02) -> None:
    """Poll ``cond`` until true; fail early (with the logs) if a process other than ``may_exit`` exits."""
    deadline = time.monotonic() + timeout
    while not cond():
        for name, p in fed.procs.items():
            if name not in may_exit and p.poll() is not None:
                raise AssertionError(f"{name} exited ({p.returncode}) while waiting for {what}:\n"
                                     + fed.diagnostics((name, "coordinator")))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout}s:\n" + fed.diagnostics(("coordinator", *SITES)))
        time.sleep(poll)


def log_text(fed: localfed.LocalFederation, name: str) -> str:
    path = fed.log_path(name)
    return path.read_text(errors="replace") if path.exists() else ""


def finish(fed: localfed.LocalFederation, timeout: float = 300) -> None:
    """Wait for every site and the coordinator to exit 0; fail at once (with the logs) when one exits non-zero."""
    names = [*SITES, "coordinator"] if all(s in fed.procs for s in SITES) else [*fed.procs]
    deadline = time.monotonic() + timeout
    while True:
        codes = {n: fed.procs[n].poll() for n in names}
        bad = [n for n, rc in codes.items() if rc not in (None, 0)]
        if bad:
            raise AssertionError(f"{bad} exited non-zero {codes}:\n" + fed.diagnostics((*bad, "coordinator")))
        if all(rc == 0 for rc in codes.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"still running after {timeout}s: {codes}\n" + fed.diagnostics(("coordinator", *SITES)))
        time.sleep(0.2)
