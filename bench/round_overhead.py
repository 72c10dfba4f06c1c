"""Round overhead of a 2-site loopback federation: (round wall time − slowest site's local training) / local training.

Round wall time is the coordinator's open-to-close time of a round (from its store). A site's local training time is
the wall time of its whole local round (load the global adapter, set up the TRL trainer, train, compute the delta),
as the site reports it. The difference is what federation costs per round: waking the sites, downloading the global
adapter, checking the base model, signing, uploading, validating, storing durably and aggregating. Round 1 also
includes each agent's one-time model load (the agent is long-lived and loads once), so it is reported apart and
the goal applies to the steady-state rounds.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from bench.report import Row, write_results
from coordinator.rounds.store import Store
from sandbox import localfed
from sandbox.tiny_model import build_tiny_model

ROUNDS = 4
STEPS = 40


def main() -> None:
    base = build_tiny_model()
    with tempfile.TemporaryDirectory(prefix="fedbridge-overhead-") as tmp:
        fed = localfed.prepare(Path(tmp), base, n_sites=2, rounds=ROUNDS,
                               training={"max_steps": STEPS, "batch_size": 8, "learning_rate": 3e-3},
                               lora={"rank": 16, "alpha": 32.0, "target_modules": ["all-linear"]})
        with fed:
            fed.start_coordinator()
            for s in fed.sites:
                fed.start_site(s, threads=1)
            codes = fed.wait([s.name for s in fed.sites] + ["coordinator"], timeout=900)
        assert set(codes.values()) == {0}, codes
        store = Store(fed.state_dir)
        per_round = []
        for r in store.rounds():
            local = {m[1]: m[4] for m in store.metrics(r.round) if m[2] == "train" and m[3] == "round_time_s"}
            wall = (r.closed_ms - r.opened_ms) / 1000  # type: ignore[operator]
            per_round.append((r.round, wall, max(local.values())))
        store.close()

    rows = []
    for rnd, wall, local in per_round:
        ratio = (wall - local) / local
        steady = rnd > 1
        rows.append(Row(f"round {rnd}{'' if steady else ' (includes one-time model load)'}: (wall - local) / local",
                        wall - local, local, ratio, "s", "<= 0.05" if steady else "informational",
                        ratio <= 0.05 if steady else True))
    steady = [(w - lt) / lt for r, w, lt in per_round if r > 1]
    mean = statistics.mean(steady)
    wall_sum = sum(w for r, w, _ in per_round if r > 1)
    local_sum = sum(lt for r, _, lt in per_round if r > 1)
    rows.append(Row(f"rounds 2-{ROUNDS} mean: (round wall - slowest local training) / local training",
                    wall_sum - local_sum, local_sum, mean, "s", "<= 0.05", mean <= 0.05))
    write_results("round_overhead", rows, [f"2 sites, {STEPS} local steps/round, 1 torch thread per site, loopback mTLS"])


if __name__ == "__main__":
    main()
