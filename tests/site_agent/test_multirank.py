"""A site on two ranks (gloo, DDP) trains the same round as one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from coordinator.config import LoraSpec
from coordinator.rounds.adapter import init_adapter
from fedcommon import tensors
from protos.fedbridge.v1 import federation_service_pb2 as pb
from sandbox.synthetic import make_site_datasets
from site_agent.ranks import Ranks
from site_agent.training.data import load_sft
from site_agent.training.trainer import SftSiteTrainer, per_rank_batch

REPO = Path(__file__).resolve().parents[2]

# Each rank: take the task and the global adapter from rank 0 as bytes (as the agent does), train, and rank 0 writes
# the delta. The ranks never read the task files themselves except rank 0.
RANK_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    from fedcommon import tensors
    from protos.fedbridge.v1 import federation_service_pb2 as pb
    from site_agent.ranks import Ranks
    from site_agent.training.data import load_sft
    from site_agent.training.trainer import SftSiteTrainer

    model, data, work, task_path, global_path, out = (Path(a) for a in sys.argv[1:7])
    ranks = Ranks.from_env()
    parts = ranks.broadcast_bytes([task_path.read_bytes(), global_path.read_bytes()] if ranks.is_main else None)
    task, state = pb.Task.FromString(parts[0]), tensors.decode_state(parts[1])
    trainer = SftSiteTrainer(model, load_sft(data), work / f"rank{ranks.rank}", world_size=ranks.world)
    result = trainer.train_round(task, state)
    if ranks.is_main:
        out.write_bytes(tensors.encode_state(result.delta))
        print("examples", result.num_examples, "engine", trainer.last_engine)
    ranks.close()
""")


def _task(spec: pb.AdapterSpec, batch: int) -> pb.Task:
    # lr high enough that 2 steps move the adapter well above float noise; no dropout (each rank would draw its own)
    return pb.Task(round=1, training=pb.TrainingConfig(mode="sft", max_steps=2, learning_rate=5e-2,
                                                       per_device_batch_size=batch, max_length=48, seed=3),
                   adapter_spec=spec)


def test_two_ranks_train_the_same_delta_as_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: global batch 4 = 2 per rank on 2 ranks, 2 steps
    site = make_site_datasets(tmp_path / "data", n_sites=1, n_train=8, n_heldout=2)[0]
    init = init_adapter(tiny_model_dir, LoraSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj")))
    task = _task(init.spec, batch=4)
    (tmp_path / "task.pb").write_bytes(task.SerializeToString())
    (tmp_path / "global.st").write_bytes(tensors.encode_state(init.state))
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}

    # Execute: the 2-rank run under torch's own launcher, then the 1-process run here
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "rank.py"), str(tiny_model_dir), str(site.train_path), str(tmp_path / "w2"),
                           str(tmp_path / "task.pb"), str(tmp_path / "global.st"), str(tmp_path / "delta2.st")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    torch.manual_seed(0)
    one = SftSiteTrainer(tiny_model_dir, load_sft(site.train_path), tmp_path / "w1").train_round(task, init.state)

    # Assert: the same delta (DDP averages the two half-batches' gradients), and it is not trivially zero
    two = tensors.decode_state((tmp_path / "delta2.st").read_bytes())
    assert "examples 8 engine DistributedDataParallel" in proc.stdout
    assert set(two) == set(one.delta)
    assert sum(float(v.norm()) for v in one.delta.values()) > 1e-3
    # Adam divides by the gradients' own size, so an element whose gradient is ~0 moves by ±lr on float round-off
    # of the all-reduce's summation order: compare each tensor as a whole, not element by element.
    for name, value in one.delta.items():
        assert float((two[name] - value).norm()) <= 1e-2 * float(value.norm()) + 1e-6, name


def test_one_rank_outside_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    # Execute
    ranks = Ranks.from_env()

    # Assert: no process group, and broadcasting is the identity
    assert (ranks.rank, ranks.world, ranks.is_main) == (0, 1, True)
    assert ranks.broadcast_bytes([b"task", b""]) == [b"task", b""]


def test_the_batch_must_divide_over_the_ranks() -> None:
    assert per_rank_batch(8, 4) == 2 and per_rank_batch(3, 1) == 3
    with pytest.raises(ValueError, match="batch of 6 does not divide over this site's 4 ranks"):
        per_rank_batch(6, 4)
