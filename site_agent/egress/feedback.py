"""The error-feedback residual of compressed updates, kept durably in the site's work_dir.

A compressed update leaves out ``residual = (delta + previous residual) - decode(encode(delta + previous residual))``;
the site adds it to its next round's delta, so the quantisation error does not accumulate over rounds.

Crash safety: the residual of round ``r`` is written atomically (:func:`fedcommon.durable.write_durable`, a
safetensors file named by the federation, the round and the adapter spec) *before* round ``r``'s update is
signed and sent, and it is only consumed when a later round starts: round ``t`` uses the newest residual of a round
``< t``. Round ``r``'s own residual never feeds a retry of round ``r`` (a kill before the upload leaves the older
residual in place, which the retry uses again), so a residual is applied at most once per round that reaches the
coordinator and is never dropped silently. Residuals of older rounds are removed once a newer one is written.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import torch

from fedcommon import tensors
from fedcommon.durable import write_durable
from protos import codec

log = logging.getLogger(__name__)
DIRNAME = "compress_feedback"
_NAME = re.compile(r"r(\d{10})-([0-9a-f]{16})\.safetensors")


class FeedbackStore:
    """Residuals of one federation under ``<work_dir>/compress_feedback/<sha256(federation_id)[:16]>/``.

    Args:
        work_dir: The site's work directory.
        federation_id: The federation the residuals belong to (another federation never sees them).
        spec_sha256: The adapter spec (with its compression) they were computed under; another spec starts afresh.
    """

    def __init__(self, work_dir: str | Path, federation_id: str, spec_sha256: str) -> None:
        self.dir = Path(work_dir) / DIRNAME / hashlib.sha256(federation_id.encode()).hexdigest()[:16]
        self.spec = spec_sha256[:16]

    def _rounds(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = _NAME.fullmatch(p.name)
            if m and m.group(2) == self.spec:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def load_before(self, round: int) -> tuple[int, dict[str, torch.Tensor] | None]:
        """The newest residual of a round before ``round``: ``(its round, tensors)``, or ``(0, None)``.

        Raises:
            ValueError: The file is unreadable (named, so the operator can remove it; nothing is guessed).
        """
        older = [(r, p) for r, p in self._rounds() if r < round]
        if not older:
            return 0, None
        r, p = older[-1]
        try:
            return r, tensors.decode_state(p.read_bytes())
        except (OSError, codec.CodecError) as e:
            raise ValueError(f"compression residual {p} is unreadable ({e}); remove it to start the error feedback "
                             "afresh") from None

    def save(self, round: int, residual: dict[str, torch.Tensor]) -> Path:
        """Write ``round``'s residual atomically, then remove those of rounds before the one it was built on."""
        path = self.dir / f"r{round:010d}-{self.spec}.safetensors"
        self.dir.mkdir(parents=True, exist_ok=True)
        write_durable(path, tensors.encode_state(residual))
        # Keep the residual this one was built on (the newest older one) until a later round starts: a retry of
        # ``round`` needs it. Older ones can go.
        older = [p for r, p in self._rounds() if r < round]
        for p in older[:-1]:
            p.unlink(missing_ok=True)
        return path
