"""The site trainer: deltas of the spec's keys and shapes, FFA-LoRA's frozen A, FedProx's pull to the global."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.config import LoraSpec
from coordinator.rounds.adapter import init_adapter
from fedcommon import tensors
from protos.fedbridge.v1 import federation_service_pb2 as pb
from sandbox.synthetic import make_site_datasets
from site_agent.training.data import load_sft
from site_agent.training.trainer import SftSiteTrainer


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("trainer")
    site = make_site_datasets(tmp / "data", n_sites=1, n_train=16, n_heldout=4)[0]
    init = init_adapter(tiny_model_dir, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    trainer = SftSiteTrainer(tiny_model_dir, load_sft(site.train_path), tmp / "work")
    return trainer, init, load_sft(site.heldout_path)


def _task(init, **hints) -> pb.Task:  # type: ignore[no-untyped-def]
    return pb.Task(round=1, training=pb.TrainingConfig(mode="sft", max_steps=3, learning_rate=1e-2,
                                                       per_device_batch_size=4, max_length=64, seed=0),
                   adapter_spec=init.spec, hints=pb.SiteHints(**hints))


def _norm(delta: dict[str, torch.Tensor], part: str) -> float:
    return float(sum(v.double().norm() ** 2 for k, v in delta.items() if part in k) ** 0.5)


def test_round_produces_delta_of_the_spec(setup) -> None:  # type: ignore[no-untyped-def]
    trainer, init, heldout = setup
    result = trainer.train_round(_task(init), init.state)
    tensors.check_against_spec(result.delta, init.spec)
    assert _norm(result.delta, "lora_B") > 0 and _norm(result.delta, "lora_A") > 0
    # The FedAvg weight is the 16 examples the site holds, not max_steps x batch (12, the same at every site).
    assert result.num_examples == 16 and result.tokens > 0 and result.train_loss > 0
    loss, tokens = trainer.evaluate(init.spec, init.state, heldout)
    assert tokens > 0 and 0 < loss < 20


def test_ffa_lora_keeps_a_frozen(setup) -> None:  # type: ignore[no-untyped-def]
    trainer, init, _ = setup
    result = trainer.train_round(_task(init, freeze_lora_a=True), init.state)
    assert _norm(result.delta, "lora_A") == 0.0
    assert _norm(result.delta, "lora_B") > 0


def test_fedprox_pulls_towards_the_global(setup) -> None:  # type: ignore[no-untyped-def]
    trainer, init, _ = setup
    free = trainer.train_round(_task(init), init.state)
    pulled = trainer.train_round(_task(init, proximal_mu=1e4), init.state)
    assert _norm(pulled.delta, "lora_") < 0.5 * _norm(free.delta, "lora_")


def test_base_residual_is_folded_and_can_be_replaced(setup) -> None:  # type: ignore[no-untyped-def]
    trainer, init, heldout = setup
    trainer.load_adapter(init.spec, init.state)
    name = "model.layers.0.self_attn.q_proj.weight"  # a LoRA-wrapped module: its weight lives in base_layer
    params = dict(trainer._base.named_parameters())
    weight = params["model.layers.0.self_attn.q_proj.base_layer.weight"]
    before = weight.detach().clone()
    before_loss, _ = trainer.evaluate(init.spec, init.state, heldout)
    residual = torch.full_like(before, 0.01)
    trainer.set_base_residual({name: residual})
    assert torch.allclose(weight, before + 0.01)
    assert trainer.evaluate(init.spec, init.state, heldout)[0] != before_loss
    trainer.set_base_residual({name: 2 * residual})  # cumulative residuals replace, never stack
    assert torch.allclose(weight, before + 0.02)
    trainer.set_base_residual({})
    assert torch.equal(weight, before)
    for bad, msg in [({"model.nope.weight": residual}, "not a weight"), ({name: residual[:1]}, "shape"),
                     ({name: residual * float("nan")}, "NaN")]:
        with pytest.raises(ValueError, match=msg):
            trainer.set_base_residual(bad)
    assert torch.equal(weight, before)


def test_weight_by_tokens_counts_the_tokens_the_loss_sees(setup) -> None:  # type: ignore[no-untyped-def]
    from site_agent.training.masking import mask_conversation

    trainer, init, _ = setup
    task = _task(init)
    task.training.weight_by = "tokens"
    result = trainer.train_round(task, init.state)
    masks = [mask_conversation(trainer.tokenizer, r["messages"]).assistant_mask[:64] for r in trainer._rows]
    assert result.num_examples == sum(sum(m) for m in masks) > 16  # assistant tokens within max_length


def _plain_heldout_loss(trainer: SftSiteTrainer, rows: list[dict]) -> tuple[float, int]:
    """The held-out loss the plain way: every row tokenised afresh, every position's logits, the scored ones picked
    by the labels."""
    from site_agent.training.masking import mask_conversation

    total, count = 0.0, 0
    trainer.model.eval()
    with torch.no_grad():
        for row in rows:
            enc = mask_conversation(trainer.tokenizer, row["messages"])
            ids = torch.tensor([enc.input_ids])
            labels = torch.tensor([[t if m else -100 for t, m in zip(enc.input_ids, enc.assistant_mask, strict=True)]])
            logits = trainer.model(input_ids=ids).logits[:, :-1]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             labels[:, 1:].reshape(-1), reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
    trainer.model.train()
    return total / count, count


def test_each_load_puts_the_state_into_the_model_and_the_state_comes_back_out(setup) -> None:  # type: ignore[no-untyped-def]
    """After the first load (through PEFT) later loads copy straight into the LoRA parameters: each must leave the
    model holding exactly that state, and adapter_state must read back what trained."""
    from peft import get_peft_model_state_dict

    trainer, init, _ = setup
    g = torch.Generator().manual_seed(5)
    for scale in (0.1, 0.2, 0.3):
        state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in init.state.items()}
        trainer.load_adapter(init.spec, state)
        held = get_peft_model_state_dict(trainer.model)
        assert held.keys() == state.keys() and all(torch.equal(held[k], state[k]) for k in state)
        out = trainer.adapter_state()
        assert all(torch.equal(out[k], state[k]) for k in state) and all(not out[k].requires_grad for k in out)
        assert all(out[k].data_ptr() != held[k].data_ptr() for k in out)  # a copy: training on cannot change it
    result = trainer.train_round(_task(init), init.state)
    held = get_peft_model_state_dict(trainer.model)
    assert all(torch.equal(result.delta[k], held[k] - init.state[k]) for k in held)


def test_heldout_loss_matches_the_plain_computation_and_follows_the_rows(setup) -> None:  # type: ignore[no-untyped-def]
    """Rows are tokenised once and only the scored positions' logits are computed; the loss must be the plain
    one, evaluated again with the same rows (cached) or with other rows (tokenised anew)."""
    trainer, init, heldout = setup
    state = {k: v + 0.05 * torch.ones_like(v) for k, v in init.state.items()}
    loss, tokens = trainer.evaluate(init.spec, state, heldout, batch_size=3)  # batches of unequal widths
    want_loss, want_tokens = _plain_heldout_loss(trainer, heldout)
    assert tokens == want_tokens and loss == pytest.approx(want_loss, rel=1e-5)
    assert trainer.evaluate(init.spec, state, heldout, batch_size=3) == (loss, tokens)
    fewer = heldout[1:3]
    part_loss, part_tokens = trainer.evaluate(init.spec, state, fewer, batch_size=3)
    want_part = _plain_heldout_loss(trainer, fewer)
    assert part_tokens == want_part[1] < tokens and part_loss == pytest.approx(want_part[0], rel=1e-5)
    assert trainer.evaluate(init.spec, init.state, heldout)[0] != pytest.approx(loss, rel=1e-4)  # the state counts


def test_heldout_loss_of_a_model_that_takes_logits_to_keep_but_not_as_a_mask(setup,  # type: ignore[no-untyped-def]
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    trainer, init, heldout = setup
    trainer.load_adapter(init.spec, init.state)  # the model exists from here on, alone as in any order
    base = trainer.model.get_base_model()
    forward = base.forward

    def its_own_way(input_ids=None, attention_mask=None, logits_to_keep=0, **kw):  # type: ignore[no-untyped-def]
        # An argument of that name that is no mask to it (here: it keeps the last position, whatever it is given);
        # asked without it, every position.
        keep = 1 if isinstance(logits_to_keep, torch.Tensor) else logits_to_keep
        return forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **kw)

    monkeypatch.setattr(base, "forward", its_own_way)
    loss, tokens = trainer.evaluate(init.spec, init.state, heldout)
    want_loss, want_tokens = _plain_heldout_loss(trainer, heldout)
    assert tokens == want_tokens and loss == pytest.approx(want_loss, rel=1e-5)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral", "gemma2", "phi3", "gpt2"])
def test_fast_loads_and_masked_heldout_loss_on_every_family(family: str, tmp_path: Path) -> None:
    """On the real families' shapes and templates (fused qkv in Phi-3, Conv1D in GPT-2, Gemma 2's soft-capped
    logits): a later load puts the state in exactly, and the loss from the scored positions' logits alone is the
    plain one."""
    import os
    import sys

    from peft import get_peft_model_state_dict

    from sandbox.families import FAMILIES, build_family_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from test_architectures import CHATML

    base = build_family_model(family, cache_dir=os.environ.get("FEDBRIDGE_CACHE") or tmp_path / "cache")
    site = make_site_datasets(tmp_path / "data", n_sites=1, n_train=8, n_heldout=6)[0]
    template = CHATML if FAMILIES[family].chat_template is None else ""  # GPT-2 ships none: the federation's
    trainer = SftSiteTrainer(base, load_sft(site.train_path), tmp_path / "work", chat_template=template)
    init = init_adapter(base, LoraSpec(rank=2, alpha=4.0, target_modules=("all-linear",)))
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in init.state.items()}
    trainer.load_adapter(init.spec, init.state)
    trainer.load_adapter(init.spec, state)  # straight into the parameters
    held = get_peft_model_state_dict(trainer.model)
    assert all(torch.equal(held[k], state[k]) for k in state)
    heldout = load_sft(site.heldout_path)
    loss, tokens = trainer.evaluate(init.spec, state, heldout, batch_size=4)
    want_loss, want_tokens = _plain_heldout_loss(trainer, heldout)
    assert tokens == want_tokens > 0 and loss == pytest.approx(want_loss, rel=1e-5)
