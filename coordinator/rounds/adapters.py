"""The global adapters as each site receives them: stored bytes, cached in memory, projected to a site's rank.

:class:`Adapters` owns every in-memory copy of adapter and residual bytes and each site's declared LoRA rank; the
store (on disk) stays the source of truth, so the caches only ever save a read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from coordinator.errors import NotFound
from coordinator.rounds.store import Store
from fedcommon import tensors
from fedcommon.siterank import site_spec
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb

# Projects a global adapter state to a lower rank (HetLoRA / FlexLoRA), or None when every site trains one rank.
Projection = Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]


class Adapters:
    """Global adapters and base-weight residuals by round, and the adapter spec and bytes each site gets.

    Args:
        store: Durable state (adapters and residuals are files under its directory).
        spec: The federation's adapter spec (its rank is the federation's rank).
        init_state: The initial adapter state (its shapes give the lower-rank specs).
        project_to_site: How the global adapter is projected to a site's rank; None when ranks are not mixed.
        compress_download: Send the global adapter encoded with the spec's quantiser (``[lora] compress_download``);
            the stored global adapter stays dense and full precision.
    """

    def __init__(self, store: Store, spec: pb.AdapterSpec, init_state: dict[str, torch.Tensor],
                 project_to_site: Projection | None, compress_download: bool = False) -> None:
        self.store = store
        self.compress_download = compress_download and bool(spec.compression.encoding)
        self._encoded: dict[tuple[int, int], bytes] = {}
        self.spec = spec
        self.init_state = init_state
        self.project_to_site = project_to_site
        self._adapters: dict[int, bytes] = {}  # in-memory copies of the global adapters by round (also on disk)
        self._residuals: dict[int, bytes] = {}
        self._projected: dict[tuple[int, int], bytes] = {}
        self._site_ranks: dict[str, int] = {}
        self._specs: dict[int, pb.AdapterSpec] = {spec.rank: spec}

    def remember_rank(self, site: str, rank: int) -> None:
        """Cache the rank ``site`` declared at Join (the caller stores it first)."""
        self._site_ranks[site] = rank

    def site_rank(self, site: str) -> int:
        """The LoRA rank ``site`` trains (declared at Join and stored; the federation's rank by default)."""
        if site not in self._site_ranks:
            stored = {s["name"]: s["lora_rank"] for s in self.store.sites()}
            self._site_ranks[site] = int(stored.get(site) or self.spec.rank)
        return self._site_ranks[site]

    def spec_for(self, site: str) -> pb.AdapterSpec:
        """The adapter spec ``site`` trains: the federation's, or a lower-rank one with the same alpha/r scaling."""
        rank = self.site_rank(site)
        if rank not in self._specs:
            self._specs[rank] = site_spec(self.spec, self.init_state, rank)
        return self._specs[rank]

    def adapter_bytes(self, round: int) -> bytes:
        """The global adapter that is the input of ``round`` (``rounds + 1``: the final one)."""
        if round not in self._adapters:
            path = self.store.adapter_path(round)
            if round < 1 or not path.exists():
                raise NotFound(f"no global adapter for round {round}")
            self._adapters[round] = path.read_bytes()
        return self._adapters[round]

    def site_adapter_bytes(self, site: str, round: int) -> bytes:
        """The global adapter of ``round`` as ``site`` receives it (projected to its rank under mixed ranks)."""
        data = self.adapter_bytes(round)
        rank = self.site_rank(site)
        key = (round, rank)
        if self.project_to_site is not None and rank != self.spec.rank:
            if key not in self._projected:
                self._projected[key] = tensors.encode_state(self.project_to_site(tensors.decode_state(data), rank))
            data = self._projected[key]
        if not self.compress_download:
            return data
        if key not in self._encoded:  # deterministic: the same bytes (and hash) on every call and after a restart
            from fedcommon import compress

            self._encoded[key] = tensors.encode_state(
                compress.encode(tensors.decode_state(data), self.spec_for(site).compression, topk=False))
        return self._encoded[key]

    def residual_bytes(self, round: int) -> bytes | None:
        """The cumulative, scaled base-weight residual that is the input of ``round`` (None when there is none)."""
        if round not in self._residuals:
            path = self.store.residual_path(round)
            if not path.exists():
                return None
            self._residuals[round] = path.read_bytes()
        return self._residuals[round]

    def adapter_meta(self, site: str, round: int) -> tuple[str, int]:
        """SHA-256 and size of the adapter ``site`` receives for ``round``."""
        data = self.site_adapter_bytes(site, round)
        return codec.sha256_hex(data), len(data)

    def residual_meta(self, round: int) -> tuple[str, int]:
        """SHA-256 and size of ``round``'s residual (``("", 0)`` when there is none)."""
        data = self.residual_bytes(round)
        return ("", 0) if data is None else (codec.sha256_hex(data), len(data))
