"""The server part of the console (listeners, plugin order) and the ring of recent errors."""

from __future__ import annotations

import collections
import html
import logging
import time
from dataclasses import dataclass

from tampu import ServerContext


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    when: float
    logger: str
    message: str


class RecentErrors(logging.Handler):
    """Keeps the last ``size`` ERROR (and worse) records of the ``tampu`` loggers."""

    def __init__(self, size: int) -> None:
        super().__init__(level=logging.ERROR)
        self.records: collections.deque[ErrorRecord] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            message = str(record.msg)
        self.records.append(ErrorRecord(record.created, record.name, message))


@dataclass(frozen=True, slots=True)
class QueueSummary:
    items: int
    oldest_age: float


def server_sections(context: ServerContext, errors: list[ErrorRecord]) -> str:
    """The console's server part (HTML): listeners, plugin order per hook, recent errors."""
    e = html.escape
    settings = context.config.server
    rows = []
    for name, lst in settings.listeners.items():
        addresses = ", ".join(lst.addresses) or f"default port ({lst.kind}), all addresses"
        proxy = "PROXY from " + ", ".join(lst.proxy_trusted) if lst.proxy_protocol else "-"
        rows.append(f"<tr><td>{e(name)}</td><td>{e(lst.kind)}</td><td>{e(addresses)}</td>"
                    f"<td>{e(proxy)}</td></tr>")
    order = [f"<tr><td>{e(hook)}</td><td>{e(' → '.join(names))}</td></tr>"
             for hook, names in context.plugin_order.items()]
    errs = [f"<li><time>{e(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.when)))}"
            f"</time> <b>{e(r.logger)}</b>: {e(r.message)}</li>" for r in reversed(errors)]
    return f"""<section id="errors"><h2>Recent errors</h2>
{'<ul class="errors">' + ''.join(errs) + '</ul>' if errs else '<p class="quiet">none</p>'}
</section>
<section id="server"><h2>Listeners</h2>
<table><thead><tr><th>name</th><th>kind</th><th>addresses</th><th>proxy</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<h2>Plugin order</h2>
<table><thead><tr><th>hook</th><th>plugins, in call order</th></tr></thead>
<tbody>{''.join(order)}</tbody></table></section>
"""
