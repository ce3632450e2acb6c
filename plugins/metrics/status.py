"""The human status page (``GET /``) and the ring of recent errors it shows."""

from __future__ import annotations

import collections
import html
import logging
import time
from dataclasses import dataclass

from tampu import ServerContext
from tampu.store import format_age


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


def render(context: ServerContext, queue: QueueSummary, errors: list[ErrorRecord]) -> bytes:
    """A plain HTML page: queue, listeners, plugin order per hook, recent errors."""
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
    errs = [f"<li>{e(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.when)))} "
            f"<b>{e(r.logger)}</b>: {e(r.message)}</li>" for r in reversed(errors)]
    oldest = format_age(queue.oldest_age) if queue.items else "-"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tampu on {e(context.hostname)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 12px;text-align:left}}
</style></head><body>
<h1>tampu on {e(context.hostname)}</h1>
<h2>Queue</h2><p>{queue.items} item(s); oldest: {oldest}. <a href="/metrics">metrics</a></p>
<h2>Listeners</h2><table><tr><th>name</th><th>kind</th><th>addresses</th><th>proxy</th></tr>
{''.join(rows)}</table>
<h2>Plugin order</h2><table><tr><th>hook</th><th>plugins, in call order</th></tr>
{''.join(order)}</table>
<h2>Recent errors</h2>{'<ul>' + ''.join(errs) + '</ul>' if errs else '<p>none</p>'}
</body></html>
"""
    return page.encode()
