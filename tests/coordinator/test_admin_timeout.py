"""fedbridge-admin's call deadline: $FEDBRIDGE_ADMIN_TIMEOUT, checked, and named in the DEADLINE_EXCEEDED line."""

from __future__ import annotations

import pytest

from coordinator.admin.client import TIMEOUT_S, AdminClientError, call_timeout


def test_default_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDBRIDGE_ADMIN_TIMEOUT", raising=False)
    assert call_timeout() == TIMEOUT_S
    monkeypatch.setenv("FEDBRIDGE_ADMIN_TIMEOUT", "2.5")
    assert call_timeout() == 2.5


@pytest.mark.parametrize("raw", ["0", "-1", "soon", "nan", "inf"])
def test_bad_values_are_a_usage_error(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("FEDBRIDGE_ADMIN_TIMEOUT", raw)
    with pytest.raises(AdminClientError, match=r"FEDBRIDGE_ADMIN_TIMEOUT must be a number of seconds > 0") as e:
        call_timeout()
    assert e.value.code == "USAGE"
