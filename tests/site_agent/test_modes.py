"""Every training mode trains the tiny model a few steps on CPU and yields only a delta of the spec.

DPO and KTO must use the round's GLOBAL model (base + global adapter) as their reference: with a global adapter
whose B is non-zero, the first step's loss is exactly the policy-equals-reference value (DPO: log 2; KTO: 0.5);
a bare-base reference would give something else.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from coordinator.config import LoraSpec
from coordinator.rounds.adapter import init_adapter
from fedcommon import tensors
from protos.fedbridge.v1 import federation_service_pb2 as pb
from sandbox.synthetic import make_site_datasets
from site_agent.training.data import load_sft
from site_agent.training.preference import REF_ADAPTER, PreferenceSiteTrainer
from site_agent.training.trainer import SftSiteTrainer

CANARY = "CANARY-7f3a-private-row"


@pytest.fixture(scope="module")
def spec_and_global(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    init = init_adapter(tiny_model_dir, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    gen = torch.Generator().manual_seed(0)
    # A trained-looking global adapter: B != 0, so base + global differs from the bare base.
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=gen) if "lora_B" in k else v.clone())
             for k, v in init.state.items()}
    return init.spec, state


def _pairs() -> list[dict[str, str]]:
    return [{"prompt": f"{CANARY} what is {i} plus three?", "chosen": f"{i + 3}", "rejected": f"{i + 5} maybe"}
            for i in range(8)]


def _kto() -> list[dict[str, object]]:
    return [{"prompt": f"{CANARY} what is {i} plus three?", "completion": f"{i + 3 if i % 2 else i + 4}",
             "label": bool(i % 2)} for i in range(8)]


def _task(spec: pb.AdapterSpec, mode: str, round: int = 1, **extra) -> pb.Task:  # type: ignore[no-untyped-def]
    return pb.Task(round=round, adapter_spec=spec, training=pb.TrainingConfig(
        mode=mode, max_steps=2, learning_rate=1e-2, per_device_batch_size=4, max_length=64, seed=0, **extra))


def _check_delta_only(delta: dict[str, torch.Tensor], spec: pb.AdapterSpec) -> None:
    tensors.check_against_spec(delta, spec)  # exactly the spec's keys, shapes, dtypes; finite
    assert sum(float(v.norm()) for v in delta.values()) > 0
    assert CANARY.encode() not in tensors.encode_state(delta)


def test_qlora_trains_lora_on_a_4bit_base(tiny_model_dir: Path, spec_and_global, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    import bitsandbytes as bnb

    spec, state = spec_and_global
    site = make_site_datasets(tmp_path / "data", n_sites=1, n_train=16, n_heldout=4)[0]
    trainer = SftSiteTrainer(tiny_model_dir, load_sft(site.train_path), tmp_path / "work", quantize=True)

    # Execute
    result = trainer.train_round(_task(spec, "qlora"), state)

    # Assert
    linear4 = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and all(m.weight.quant_type == "nf4" for m in linear4)
    assert linear4[0].weight.quant_state.nested  # double quantization
    _check_delta_only(result.delta, spec)
    assert result.tokens > 0 and math.isfinite(result.train_loss)
    with pytest.raises(ValueError, match="4-bit"):
        trainer.set_base_residual({"model.layers.0.self_attn.q_proj.weight": torch.zeros(1)})


@pytest.mark.parametrize(("mode", "first_loss"), [("dpo", math.log(2)), ("kto", 0.5)])
def test_reference_is_the_global_model(tiny_model_dir: Path, spec_and_global, tmp_path: Path, mode: str,  # type: ignore[no-untyped-def]
                                       first_loss: float) -> None:
    # Prepare
    spec, state = spec_and_global
    trainer = PreferenceSiteTrainer(tiny_model_dir, _kto() if mode == "kto" else _pairs(), tmp_path, mode)
    losses: list[float] = []

    # Execute: two rounds, so the second must re-copy the reference from its own global adapter
    first = trainer.train_round(_task(spec, mode), state, lambda s, m, loss: loss is None or losses.append(loss))
    moved = {k: v + first.delta[k] for k, v in state.items()}
    second = trainer.train_round(_task(spec, mode, round=2), moved, lambda s, m, loss: loss is None or losses.append(loss))

    # Assert
    assert losses[0] == pytest.approx(first_loss, abs=1e-5)  # round 1: policy == reference at step 1
    assert losses[2] == pytest.approx(first_loss, abs=1e-5)  # round 2: reference is round 2's global
    assert losses[1] != pytest.approx(first_loss, abs=1e-5)  # and the policy did move away from it
    _check_delta_only(first.delta, spec)
    _check_delta_only(second.delta, spec)
    assert REF_ADAPTER not in trainer.model.peft_config  # the frozen copy never outlives the round
    assert first.tokens > 0 and first.num_examples == 8


@pytest.mark.parametrize(("mode", "extra"), [("orpo", {"beta": 0.2}), ("simpo", {"beta": 2.0, "simpo_gamma": 0.3}),
                                             ("dpo", {"rpo_alpha": 1.0, "loss_type": "ipo"})])
def test_reference_free_and_variant_modes_train(tiny_model_dir: Path, spec_and_global, tmp_path: Path, mode: str,  # type: ignore[no-untyped-def]
                                                extra: dict) -> None:
    # Prepare
    spec, state = spec_and_global
    trainer = PreferenceSiteTrainer(tiny_model_dir, _pairs(), tmp_path, mode)

    # Execute
    result = trainer.train_round(_task(spec, mode, **extra), state)

    # Assert
    _check_delta_only(result.delta, spec)
    assert result.tokens > 0 and math.isfinite(result.train_loss)
    logged = trainer.last_log_history[0]
    if mode == "simpo":
        assert logged["nll_loss"] == 0.0  # pure SimPO: no behaviour-cloning term (cpo_alpha = 0)
    if mode == "dpo":
        # At step 1 policy == reference, so IPO's term is (0 - 1/(2*beta))^2 = 25 at beta 0.1; RPO adds the NLL
        # of the chosen answers (several nats for an untrained model) on top.
        assert logged["loss"] > 25.0 + 1.0


def test_ffa_and_mode_mismatch(tiny_model_dir: Path, spec_and_global, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    spec, state = spec_and_global
    trainer = PreferenceSiteTrainer(tiny_model_dir, _pairs(), tmp_path, "simpo")
    task = _task(spec, "simpo")
    task.hints.freeze_lora_a = True

    # Execute
    result = trainer.train_round(task, state)

    # Assert
    assert all(float(v.abs().sum()) == 0.0 for k, v in result.delta.items() if "lora_A" in k)
    with pytest.raises(ValueError, match="runs 'simpo'"):
        trainer.train_round(_task(spec, "dpo"), state)
