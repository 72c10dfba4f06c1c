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
