"""A real coordinator in-process: a federation directory made by ``init``/``enroll-site``, the round engine and the
FederationService and SecAggService on a grpc.aio server with mutual TLS on 127.0.0.1, its event loop in a background
thread. Pass ``secure_aggregation=SecureAggregationSpec(enabled=True, ...)`` to run secure aggregation; ``restart``
starts a fresh engine and server on the same state directory (a coordinator restart).

Tests talk to it with ordinary synchronous gRPC stubs holding the enrolled sites' kit certificates, so every call
crosses the real TLS handshake, the servicer and the engine.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.config import FederationConfig, TlsSpec
from coordinator.rounds.adapter import AdapterInit
from coordinator.rounds.engine import RoundEngine
from coordinator.rounds.store import Store
from coordinator.server import build_server, server_credentials
from coordinator.trust.enrolment import InitOptions, default_ca_dir, init_federation
from fedcommon import tensors
from fedcommon.manifest import Manifest
from protos import codec
from protos.codec import MAX_MESSAGE
from protos.fedbridge.v1 import admin_service_pb2_grpc as apb_grpc
from protos.fedbridge.v1 import federation_service_pb2 as pb
from protos.fedbridge.v1 import federation_service_pb2_grpc as pb_grpc
from sandbox.localfed import enrol_by_csr
from sandbox.tiny_model import build_tiny_model

T = TypeVar("T")
FED = "fed"


def small_init() -> AdapterInit:
    state = {"l.lora_A.weight": torch.ones(2, 4), "l.lora_B.weight": torch.zeros(4, 2)}
    return AdapterInit(state, tensors.make_adapter_spec(state, 2, 4.0, 0.0, ["l"]))


def delta(a: float = 0.1, b: float = 0.1) -> dict[str, torch.Tensor]:
    return {"l.lora_A.weight": torch.full((2, 4), a), "l.lora_B.weight": torch.full((4, 2), b)}


class LiveCoordinator:
    """Federation dir + real coordinator. ``sites`` are enrolled (region EU-DE / EU-FR / ...)."""

    def __init__(self, root: Path, sites: tuple[str, ...] = ("site-a", "site-b"), **cfg_over: Any) -> None:
        self.root = Path(root)
        # A real (cached) base: init resolves the LoRA target names and probes the chat template against it.
        base = build_tiny_model(cache_dir=os.environ.get("FEDBRIDGE_CACHE") or None)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base_sha = Manifest.of_dir(base).sha256
        self.fed = self.root / "federation"
        init_federation(self.fed, InitOptions(federation_id=FED, base_model=base, hosts=("localhost", "127.0.0.1"),
                                              port=1, min_sites=2))
        regions = ("EU-DE", "EU-FR", "EU-NL", "US-CA")
        self.ca_dir = default_ca_dir(self.fed)
        self.kits = {s: self.enrol(s, regions[i % len(regions)]) for i, s in enumerate(sites)}
        opts: dict[str, Any] = dict(federation_id=FED, base_model=base, state_dir=self.root / "state",
                                    registry_dir=self.root / "published", rounds=2, min_sites=2,
                                    tls=TlsSpec(self.fed / "ca.pem", self.fed / "coordinator" / "server.pem",
                                                self.fed / "coordinator" / "server.key"),
                                    enrolment_registry=self.fed / "enrolment.json", crl=self.fed / "crl.pem",
                                    long_poll_ms=20_000)
        opts.update(cfg_over)
        self.cfg = FederationConfig(**opts)
        self.init = small_init()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.engine, self.server, self.port = self.run(self._start())
        self._channels: list[grpc.Channel] = []

    def enrol(self, site: str, region: str) -> Path:
        """The CSR flow: the site makes its keys in its own kit folder, the CA signs its CSR, the site installs."""
        return enrol_by_csr(self.fed, self.ca_dir, self.root / "site-kits" / site, site, region)

    async def _start(self) -> tuple[RoundEngine, grpc.aio.Server, int]:
        store = Store(self.cfg.state_dir)
        engine = RoundEngine(self.cfg, store, self.base_sha, self.init)
        server = build_server(self.cfg, engine)  # every service, behind the same request guard as `serve`
        port = server.add_secure_port("127.0.0.1:0", server_credentials(self.cfg))
        await server.start()
        await engine.start()
        return engine, server, port

    def run(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the coordinator's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 30) -> T:
        """Run a plain function on the coordinator's loop (e.g. ``engine.revoke_site``)."""
        async def wrap() -> T:
            return fn()
        return self.run(wrap(), timeout)  # type: ignore[no-any-return]

    def stub(self, cert: Path, key: Path) -> pb_grpc.FederationServiceStub:
        creds = grpc.ssl_channel_credentials(root_certificates=(self.fed / "ca.pem").read_bytes(),
                                             private_key=key.read_bytes(), certificate_chain=cert.read_bytes())
        ch = grpc.secure_channel(f"127.0.0.1:{self.port}", creds,
                                 options=[("grpc.max_send_message_length", MAX_MESSAGE)])
        self._channels.append(ch)
        return pb_grpc.FederationServiceStub(ch)

    def admin_stub(self, kit: Path) -> apb_grpc.AdminServiceStub:
        """An AdminService stub with the admin kit in ``kit`` (``client.pem`` / ``client.key``)."""
        creds = grpc.ssl_channel_credentials(root_certificates=(self.fed / "ca.pem").read_bytes(),
                                             private_key=(kit / "client.key").read_bytes(),
                                             certificate_chain=(kit / "client.pem").read_bytes())
        ch = grpc.secure_channel(f"127.0.0.1:{self.port}", creds)
        self._channels.append(ch)
        return apb_grpc.AdminServiceStub(ch)

    def site_stub(self, site: str) -> pb_grpc.FederationServiceStub:
        kit = self.kits[site]
        return self.stub(kit / "client.pem", kit / "client.key")

    def signing_key(self, site: str) -> Ed25519PrivateKey:
        key = serialization.load_pem_private_key((self.kits[site] / "signing.key").read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return key

    def update(self, site: str, state: dict[str, torch.Tensor] | None = None, /, *, round: int = 1,
               key: Ed25519PrivateKey | None = None, **env_over: Any) -> tuple[pb.SignedEnvelope, bytes]:
        """A signed update for ``site`` (``env_over`` overrides envelope fields before signing)."""
        payload = tensors.encode_state(state if state is not None else delta())
        env = codec.make_envelope(federation_id=FED, round=round, site=site, base_model_sha256=self.base_sha,
                                  payload=payload, adapter_spec_sha256=self.init.spec.sha256, num_examples=10)
        for k, v in env_over.items():
            setattr(env, k, v)
        return codec.sign_envelope(env, key or self.signing_key(site)), payload

    def audit_records(self) -> list[dict[str, Any]]:
        from fedcommon.auditlog import read_records
        return read_records(self.cfg.state_dir / "audit.jsonl")

    async def _stop(self) -> None:
        await self.server.stop(grace=0.5)
        tasks = [t for t in (self.engine._watch, *self.engine._tasks) if t is not None]  # SecAgg ticker, advances
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.engine.store.close()

    def _stop_engine(self) -> None:
        self.run(self._stop())

    def restart(self) -> None:
        """Stop the engine and server, then start new ones on the same state (the port changes)."""
        self._stop_engine()
        self.engine, self.server, self.port = self.run(self._start())

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        self._stop_engine()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def upload_messages(signed: pb.SignedEnvelope, payload: bytes, chunk: int = 1 << 20
                    ) -> Iterator[pb.UploadUpdateRequest]:
    first = True
    for off, data in codec.iter_chunks(payload, chunk):
        yield pb.UploadUpdateRequest(envelope=signed if first else None, offset=off, data=data)
        first = False
