"""A site run on 2 ranks under a launcher (torchrun, or accelerate launch) is one site to the coordinator: one Join,
one update per round."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from coordinator.rounds.store import Store
from sandbox import localfed


def _events(path: Path) -> list[str]:
    return [json.loads(line)["event"] for line in path.read_text().splitlines() if line.strip()]


def _launcher(name: str, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The command prefix that starts 2 ranks of a module, and its environment."""
    if name == "torchrun":
        return [localfed.PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], {}
    accelerate = shutil.which("accelerate", path=str(Path(localfed.PY).parent))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    # --multi_gpu is accelerate's multi-process launcher (torchrun underneath), on CPU too; HF_HOME: no machine config
    return ([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
             "no", "--dynamo_backend", "no", "--main_process_port", "0"], {"HF_HOME": str(tmp_path / "hf")})


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_two_rank_site_joins_once_and_uploads_once_per_round(launcher: str, tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    # Prepare: one site, two rounds of 2 steps on a global batch of 4 (2 per rank)
    fed = localfed.prepare(tmp_path / "fed", tiny_model_dir, n_sites=1, rounds=2, min_sites=1,
                           training={"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "max_length": 48},
                           lora={"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
                           n_train=16, n_heldout=4)
    site = fed.sites[0]
    with fed:
        fed.start_coordinator()
        config = fed.write_site_config(site)

        # Execute: the agent on 2 gloo ranks, as an operator would start it
        prefix, env = _launcher(launcher, tmp_path)
        fed.procs[site.name] = localfed._spawn([*prefix, "-m", "site_agent", "run", "--config", str(config)],
                                               fed.log_path(site.name), env)
        codes = fed.wait([site.name, "coordinator"], timeout=240)

    # Assert: both ranks trained both rounds; the coordinator saw one site, once per round
    log = fed.log_path(site.name).read_text(errors="replace")
    assert codes == {site.name: 0, "coordinator": 0}, log[-4000:] + localfed._tail(fed.log_path("coordinator"))
    assert log.count("done: trained 2 round(s)") == 2, log[-3000:]  # rank 0 and rank 1 each trained both rounds
    assert log.count("[Site.Join]") == 1 and log.count("[Site.UploadUpdate]") == 2, log[-3000:]
    store = Store(fed.state_dir)
    ups = store.updates()
    # the FedAvg weight is the 16 training rows the site holds, whatever the number of ranks
    assert sorted((u.round, u.site, u.num_examples) for u in ups) == [(1, site.name, 16), (2, site.name, 16)]
    assert [s["name"] for s in store.sites()] == [site.name]
    store.close()
    coordinator_events = _events(fed.state_dir / "audit.jsonl")
    assert coordinator_events.count("site_joined") == 1
    site_events = _events(fed.root / "sites" / site.name / "work" / "audit.jsonl")  # only rank 0 writes it
    assert site_events.count("update_uploaded") == 2 and site_events.count("task_accepted") == 2
