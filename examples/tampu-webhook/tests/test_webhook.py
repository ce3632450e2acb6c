"""Unit tests of the webhook backend (run with: pip install . && pytest tests/)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from tampu_webhook import WebhookSettings, result_for


@pytest.mark.parametrize(("status", "outcome"), [
    (200, "sent"), (204, "sent"), (404, "permanent"), (413, "permanent"),
    (500, "temporary"), (503, "temporary"), (302, "temporary"),
])
def test_http_status_mapping(status: int, outcome: str) -> None:
    assert result_for(status, "Reason", "hooks.example:443").status == outcome


def test_settings_are_checked() -> None:
    with pytest.raises(ValidationError):
        WebhookSettings(url="ftp://example.com/")
    s = WebhookSettings(url="http://127.0.0.1:8080/in", domains=["Hook.Example."])
    assert s.domains == ["hook.example"]
