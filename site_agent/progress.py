"""A rich progress bar for a round of local training (plain log lines when stdout is not a terminal)."""

from __future__ import annotations

import logging
import sys
from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)


class RoundProgress:
    def __init__(self, site: str, round: int, total_rounds: int, steps: int, enabled: bool = True) -> None:
        self.site, self.round, self.steps = site, round, steps
        self.enabled = enabled
        self._tty = sys.stdout.isatty()
        self._progress: Progress | None = None
        self._task = None
        self._last_logged = -1
        self._desc = f"{site} round {round}/{total_rounds}"

    def __enter__(self) -> RoundProgress:
        if self.enabled and self._tty:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())
            self._progress.start()
            self._task = self._progress.add_task(self._desc, total=self.steps, loss="-")
        return self

    def update(self, step: int, total: int, loss: float | None) -> None:
        if self._progress is not None and self._task is not None:
            fields = {"loss": f"{loss:.3f}"} if loss is not None else {}
            self._progress.update(self._task, completed=step, **fields)
        elif self.enabled and loss is not None and step != self._last_logged:
            self._last_logged = step
            log.info("[Site.train] %s step %d/%d loss=%.4f", self._desc, step, total, loss)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
