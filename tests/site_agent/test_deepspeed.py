"""DeepSpeed ZeRO-2 at a site: on CPU the same code path runs single-process and trains the same round as plain
PyTorch; ZeRO-3 is refused. Runs in a subprocess, because DeepSpeed sets up torch.distributed for the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from coordinator.rounds.adapter import init_adapter
    from coordinator.config import LoraSpec
    from fedcommon import tensors
    from protos.fedbridge.v1 import federation_service_pb2 as pb
    from site_agent.training.trainer import SftSiteTrainer

    base, work = Path(sys.argv[1]), Path(sys.argv[2])
    init = init_adapter(base, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    rows = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]}
            for i in range(16)]
    zero2 = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
             "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": "auto", "weight_decay": "auto"}},
             "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "train_batch_size": "auto"}
    task = pb.Task(round=1, adapter_spec=init.spec, training=pb.TrainingConfig(
        mode="sft", max_steps=3, learning_rate=1e-2, per_device_batch_size=4, max_length=64, seed=0))
    ds = SftSiteTrainer(base, rows, work / "ds", deepspeed=zero2)
    rounds = [ds.train_round(task, init.state) for _ in range(2)]  # the long-lived agent re-wraps each round
    for r in rounds:
        tensors.check_against_spec(r.delta, init.spec)
    plain = SftSiteTrainer(base, rows, work / "plain").train_round(task, init.state)
    diff = max(float((r.delta[k] - plain.delta[k]).abs().max()) for r in rounds for k in plain.delta)
    try:
        SftSiteTrainer(base, rows, work / "z3", deepspeed={"zero_optimization": {"stage": 3}})
        z3 = "accepted"
    except ValueError as e:
        z3 = str(e)
    print("RESULT " + json.dumps({"engine": ds.last_engine, "diff": diff, "zero3": z3}))
''')


def test_zero2_trains_the_same_round_as_plain_pytorch(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(Path(os.environ.get("FEDBRIDGE_CACHE", tmp_path)) / "torch_ext")}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)

    # Execute
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(tmp_path)], env=env,
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)

    # Assert
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["engine"] == "DeepSpeedEngine"
    assert result["diff"] < 1e-5
    assert "ZeRO stage 3 is not supported" in result["zero3"]
