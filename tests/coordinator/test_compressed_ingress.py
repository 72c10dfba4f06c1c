"""Ingress of compressed updates (``[lora] compression``): validated as strictly as dense ones, then decoded.

A well-formed int8 update is accepted and aggregates as its decoded values; every malformed encoding (wrong byte
length, bad scale, code or index, a dense payload) is refused with INVALID_ARGUMENT, audited, and nothing is stored;
the decoded update goes through the same norm bound as a dense one.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from coord_helpers import Site, _chunks, config, small_delta

from coordinator.config import LoraSpec
from coordinator.errors import InvalidUpdate, NormTooLarge
from coordinator.rounds.adapter import init_adapter
from coordinator.rounds.engine import RoundEngine
from coordinator.rounds.store import Store
from fedcommon import compress, tensors
from fedcommon.auditlog import read_records
from fedcommon.manifest import Manifest
from protos.fedbridge.v1 import federation_service_pb2 as pb

LORA = {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj"], "compression": "int8", "compression_block_size": 16,
        "topk_fraction": 0.25}
Enc = dict[str, torch.Tensor]


def signed_sha(signed: pb.SignedEnvelope) -> str:
    return pb.UpdateEnvelope.FromString(signed.envelope).payload_sha256


def _edit(key_suffix: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Enc], Enc]:
    def go(enc: Enc) -> Enc:
        k = sorted(x for x in enc if x.endswith(key_suffix))[0]
        return {**enc, k: fn(enc[k].clone()).contiguous()}
    return go


def _set(i: int, value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def go(t: torch.Tensor) -> torch.Tensor:
        t[i] = value
        return t
    return go


MALFORMED: dict[str, Callable[[Enc], Enc]] = {
    "q_too_short": _edit(".q", lambda t: t[:-1]),
    "absmax_nan": _edit(".absmax", _set(0, math.nan)),
    "absmax_negative": _edit(".absmax", _set(0, -1.0)),
    "int8_code_minus128": _edit(".q", _set(0, -128)),
    "idx_out_of_range": _edit(".idx", _set(-1, 1 << 30)),
    "idx_not_increasing": _edit(".idx", lambda t: t.flip(0)),
    "idx_count": _edit(".idx", lambda t: t[:-1]),
    "absmax_missing": lambda enc: {k: v for k, v in enc.items() if not k.endswith(".absmax")},
}


def test_compressed_ingress_accepts_well_formed_and_refuses_malformed(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    init = init_adapter(tiny_model_dir, LoraSpec(rank=2, alpha=4.0, target_modules=("q_proj",), compression="int8",
                                                 compression_block_size=16, topk_fraction=0.25))
    cfg = config(tmp_path, tiny_model_dir, rounds=1, min_sites=2, lora=LORA, max_update_norm=5.0)
    base_sha = Manifest.of_dir(tiny_model_dir).sha256
    spec = init.spec
    assert spec.compression.encoding == "int8"
    good, other = Site("site-a"), Site("site-b")

    async def main() -> None:
        store = Store(cfg.state_dir)
        eng = RoundEngine(cfg, store, base_sha, init)
        await eng.start()
        enc = compress.encode(small_delta(init, 1), spec.compression)
        # Execute / Assert: each malformed encoding is refused, nothing stored.
        for case, mutate in MALFORMED.items():
            signed, payload = other.update(1, mutate(enc), base_sha=base_sha, spec_sha=spec.sha256)
            with pytest.raises(InvalidUpdate) as e:
                await eng.ingress.receive_upload(other.peer, _chunks(signed, payload))
            assert e.value.status == "INVALID_ARGUMENT", case
            assert store.updates(1) == [], case
        # A dense payload to a compressed federation is refused too.
        signed, payload = other.update(1, small_delta(init, 2), base_sha=base_sha, spec_sha=spec.sha256)
        with pytest.raises(InvalidUpdate, match="outside the adapter spec"):
            await eng.ingress.receive_upload(other.peer, _chunks(signed, payload))
        # The norm bound applies to the decoded values.
        signed, payload = other.update(1, compress.encode(small_delta(init, 3, scale=10.0), spec.compression),
                                       base_sha=base_sha, spec_sha=spec.sha256)
        with pytest.raises(NormTooLarge):
            await eng.ingress.receive_upload(other.peer, _chunks(signed, payload))
        assert store.updates(1) == []
        refused = [r for r in read_records(store.dir / "audit.jsonl") if r["event"] == "update_refused"]
        assert len(refused) == len(MALFORMED) + 2
        assert [r["fields"]["status"] for r in refused] == ["INVALID_ARGUMENT"] * (len(MALFORMED) + 1) + ["OUT_OF_RANGE"]
        # A well-formed one is accepted and stored as signed (the encoded bytes).
        signed, payload = good.update(1, enc, base_sha=base_sha, spec_sha=spec.sha256)
        assert (await eng.ingress.receive_upload(good.peer, _chunks(signed, payload))).accepted
        [row] = store.updates(1)
        assert row.payload_sha256 == signed_sha(signed)
        dense = compress.decode_update(payload, spec)
        assert set(dense) == set(init.state)
        assert tensors.decode_state(payload).keys() == enc.keys()
        store.close()

    asyncio.run(main())


def test_config_refuses_compression_with_secure_aggregation_and_topk_without_a_quantiser(tiny_model_dir: Path,
                                                                                         tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lora.topk_fraction"):
        LoraSpec(topk_fraction=0.01)
    with pytest.raises(ValueError, match="lora.compression'"):
        LoraSpec(compression="int2")
    with pytest.raises(ValueError, match="lora.compression_block_size"):
        LoraSpec(compression="int8", compression_block_size=7)
    with pytest.raises(ValueError, match="SecAgg masks fixed-point values"):
        config(tmp_path, tiny_model_dir, min_sites=2, lora={"compression": "int8"},
               secure_aggregation={"enabled": True, "threshold": 2})
    config(tmp_path, tiny_model_dir, min_sites=2, secure_aggregation={"enabled": True, "threshold": 2})
    with pytest.raises(ValueError, match="strategy fed-sb"):  # Fed-SB's R matrices are not encoded
        config(tmp_path, tiny_model_dir, min_sites=2, strategy="fed-sb", lora={"compression": "int8"})
    config(tmp_path, tiny_model_dir, min_sites=2, strategy="fed-sb")
