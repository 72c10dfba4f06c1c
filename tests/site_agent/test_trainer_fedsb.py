"""The site trainer under Fed-SB: only R trains, the delta holds only the r×r R matrices, the coordinator's stock PEFT
view of the trained R scores what the site's model scores, and DP clipping and noise act on R alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.config import LoraSpec
from coordinator.rounds.adapter import init_adapter, peft_view
from fedcommon import tensors
from protos.fedbridge.v1 import federation_service_pb2 as pb
from sandbox.synthetic import make_site_datasets
from site_agent.egress.filters import apply_filters, dp_filters
from site_agent.training.data import load_sft
from site_agent.training.trainer import SftSiteTrainer
from strategies import fedsb

RANK = 4


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("trainer-fedsb")
    site = make_site_datasets(tmp / "data", n_sites=1, n_train=16, n_heldout=4)[0]
    init = init_adapter(tiny_model_dir, LoraSpec(rank=RANK, alpha=8.0, target_modules=("q_proj", "v_proj")), fed_sb=True)
    trainer = SftSiteTrainer(tiny_model_dir, load_sft(site.train_path), tmp / "work")
    return trainer, init, load_sft(site.heldout_path), tiny_model_dir


def _task(init) -> pb.Task:  # type: ignore[no-untyped-def]
    return pb.Task(round=1, training=pb.TrainingConfig(mode="sft", max_steps=3, learning_rate=5e-2,
                                                       per_device_batch_size=4, max_length=64, seed=0),
                   adapter_spec=init.spec)


def test_only_r_trains_and_the_delta_is_r_matrices_only(setup) -> None:  # type: ignore[no-untyped-def]
    trainer, init, _, _ = setup
    # Execute
    result = trainer.train_round(_task(init), init.state)
    # Assert: the payload is one [r, r] matrix per adapted module, nothing else, and it moved.
    tensors.check_against_spec(result.delta, init.spec)
    assert result.delta.keys() == init.state.keys() and all(k.endswith(".lora_R.weight") for k in result.delta)
    assert {tuple(v.shape) for v in result.delta.values()} == {(RANK, RANK)}
    assert sum(float(v.norm()) for v in result.delta.values()) > 0
    # Only the R parameters require gradients; A still holds the fixed factor after training.
    grads = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert grads and all(n.endswith("lora_B.default.parametrizations.weight.original") for n in grads)
    assert len(grads) == len(init.state)
    for name, module in trainer.model.named_modules():
        if name.endswith("q_proj") and hasattr(module, "lora_A"):
            a = module.lora_A["default"].weight
            b, want_a = fedsb.fixed_factors(name, module.lora_B["default"].weight.shape[0], a.shape[1], RANK)
            assert torch.equal(a.detach().cpu(), want_a)


def test_coordinator_view_scores_what_the_site_model_scores(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    trainer, init, heldout, base = setup
    result = trainer.train_round(_task(init), init.state)
    trained = {k: init.state[k] + result.delta[k] for k in init.state}
    site_loss, _ = trainer.evaluate(init.spec, trained, heldout)
    # Execute: the coordinator expands R into stock PEFT LoRA (lora_A = A, lora_B = B R) for evaluation and publishing.
    spec, state = peft_view(base, init.spec, trained)
    plain = SftSiteTrainer(base, [], tmp_path / "plain")
    loss, _ = plain.evaluate(spec, state, heldout)
    # Assert: the same model, so the same held-out loss; and it is not the base model's loss.
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    assert loss == pytest.approx(site_loss, abs=1e-5)
    zero_spec, zero_state = peft_view(base, init.spec, init.state)
    assert plain.evaluate(zero_spec, zero_state, heldout)[0] != pytest.approx(site_loss, abs=1e-4)


def test_dp_clips_and_noises_r_only(setup) -> None:  # type: ignore[no-untyped-def]
    trainer, init, _, _ = setup
    result = trainer.train_round(_task(init), init.state)
    raw = _norm(result.delta)
    clip = raw / 4
    # Execute
    clipped = apply_filters(result.delta, dp_filters(0.0, clip))
    noised = apply_filters(result.delta, dp_filters(0.5, clip, generator=torch.Generator().manual_seed(0)))
    # Assert: the same R keys and shapes leave; the whole R update is clipped to C (the norm of B ΔR A, B and A
    # being orthonormal), then noise of std 0.5 C is added to R's r² numbers per module only.
    for out in (clipped, noised):
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in result.delta.items()}
    assert _norm(clipped) == pytest.approx(clip, rel=1e-5)
    noise = torch.cat([(noised[k] - clipped[k]).flatten() for k in clipped]).double()
    assert float(noise.std()) == pytest.approx(0.5 * clip, rel=0.3)


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return float(sum(v.double().norm() ** 2 for v in delta.values()) ** 0.5)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral", "gemma2", "phi3", "gpt2"])
def test_coordinator_view_scores_what_the_site_scores_on_every_family(family: str, tmp_path: Path) -> None:
    """Fed-SB on the real families' shapes (fused qkv in Phi-3, Conv1D in GPT-2, tied embeddings): the stock PEFT
    adapter the coordinator publishes scores what the site's own R-only model scores."""
    import os
    import sys

    from sandbox.families import FAMILIES, build_family_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from test_architectures import CHATML

    base = build_family_model(family, cache_dir=os.environ.get("FEDBRIDGE_CACHE") or tmp_path / "cache")
    site = make_site_datasets(tmp_path / "data", n_sites=1, n_train=8, n_heldout=2)[0]
    template = CHATML if FAMILIES[family].chat_template is None else ""  # GPT-2 ships none: the federation's
    init = init_adapter(base, LoraSpec(rank=RANK, alpha=8.0), fed_sb=True)
    trainer = SftSiteTrainer(base, load_sft(site.train_path), tmp_path / "work", chat_template=template)
    result = trainer.train_round(_task(init), init.state)
    trained = {k: init.state[k] + result.delta[k] for k in init.state}
    heldout = load_sft(site.heldout_path)
    site_loss, _ = trainer.evaluate(init.spec, trained, heldout)
    spec, state = peft_view(base, init.spec, trained)
    loss, _ = SftSiteTrainer(base, [], tmp_path / "plain", chat_template=template).evaluate(spec, state, heldout)
    assert all(k.endswith(".lora_R.weight") for k in result.delta)
    assert loss == pytest.approx(site_loss, abs=1e-5)
