"""The uniform interface: building strategies from config, refusals at start, streaming, state and clipping."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
from agg_helpers import adapter, assert_state_close, fedsb_adapter, updates_from

from strategies import fedadam, fedavg, fedex_lora, hetlora
from strategies.protocol import Accumulator, BulkAccumulator, Strategy
from strategies.registry import (
    DEFAULT_STRATEGY,
    BatchStrategy,
    StreamingStrategy,
    build_strategy,
    list_strategies,
)
from strategies.types import AggregationError, ClientUpdate

STREAMING = {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "ffa_lora", "fedex_lora", "hetlora",
             "fed_sb"}
LINEAR = {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "ffa_lora", "hetlora", "fed_sb"}
STATEFUL = {"fedavgm", "fedadam", "fedyogi", "fedadagrad"}


def test_every_rule_of_the_issue_is_registered_with_its_kind() -> None:
    names = list_strategies()
    assert set(names) == STREAMING | {"median", "trimmed_mean", "krum", "multikrum", "flora", "flexlora"}
    assert DEFAULT_STRATEGY == "fedavg"
    for name in names:
        s: Strategy = build_strategy(name, {})
        assert s.streaming == (name in STREAMING), name
        assert isinstance(s, StreamingStrategy if name in STREAMING else BatchStrategy)
        assert s.linear == (name in LINEAR), name
        assert s.stateful == (name in STATEFUL), name
    assert build_strategy().name == "fedavg"
    assert build_strategy("FedMedian").name == "median" and build_strategy("Trimmed-Mean").name == "trimmed_mean"


def test_params_reach_the_config_and_site_params() -> None:
    s = build_strategy("fedadam", {"eta": 1, "beta_1": 0.5, "bias_correction": False})
    assert s.config == fedadam.FedAdamConfig(eta=1.0, beta_1=0.5, bias_correction=False)
    assert build_strategy("fedprox", {"mu": 0.3}).site_params == {"proximal_mu": 0.3}
    assert build_strategy("ffa_lora", {}).site_params == {"freeze_lora_A": True}
    assert build_strategy("fedavg", {}).site_params == {}


@pytest.mark.parametrize(("name", "params", "fragment"), [
    ("fedsgd", {}, r"unknown strategy 'fedsgd'; known strategies: fed_sb, fedadagrad, fedadam"),
    ("fedadam", {"bta_1": 0.9},
     r"strategy 'fedadam': unknown parameter 'bta_1'; known parameters: beta_1, beta_2, bias_correction, clip_norm"),
    ("fedadam", {"eta": "0.1"}, r"strategy 'fedadam': parameter 'eta' must be float, got '0.1'"),
    ("fedadam", {"bias_correction": 1}, r"parameter 'bias_correction' must be bool"),
    ("krum", {"num_malicious": 1.0}, r"strategy 'krum': parameter 'num_malicious' must be int"),
    ("krum", {"num_malicious": True}, r"parameter 'num_malicious' must be int"),
    ("fedadam", {"beta_1": 1.0}, r"fedadam: beta_1 must be in \[0, 1\)"),
    ("trimmed_mean", {"beta": 0.7}, r"trimmed_mean: beta must be in \[0, 0.5\)"),
    ("hetlora", {"average_over": "some"}, r"hetlora: average_over must be one of"),
    ("fedex_lora", {"residual_dtype": "bf16"}, r"fedex_lora: residual_dtype"),
    ("fedavg", {"clip_norm": -1.0}, r"clip: max_norm"),
    ("fedavg", {"clip_norm": "big"}, r"strategy 'fedavg': parameter 'clip_norm' must be float"),
])
def test_bad_config_is_refused_naming_strategy_and_parameter(name: str, params: dict[str, object],
                                                             fragment: str) -> None:
    with pytest.raises(AggregationError, match=fragment) as info:
        build_strategy(name, params)
    assert isinstance(info.value, ValueError)


def test_state_is_threaded_through_results_and_refused_where_it_does_not_belong() -> None:
    # Prepare
    g = adapter(1)
    rounds = [updates_from([adapter(10 * r + i, scale=0.1) for i in range(3)]) for r in range(3)]
    s = build_strategy("fedadam", {"eta": 0.05})
    # Execute: the registry path and the module's pure function, side by side over three rounds.
    x, state = g, None
    y, ref_state = g, None
    for ups in rounds:
        r = s.aggregate(x, ups, state)
        x, state = r.state, r.server_state
        y, ref_state = fedadam.aggregate(y, ups, fedadam.FedAdamConfig(eta=0.05), ref_state)
    # Assert
    assert state is not None and state.step == 3
    assert_state_close(x, y, atol=0)
    with pytest.raises(AggregationError, match="'fedavg' is stateless but was given a server state"):
        build_strategy("fedavg").aggregate(g, rounds[0], state)
    with pytest.raises(AggregationError, match="produced by 'fedadam'"):
        build_strategy("fedyogi").aggregate(g, rounds[0], state)


def test_batch_strategies_have_no_accumulator() -> None:
    s = build_strategy("median")
    assert not hasattr(s, "accumulator")


@pytest.mark.parametrize("name", sorted(STREAMING))
def test_streaming_rules_hold_no_reference_to_consumed_updates(name: str) -> None:
    # Prepare: a generator that, before yielding update i, checks every earlier update has been freed.
    g = fedsb_adapter(1) if name == "fed_sb" else adapter(1, rank=2, dims=(6, 5))
    refs: list[weakref.ref[torch.Tensor]] = []

    def stream() -> Iterator[ClientUpdate]:
        for i in range(5):
            gc.collect()
            assert all(r() is None for r in refs), f"{name} kept update {[r() is not None for r in refs]}"
            d = fedsb_adapter(100 + i, scale=0.1) if name == "fed_sb" else adapter(100 + i, rank=2, dims=(6, 5), scale=0.1)
            if name == "ffa_lora":
                d = {k: torch.zeros_like(v) if ".lora_A." in k else v for k, v in d.items()}
            refs.extend(weakref.ref(v) for v in d.values())
            yield ClientUpdate(site=f"s{i}", delta=d, num_examples=i + 1)
            del d  # this generator must not keep it either

    # Execute
    result = build_strategy(name).aggregate(g, stream())
    # Assert
    assert result.info["num_updates"] == 5


def test_accumulator_equals_aggregate_and_reports_clipping() -> None:
    # Prepare
    g = adapter(1)
    ups = updates_from([adapter(i + 2, scale=s) for i, s in enumerate([0.1, 5.0, 0.1])])
    s = build_strategy("fedavg", {"clip_norm": 1.0})
    # Execute
    acc: Accumulator = s.accumulator(g)
    for u in ups:
        acc.add(u)
    streamed = acc.result()
    batch = build_strategy("median", {"clip_norm": 1.0}).aggregate(g, ups)
    # Assert
    assert_state_close(streamed.state, s.aggregate(g, ups).state, atol=0)
    assert streamed.info["clipped"] == 1 and batch.info["clipped"] == 1  # only the 5.0-scaled update exceeds 1
    unclipped = fedavg.aggregate(g, ups)
    assert any(not torch.allclose(streamed.state[k], unclipped[k]) for k in g)
    with pytest.raises(AggregationError, match="no updates"):
        s.accumulator(g).result()


def test_registry_lora_results_carry_residuals_and_selection() -> None:
    g = adapter(1, rank=2)
    ups = updates_from([adapter(i + 2, rank=2, scale=0.3) for i in range(5)])
    fedex = build_strategy("fedex_lora").aggregate(g, ups)
    state, residual = fedex_lora.aggregate(g, ups)
    assert_state_close(fedex.state, state, atol=0)
    assert fedex.base_residual.keys() == residual.keys() == {"model.layers.0.self_attn.q_proj.weight",
                                                              "model.layers.0.self_attn.v_proj.weight"}
    assert build_strategy("krum", {"num_malicious": 1}).aggregate(g, ups).info["selected"].startswith("site")
    mixed = updates_from([adapter(7, rank=1, scale=0.3), adapter(8, rank=2, scale=0.3)])
    assert_state_close(build_strategy("hetlora").aggregate(g, mixed).state, hetlora.aggregate(g, mixed), atol=0)


@pytest.mark.parametrize("name", sorted(STREAMING))
@pytest.mark.parametrize("clip", [None, 1.0])
def test_in_memory_sequence_and_lazy_generator_give_the_same_bits(name: str, clip: float | None) -> None:
    # Prepare: the key-by-key fold of a list must equal the one-at-a-time fold of a generator, bit for bit.
    g = fedsb_adapter(3) if name == "fed_sb" else adapter(3, rank=2)
    deltas = [fedsb_adapter(50 + i, scale=0.3) if name == "fed_sb" else adapter(50 + i, rank=2, scale=0.3)
              for i in range(4)]
    if name == "ffa_lora":
        deltas = [{k: torch.zeros_like(v) if ".lora_A." in k else v for k, v in d.items()} for d in deltas]
    ups = updates_from(deltas, weights=[3, 1, 4, 1])
    s = build_strategy(name, {} if clip is None else {"clip_norm": clip})
    # Execute
    from_list = s.aggregate(g, ups)
    from_gen = s.aggregate(g, (u for u in ups))
    # Assert
    assert_state_close(from_list.state, from_gen.state, atol=0)
    assert_state_close(from_list.base_residual, from_gen.base_residual, atol=0)
    assert from_list.info == from_gen.info


def test_in_memory_fold_checks_every_update_before_folding_any() -> None:
    g = adapter(3, rank=2)
    good = {k: torch.zeros_like(v) if ".lora_A." in k else v for k, v in adapter(4, rank=2).items()}
    bad = adapter(5, rank=2)
    s = build_strategy("ffa_lora")
    assert isinstance(s, StreamingStrategy)
    acc = s.accumulator(g)
    assert isinstance(acc, BulkAccumulator)
    with pytest.raises(AggregationError, match="site1"):
        acc.add_many(updates_from([good, bad]))
    assert acc.count == 0  # the good update was not folded either
    acc.add_many(updates_from([good]))
    assert acc.count == 1
    with pytest.raises(AggregationError, match="shape"):
        fedavg.aggregate(g, updates_from([good, adapter(6, rank=3)]))
