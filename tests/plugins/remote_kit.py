"""Helpers for the remote delivery tests: receiving MX servers (aiosmtpd) on 127.0.0.x, one port.

The fake MX itself (Sink, MXFarm, free_port, server_tls, write_ca) is in the test kit,
``tampu.testing.mx``; this module keeps the tampu configuration these tests share.

delivery_smtp has one ``port`` setting, so every test MX listens on the same port on its own
loopback address (127.0.0.2, 127.0.0.3, ...); an address where nothing listens is a "down" MX.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tampu.testing import RunningServer, server_toml
from tampu.testing.mx import (
    MXFarm,
    Received,
    closing_controller_class,
    free_port,
    server_tls,
    write_ca,
)
from tampu.testing.mx import MXHandler as Sink

SinkController = closing_controller_class()

__all__ = ["MXFarm", "PASSWORD", "Received", "Sink", "USER", "free_port", "remote_conf",
           "server_tls", "submit", "write_ca"]

USER = "user@example.test"
PASSWORD = "secret"


def remote_conf(dns_port: int, mx_port: int, *, ca_file: Path | None = None,
                domaininfo: bool = True, smtp_extra: str = "") -> dict[str, Any]:
    """Keyword arguments for ``tampu_server``: DNS, delivery_smtp towards the farm's port."""
    ca_line = f'tls_ca_file = "{ca_file}"' if ca_file else ""
    conf = f"""
[plugins.delivery_smtp]
enabled = true
port = {mx_port}
{ca_line}
connect_timeout = 3
command_timeout = 3
data_timeout = 3
{smtp_extra}

[plugins.domaininfo]
enabled = {"true" if domaininfo else "false"}
"""
    return {
        "base": server_toml(extra=f'dns_servers = ["127.0.0.1:{dns_port}"]'),
        "conf": {"45-delivery-remote.toml": conf},
        "users": {USER: PASSWORD},
        "deliver": True,
    }


def submit(srv: RunningServer, rcpts: list[str], *, body: bytes | None = None,
           sender: str = USER) -> None:
    """Send as the authenticated test user over submission (STARTTLS + AUTH), so it may relay."""
    body = body or b"From: user@example.test\r\nSubject: remote\r\n\r\nhello out there\r\n"
    with srv.smtp("submission") as client:
        client.ehlo()
        client.starttls(context=srv.client_tls())
        client.ehlo()
        client.login(USER, PASSWORD)
        refused = client.sendmail(sender, rcpts, body)
        assert not refused, refused
