"""The site's secure-aggregation guards in the task loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from site_agent import agent
from site_agent.config import SiteConfig
from site_agent.policy import PolicyRefusal
from tests.site_agent.test_agent_modes import _fake_client, _kit, _task, federation  # noqa: F401 - fixture

ROWS = [{"messages": [{"role": "user", "content": f"what is {i} plus three?"},
                      {"role": "assistant", "content": str(i + 3)}]} for i in range(8)]


class _Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def record(self, event: str, fields: dict) -> None:
        self.events.append((event, fields))


@pytest.mark.parametrize("require", [True, False])
def test_policy_requiring_secure_aggregation_refuses_a_plain_upload(tiny_model_dir: Path, federation,  # noqa: F811
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    require: bool) -> None:
    # Prepare: a coordinator without SecAggService (the test double has no gRPC channel: settings say disabled)
    init, blob, base_sha = federation
    policy = f'allowed_modes = ["sft"]\nmax_steps = 2\nrequire_secure_aggregation = {str(require).lower()}\n'
    cfg = SiteConfig(**{**_kit(tmp_path, ROWS, policy=policy).__dict__, "base_model": tiny_model_dir})
    task = _task(init, base_sha, blob, "sft")
    task.training.beta = 0.0
    uploads: list[bytes] = []
    monkeypatch.setattr(agent, "CoordinatorClient", _fake_client(task, blob, uploads))
    sink = _Sink()
    # Execute / Assert
    if require:
        with pytest.raises(PolicyRefusal, match="rule 'require_secure_aggregation'"):
            agent.run_site(cfg, show_progress=False, audit=sink)
        assert uploads == []
        assert ("upload_refused", {"site": "s1", "round": 1, "rule": "require_secure_aggregation"}) in sink.events
    else:
        assert agent.run_site(cfg, show_progress=False, audit=sink) == 1
        assert len(uploads) == 1
