"""The Flower ClientApp's glue: where a node's site comes from, and the safetensors-only wire of fedcommon.flowerwire."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402

from fedcommon import flowerwire as fw  # noqa: E402
from protos.fedbridge.v1 import federation_service_pb2 as pb  # noqa: E402
from site_agent.flower.clientapp import site_from_context  # noqa: E402


def _context(node: dict, run: dict) -> Context:
    return Context(run_id=1, node_id=2, node_config=node, state=RecordDict(), run_config=run)


def test_state_travels_as_safetensors_bytes_in_every_dtype() -> None:
    state = {"a.lora_A.weight": torch.randn(2, 3).to(torch.bfloat16), "a.lora_B.weight": torch.randn(3, 2)}
    record = fw.state_record(state)
    assert [a.stype for a in record.values()] == ["safetensors"]
    back = fw.record_state(record)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert back["a.lora_A.weight"].dtype == torch.bfloat16


def test_a_record_that_is_not_safetensors_is_refused() -> None:
    numpy_record = ArrayRecord({fw.STATE_KEY: Array(torch.zeros(3).numpy())})
    with pytest.raises(fw.FlowerWireError, match="'numpy.ndarray', not 'safetensors'"):
        fw.record_state(numpy_record, "arrays")
    garbage = ArrayRecord({fw.STATE_KEY: Array(dtype="uint8", shape=(4,), stype="safetensors", data=b"\x00" * 4)})
    with pytest.raises(fw.FlowerWireError, match="record 'arrays'"):
        fw.record_state(garbage, "arrays")
    with pytest.raises(fw.FlowerWireError, match="no 'fedbridge-task'"):
        fw.config_task(ConfigRecord({"server-round": 1}))
    task = pb.Task(federation_id="f", round=2)
    assert fw.config_task(fw.task_config(task)) == task


def test_site_comes_from_the_node_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set 'site-config'"):
        site_from_context(_context({}, {}))
    with pytest.raises(ValueError, match="run config 'partition-dir'"):
        site_from_context(_context({"partition-id": 3}, {}))
    with pytest.raises(ValueError, match=r"site-3\.jsonl does not exist"):
        site_from_context(_context({"partition-id": 3}, {"partition-dir": str(tmp_path), "base-model": "b"}))
    (tmp_path / "site-3.jsonl").write_text("{}\n")
    site = site_from_context(_context({"partition-id": 3}, {"partition-dir": str(tmp_path), "base-model": "/m",
                                                            "work-dir": str(tmp_path / "w")}))
    assert (site.name, site.train, site.base_model, site.work_dir) == (
        "site-3", tmp_path / "site-3.jsonl", Path("/m"), tmp_path / "w" / "site-3")
    toml = tmp_path / "site.toml"
    toml.write_text(f'name = "site-a"\ncoordinator = "127.0.0.1:1"\nbase_model = "{tmp_path}"\n'
                    f'work_dir = "{tmp_path / "work"}"\n[tls]\nca = "ca.pem"\ncert = "c.pem"\nkey = "k"\n'
                    f'signing_key = "s"\n[data]\ntrain = "{tmp_path / "site-3.jsonl"}"\n[dp]\nnoise_multiplier = 1.0\n'
                    'clip_norm = 0.5\n')
    site = site_from_context(_context({"site-config": str(toml)}, {}))
    assert (site.name, site.work_dir, site.dp.noise_multiplier) == ("site-a", tmp_path / "work", 1.0)
