"""The processes of one site: a site that outgrows one GPU runs its agent on N ranks under a launcher.

``torchrun --nproc_per_node N -m site_agent run -c site.toml`` (or ``accelerate launch``) starts N agents. Rank 0
alone talks to the coordinator (join, fetch, download, sign, upload, heartbeats) and writes the audit log and privacy
ledger; it hands each round's task to the other ranks as bytes over ``torch.distributed``, and all ranks then train
that round together (DDP, or DeepSpeed ZeRO-1/2/3, under the Trainer; FSDP is refused). Outside a launcher there
is one rank and no process group, and every call here is free.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)
# The other ranks wait on rank 0 while it long-polls for the next task, which can take as long as a round does:
# the control channel's timeout is a day, not the collectives' default of minutes.
CONTROL_TIMEOUT = datetime.timedelta(hours=24)


@dataclass
class Ranks:
    """This process's place among the site's ranks, and the channel rank 0 sends rounds over.

    Attributes:
        rank: This process's global rank (0: the one that talks to the coordinator).
        world: How many ranks train together.
    """

    rank: int = 0
    world: int = 1
    _group: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        """The ranks a launcher set up (``RANK``/``WORLD_SIZE``), joining its process group; one rank without one.

        The process group is gloo on CPU and nccl on CUDA (the Trainer reuses it for DDP); rounds travel over a
        separate gloo group, so they never pass through GPU memory.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:  # one GPU per local rank, before nccl binds the process to a device
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo")
        group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        return cls(rank=rank, world=world, _group=group)

    def broadcast_bytes(self, parts: list[bytes] | None) -> list[bytes]:
        """Rank 0 sends ``parts`` to every rank; each rank returns what rank 0 sent (other ranks pass None)."""
        if self.world == 1:
            return list(parts or [])
        import torch.distributed as dist

        box = [list(parts) if self.is_main and parts is not None else None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        out = box[0]
        if not isinstance(out, list) or not all(isinstance(p, bytes) for p in out):
            raise RuntimeError("rank 0 sent something other than a list of bytes")
        return out

    def close(self) -> None:
        """Leave the process group (the launcher's ranks all exit together after this)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
