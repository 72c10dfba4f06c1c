"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny model, built once per test session (into ``$FEDBRIDGE_CACHE`` if set, else a temp dir)."""
    from sandbox.tiny_model import TinyModelConfig, build_tiny_model

    cache = os.environ.get("FEDBRIDGE_CACHE") or tmp_path_factory.mktemp("fedbridge-cache")
    return build_tiny_model(TinyModelConfig(), cache_dir=cache)


# The longest files of the default run, longest first (measured with --durations; about 2-7 minutes each on two
# cores). Under pytest-xdist (deploy/run-tests.sh) they are handed out first, so the run never ends with one worker
# alone on a long file while the other idles (longest-processing-time-first). Files not named keep their order.
LONG_FILES = (
    "tests/integration/test_architectures.py",
    "tests/integration/test_kill_anywhere.py",
    "tests/integration/test_crash_resume.py",
    "tests/integration/test_user_errors.py",
    "tests/integration/test_admin_cli.py",
    "tests/coordinator/test_admin_pki_cli.py",
    "tests/faults/test_slow_site.py",
    "tests/deploy/test_netns.py",
    "tests/coordinator/test_evaluation.py",
    "tests/coordinator/test_base_model_checks.py",
    "tests/integration/test_site_failure.py",
    "tests/integration/test_dashboard.py",
    "tests/faults/test_killed_mid_training.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # set on pytest-xdist's workers, which collect and order the tests
        return  # one process: keep file order
    rank = {f: i for i, f in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: the rest keep order
