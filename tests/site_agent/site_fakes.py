"""Fakes shared by the site agent tests."""

from __future__ import annotations


class NoHeartbeats:
    """The agent's heartbeat context without a coordinator to send to."""

    round, phase = 0, "idle"

    def __enter__(self) -> NoHeartbeats:
        return self

    def working(self, round: int, phase: str, total_steps: int = 0) -> None:
        self.round, self.phase = round, phase

    def __exit__(self, *exc: object) -> None:
        pass

    def progress(self, *a: object) -> None:
        pass
