"""Helpers for the evaluation, gate and publishing tests: an in-process round engine on the real tiny model, with
signed site updates, and a LoRA adapter trained in a few seconds to answer the shared QA benchmark."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.config import FederationConfig, LoraSpec
from coordinator.ingress.uploads import Chunk
from coordinator.rounds.adapter import AdapterInit, peft_model_with
from coordinator.rounds.engine import RoundEngine
from coordinator.rounds.store import Store
from coordinator.trust.pki import PeerIdentity
from fedcommon import tensors
from fedcommon.manifest import Manifest
from fedcommon.tomlconfig import from_dict
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb

LORA = LoraSpec(rank=16, alpha=32.0, target_modules=("all-linear",))
FED = "fed"


class Site:
    """A site identity with its envelope-signing key."""

    def __init__(self, name: str) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.peer = PeerIdentity(name, "site", self.key.public_key(), 1, name)

    def update(self, round: int, delta: dict[str, torch.Tensor], *, base_sha: str, spec_sha: str, n: int = 10,
               epsilon: float = 0.0) -> tuple[pb.SignedEnvelope, bytes]:
        payload = tensors.encode_state(delta)
        env = codec.make_envelope(federation_id=FED, round=round, site=self.peer.name, base_model_sha256=base_sha,
                                  payload=payload, adapter_spec_sha256=spec_sha, num_examples=n)
        env.epsilon_spent = epsilon
        env.dp_delta = 1e-5 if epsilon else 0.0
        return codec.sign_envelope(env, self.key), payload


async def _chunks(signed: pb.SignedEnvelope, payload: bytes) -> AsyncIterator[Chunk]:
    first = True
    for off, data in codec.iter_chunks(payload, 1 << 20, 0):
        yield Chunk(signed if first else None, off, data)
        first = False


def config(tmp: Path, base: Path, **over: Any) -> FederationConfig:
    """A federation config as ``federation.toml`` would give it (so nested tables go through the TOML loader)."""
    data: dict[str, Any] = {"federation_id": FED, "base_model": str(base), "base_model_ref": "fedbridge/tiny-llama",
                            "state_dir": str(tmp / "state"), "registry_dir": str(tmp / "registry"),
                            "tls": {"ca": "c", "cert": "c", "key": "k"}, "rounds": 1, "min_sites": 1}
    data.update(over)
    return from_dict(FederationConfig, data, base_dir=tmp)


def run_federation(cfg: FederationConfig, init: AdapterInit, deltas: dict[int, dict[str, dict[str, torch.Tensor]]],
                   *, epsilon: dict[str, float | dict[int, float]] | None = None, prepare: Callable[[Store], None] | None = None,
                   timeout: float = 300.0) -> Store:
    """Run every round in-process: each site of ``deltas[round]`` uploads its delta; wait until the engine finished.

    ``prepare`` sees the store before the engine starts (e.g. to record evaluation scores ahead of time).
    ``epsilon`` is the cumulative ε a site reports in its envelopes: one value for every round, or one per round.
    """
    base_sha = Manifest.of_dir(cfg.base_model).sha256
    sites = {name: Site(name) for r in deltas.values() for name in r}

    async def main() -> Store:
        store = Store(cfg.state_dir)
        if prepare:
            prepare(store)
        eng = RoundEngine(cfg, store, base_sha, init)
        await eng.start()
        for r in sorted(deltas):
            while (cur := store.current_round()) is None or cur.round != r or cur.state != "open":  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polls the store, as a site's FetchTask would
            # Held while the round's sites upload, so a quorum below their number cannot close it half-way.
            eng.control.pause("test")
            for name, delta in sorted(deltas[r].items()):
                signed, payload = sites[name].update(r, delta, base_sha=base_sha, spec_sha=init.spec.sha256,
                                                     epsilon=_eps((epsilon or {}).get(name, 0.0), r))
                assert (await eng.ingress.receive_upload(sites[name].peer, _chunks(signed, payload))).accepted
            eng.control.resume("test")
        await asyncio.wait_for(eng.finished.wait(), timeout)
        return store

    return asyncio.run(main())


def _eps(value: float | dict[int, float], round: int) -> float:
    return value.get(round, 0.0) if isinstance(value, dict) else value


def train_on_qa(base: Path, init: AdapterInit, qa_dir: Path, steps: int = 40, lr: float = 3e-3) -> dict[str, torch.Tensor]:
    """Train the adapter with plain PEFT on every QA row under ``qa_dir`` (chat format, answer tokens only)."""
    from peft import get_peft_model_state_dict
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for f in sorted(qa_dir.glob("*.jsonl")) for line in f.read_text().splitlines()]
    model = peft_model_with(base, init.spec, init.state)
    model.train()
    encoded = []
    for r in rows:
        user = [{"role": "user", "content": r["question"]}]
        prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": r["answer"]}], tokenize=True,
                                       return_dict=True)["input_ids"]
        encoded.append((full, len(prompt)))
    width = max(len(f) for f, _ in encoded)
    ids = torch.full((len(encoded), width), tok.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (full, n) in enumerate(encoded):
        ids[i, :len(full)] = torch.tensor(full)
        mask[i, :len(full)] = 1
        labels[i, n:len(full)] = torch.tensor(full[n:])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def delta(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (new[k] - old[k]).contiguous() for k in old}


def small_delta(init: AdapterInit, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * scale).to(v.dtype) for k, v in init.state.items()}
