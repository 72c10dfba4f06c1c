"""The fault suite (issue #15, item 1): each case runs a small real federation (or a real coordinator) and injects
one fault; see docs/testing.md, "The fault suite".

Every test under tests/faults carries the ``faults`` marker (added here), so ``pytest -m faults`` selects the whole
suite; the long cases are also marked ``slow`` and so left out of the default run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faultkit
import pytest
import torch

from sandbox import localfed

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.faults)


@dataclass(frozen=True)
class Reference:
    """The fault-free run of :func:`faultkit.prepare`'s federation."""

    fed: localfed.LocalFederation
    adapter: dict[str, torch.Tensor]
    accepted: list[faultkit.Accepted]


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    """The fault-free federation, run once per session: its published adapter and accepted updates, which every
    deterministic case compares with bit for bit."""
    fed = faultkit.prepare(tmp_path_factory.mktemp("faults-reference"), tiny_model_dir)
    with fed:
        codes = fed.run_all(timeout=400)
    assert codes == {**dict.fromkeys(faultkit.SITES, 0), "coordinator": 0}, fed.diagnostics()
    yield Reference(fed, faultkit.published(fed), faultkit.assert_each_update_once(fed))
