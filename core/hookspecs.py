"""The hook catalogue: tampu's public API for plugins.

Every hook tampu fires is specified here, in banner sections by stage. A plugin implements a
hook by defining a function or method of the same name decorated with ``@tampu.hookimpl``; a
misspelt name fails at start-up. Implementations may be ``async def``; a synchronous one that
blocks (file or network I/O, pyspf) is marked ``@tampu.blocking`` and runs in a thread.

Two kinds of hooks:

* **verdict** hooks stop at the first implementation that returns something other than None
  ("first verdict wins"); None means "no opinion, ask the next plugin";
* **notification** and **collecting** hooks run every implementation; collecting hooks merge
  the returned lists.

Plugins run in ascending ``priority`` (conf.d ``[plugins.NAME] priority``, default 100), ties
broken by the order the plugins' tables appear in conf.d. An exception or a timeout
(``[server] plugin_timeout``) in any implementation is logged with the plugin's name; at
reception the core then answers ``451 4.3.0`` (never a silent accept), in the queue the attempt
counts as a temporary failure.

Firing order for one SMTP session (``smtp_verdict`` follows every stage that decided
something, accepted or refused; ``smtp_disconnect`` ends every session that reached
``smtp_connect``, whatever the way it ended)::

    [implicit TLS: handshake -> smtp_starttls] -> smtp_connect -> (greeting)
      -> ( smtp_helo -> [EHLO: smtp_ehlo_capabilities]
         | STARTTLS -> smtp_starttls
         | smtp_auth -> smtp_auth_result
         | smtp_mail_from -> smtp_rcpt_to* -> smtp_data
             -> queue_expand_recipient* -> queue_add_headers -> queue_enqueued
             -> smtp_transaction_done )*
      -> smtp_disconnect

Firing order for one queue item::

    queue_enqueued -> (wait for a delivery slot: [server] max_deliveries)
      -> ( deliver_batch (the unclaimed pending recipients, one call per batch backend)
         | deliver (once per unclaimed pending recipient) )* in backend order
         -> delivery_attempted per recipient
      -> [NOTIFY=SUCCESS: make_dsn(delivered)] -> [some temporary: retry_delay, wait,
      [late: make_dsn(delayed)], again] -> [failures: queue_give_up -> make_dsn(failed)]
      -> queue_done

Delivery backends (implementations of ``deliver_batch`` and ``deliver``) are asked in one
order: priority, then conf.d order; a plugin that has both is asked ``deliver_batch`` first.
Each recipient goes to the first backend that claims it, exactly as if every backend were
per-recipient; the core's relay guard runs before any of them.

Lifecycle: ``tampu_startup`` (before listeners open), ``tampu_reload`` (SIGHUP),
``tampu_shutdown`` (after listeners closed and sessions drained).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tampu._markers import hookspec

if TYPE_CHECKING:
    import argparse

    from tampu.backends import RegisterBackend
    from tampu.context import ServerContext
    from tampu.envelope import AuthResult, Envelope, Message, Session, Verdict
    from tampu.item import DeliveryResult, QueueItem, Recipient
    from tampu.reply import Reply


# --------------------------------------------------------------------------------------------
# tampu_: lifecycle
# --------------------------------------------------------------------------------------------


@hookspec
def tampu_startup(context: ServerContext) -> None:
    """The server is starting; listeners are not open yet.

    **Fires:** once per server process, after configuration is validated and plugins are
    registered.

    :param context: the server context (settings, config and data directories, hooks).

    **Result:** none. An exception stops start-up: tampu does not serve.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec
def tampu_reload(context: ServerContext) -> None:
    """The configuration files were re-read (SIGHUP, ``tampu reload``).

    **Fires:** once per reload, after the new configuration validated.

    :param context: the server context.

    **Result:** none. An exception is logged; other plugins still reload.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec
def tampu_register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add subcommands to the ``tampu`` command (``tampu user``, ``tampu dkim`` ...).

    **Fires:** each time the ``tampu`` command builds its parser, for every available plugin
    (enabled or not: ``tampu user add`` works whatever the configuration), on the plugin's
    **module**: implement it as a module-level function. Not for the core's own commands
    (``serve``, ``check``, ``plugins``, ``reload``, ``init``), whose command line is the
    core's alone (so that ``serve`` imports no plugin it does not run); ``tampu --help`` and
    every other command get the whole one.

    :param subparsers: argparse's subparsers of the ``tampu`` command. Give every subcommand
        ``tampu.cli.config_dir_option(parser)`` so that ``--config-dir`` works in the same
        place everywhere.

    **Result:** none.

    **Async:** no: a plain function.

    **Since:** 0.2 (before: a ``register_cli`` function found by name).
    """


@hookspec
def tampu_register_stores(register: RegisterBackend) -> None:
    """Add a store backend that ``[server] queue_store`` or ``state_store`` can name
    (``queue_postgres`` adds ``postgres``).

    **Fires:** when a process makes its stores (``tampu serve``, ``tampu check``, ``tampu
    queue`` ...) and the configuration names a backend that is not the core's own
    (``filesystem``/``files``), for every available plugin (enabled or not), on the plugin's
    **module**: implement it as a module-level function.

    :param register: ``register(name, factory)``; ``factory(config)`` returns a
        :class:`tampu.backends.StoreBackend` (it validates the backend's own settings and
        raises ConfigError; it connects nothing before ``open``).

    **Result:** none; the first registration of a name wins.

    **Async:** no: a plain function.

    **Since:** 0.3
    """


@hookspec
def tampu_shutdown(context: ServerContext) -> None:
    """The server is stopping: listeners are closed and sessions drained.

    **Fires:** once, at the end of ``serve``.

    :param context: the server context.

    **Result:** none; exceptions are logged.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


# --------------------------------------------------------------------------------------------
# smtp_: reception
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def smtp_connect(session: Session) -> Reply | None:
    """A client connected; the greeting is not sent yet.

    **Fires:** once per connection, after accept, the PROXY header (if the listener takes
    one) and, on an implicit-TLS listener, the TLS handshake and ``smtp_starttls``.

    :param session: the new session (peer address, listener).

    **Result:** verdict. None: go on. A 4xx/5xx Reply is sent instead of the greeting and the
    connection is closed. If no plugin answers, the greeting is sent.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec(firstresult=True)
def smtp_helo(session: Session, hostname: str) -> Reply | None:
    """The client sent HELO or EHLO.

    **Fires:** on each HELO/EHLO; ``session.esmtp`` tells which.

    :param session: the session.
    :param hostname: the argument the client gave.

    **Result:** verdict. None: accepted. A 4xx/5xx Reply refuses it (the session stays
    without a HELO identity). If no plugin answers, the greeting is accepted.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec
def smtp_ehlo_capabilities(session: Session) -> list[str] | None:
    """Build the EHLO keyword list.

    **Fires:** on each EHLO, after ``smtp_helo`` accepted it.

    :param session: the session.

    **Result:** collecting. Each implementation may return extra keywords (``["DSN"]``);
    all are merged after the core's own (PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES,
    SMTPUTF8, STARTTLS, AUTH).

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec
def smtp_starttls(session: Session) -> None:
    """The TLS handshake completed (STARTTLS or an implicit-TLS listener).

    **Fires:** once per session that has TLS, after the handshake: after STARTTLS, or on an
    implicit-TLS listener before ``smtp_connect``; ``session.tls`` is set.

    :param session: the session.

    **Result:** notification; every implementation runs.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec(firstresult=True)
def smtp_auth(session: Session, mechanism: str, login: str, password: str) -> AuthResult | None:
    """The client sent AUTH (PLAIN or LOGIN) over TLS.

    **Fires:** on each AUTH, only on TLS sessions (the core refuses AUTH before TLS with
    ``538 5.7.11`` and does not advertise it).

    :param session: the session.
    :param mechanism: ``PLAIN`` or ``LOGIN``.
    :param login: the login as sent (``user@domain``).
    :param password: the password. Never log it.

    **Result:** verdict. None: not this plugin's user, ask the next. ``AuthResult(success=
    True, user=...)`` authenticates the session (235); ``AuthResult(success=False)`` answers
    ``535 5.7.8``. If no plugin answers, ``535 5.7.8``.

    **Async:** ``async def`` allowed, or ``@blocking`` (password hashing is slow: use it).

    **Since:** 0.1
    """


@hookspec
def smtp_auth_result(session: Session, login: str, success: bool, reason: str) -> None:
    """An AUTH attempt got its answer (after ``smtp_auth``), before the reply is sent.

    **Fires:** once per AUTH whose credentials reached ``smtp_auth`` (not for syntax errors
    or AUTH refused before TLS); also when ``smtp_auth`` failed with a plugin error
    (``success`` False, ``reason`` ``"plugin error"``).

    :param session: the session (``auth_user`` is set when ``success``).
    :param login: the login as sent. The password is never passed here.
    :param success: whether the session is now authenticated.
    :param reason: the ``AuthResult.reason`` of the deciding plugin ("" if none gave one);
        ``"no plugin answered"`` when no plugin claimed the login.

    **Result:** notification (logs, metrics, throttling); every implementation runs. An
    implementation may delay the answer (tarpit) by awaiting, within ``plugin_timeout``.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec(firstresult=True)
def smtp_mail_from(
    session: Session, envelope: Envelope, address: str, params: dict[str, str | bool]
) -> Reply | None:
    """The client sent MAIL FROM.

    **Fires:** once per transaction, after the core checked syntax, SIZE and (on submission
    listeners) that the session is authenticated.

    :param session: the session.
    :param envelope: the new transaction (``mail_from`` not yet set).
    :param address: the reverse path; ``""`` for the null sender ``<>``.
    :param params: the ESMTP parameters, upper-cased names (``SIZE``, ``BODY``, ``SMTPUTF8``).

    **Result:** verdict. None or a 2xx Reply: go on (the first 2xx ends the stage). A 4xx/5xx
    Reply refuses the sender. If no plugin answers: ``250 2.1.0``.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec(firstresult=True)
def smtp_rcpt_to(
    session: Session, envelope: Envelope, address: str, params: dict[str, str | bool]
) -> Reply | None:
    """The client sent RCPT TO.

    **Fires:** once per recipient, after the core checked syntax and the recipient limit.

    :param session: the session.
    :param envelope: the transaction (``rcpt_to`` holds the recipients accepted so far).
    :param address: the forward path.
    :param params: the ESMTP parameters.

    **Result:** verdict. A 2xx Reply accepts the recipient; a 4xx/5xx Reply refuses it; None:
    no opinion. **No plugin accepting means 550 5.1.1: fail closed**, so with every plugin
    disabled tampu relays nothing.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec(firstresult=True)
def smtp_data(session: Session, envelope: Envelope, message: Message) -> Reply | None:
    """The client finished DATA; the message is not queued yet.

    **Fires:** once per transaction that reached the final ``.`` within the size limit.

    :param session: the session.
    :param envelope: the transaction.
    :param message: the received bytes; ``message.add_header(name, value)`` asks the core to
        add a header on top (e.g. ``Received-SPF``). Headers from all plugins that ran are added.

    **Result:** verdict. None: go on. A 4xx/5xx Reply refuses the message (nothing is queued).
    If no plugin refuses, the core adds its ``Received:`` header, queues durably and answers
    ``250 2.0.0 Queued as ID``.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec
def smtp_verdict(session: Session, envelope: Envelope | None, verdict: Verdict) -> None:
    """A stage of the session was decided: who decided what (after a verdict).

    **Fires:** after each connect, HELO/EHLO, AUTH, MAIL FROM, RCPT TO and DATA stage, before
    the reply is sent (for an accepted DATA it may have gone already: the ``250`` goes when
    the message is durable), whether it accepted or refused, including what the core decided
    itself (syntax errors, limits, fail-closed refusals: ``verdict.plugin == "core"``).

    :param session: the session.
    :param envelope: the transaction (None before MAIL FROM was accepted).
    :param verdict: the stage, the reply, the plugin that decided, the address concerned and
        how long the stage's hooks took.

    **Result:** notification (metrics, mail log, decision records); every implementation runs.
    It cannot change the verdict.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.2
    """


@hookspec
def smtp_transaction_done(
    session: Session, envelope: Envelope, reply: Reply, queue_id: str | None
) -> None:
    """A transaction ended with the final reply to DATA (accepted or refused).

    **Fires:** once per DATA command whose data was read (refusals before DATA are told by
    ``smtp_verdict``); for an accepted message, possibly after its ``250`` was sent.

    :param session: the session.
    :param envelope: the transaction.
    :param reply: what the client was told.
    :param queue_id: the queue ID when accepted, else None.

    **Result:** notification (logs, metrics); every implementation runs.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec
def smtp_disconnect(session: Session) -> None:
    """The connection closed, for any reason.

    **Fires:** once per connection that reached ``smtp_connect``.

    :param session: the session.

    **Result:** notification; every implementation runs.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


# --------------------------------------------------------------------------------------------
# queue_: the queue
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def queue_expand_recipient(
    envelope: Envelope | None, item: QueueItem, recipient: str
) -> list[Recipient] | None:
    """Turn one recipient into its final recipients (alias expansion) before enqueueing.

    **Fires:** once per recipient of a new item, before the item is written.

    :param envelope: the SMTP transaction, or None for mail the server makes (DSNs).
    :param item: the item being built (``mail_from``, ``auth_user``, ``origin``).
    :param recipient: the address as accepted at RCPT TO.

    **Result:** verdict. None: the recipient is final as it is. A list of ``Recipient``
    (possibly with a ``Route``: ``Route(pipe="cmd")``, ``Route(forward=True, via=(...))``)
    replaces it; an empty list drops it. Duplicates (same address and route) are merged by
    the core. An exception fails the intake: ``451 4.3.0``, nothing queued.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec
def queue_add_headers(item: QueueItem, message: bytes) -> list[tuple[str, str]] | None:
    """Add header fields on top of a new item's message before it is made durable (DKIM).

    **Fires:** once per new item (received mail, DSNs and other mail the server makes), after
    recipient expansion, before the item is written; the bytes written are the bytes with
    these headers on top, so a signature covers exactly what is queued.

    :param item: the item being built (``mail_from``, ``auth_user``, ``origin``, recipients).
    :param message: the message as it will be queued (the core's ``Received:`` on top).

    **Result:** collecting. Each implementation may return ``(name, value)`` pairs; they are
    put on top of the message in the order the plugins run (a value may be folded with
    ``\r\n\t``). A failing implementation fails the intake: ``451 4.3.0``.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.2
    """


@hookspec
def queue_enqueued(item: QueueItem) -> None:
    """An item is durable in the store.

    **Fires:** once per new item, after the store made it durable, before its delivery is
    scheduled. The ``250`` may have gone already (the filesystem store sends it the moment
    the item is durable).

    :param item: the item.

    **Result:** notification; every implementation runs.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec(firstresult=True)
def deliver(item: QueueItem, recipient: Recipient, message: bytes) -> DeliveryResult | None:
    """Attempt delivery of an item to one pending recipient.

    **Fires:** on each attempt, once per pending recipient that no earlier backend (a
    ``deliver_batch`` included) claimed, in the item's task.

    :param item: the queue item (envelope, ``auth_user``, ``origin``).
    :param recipient: the final recipient (``address`` and ``route`` hints).
    :param message: the message bytes as queued.

    **Result:** verdict. The first backend that claims the recipient returns a
    ``DeliveryResult`` (``sent``, ``temporary``, ``permanent``); None means "not mine". If no
    backend claims it, the core records a permanent failure ``no delivery backend accepts
    this recipient``. The result is written to the item on disk before the next recipient.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec(firstresult=True)
def delivery_route(item: QueueItem, recipient: Recipient) -> str | None:
    """Say, without delivering, how this backend would deliver a recipient (``tampu try``).

    **Fires:** only in dry runs, once per final recipient, in the same order as ``deliver``.

    :param item: the queue item as it would be queued (nothing is written).
    :param recipient: the final recipient (``address`` and ``route``).

    **Result:** verdict. A backend that would claim the recipient returns one line saying
    where it would go (``Maildir data/mail/example.com/ana``, ``MX mx.example.net``); None:
    not this backend. A backend without this hook is reported as "cannot tell".

    **Async:** ``async def`` allowed, or ``@blocking``. It must change nothing.

    **Since:** 0.2
    """


@hookspec
def deliver_batch(item: QueueItem, recipients: list[Recipient],
                  message: bytes) -> list[tuple[Recipient, DeliveryResult]] | None:
    """Attempt delivery of several pending recipients of an item at once (for example one
    SMTP transaction per destination, with several RCPT TO).

    **Fires:** on each attempt of an item, once per backend that implements it, at that
    backend's place in the order of delivery backends (see the module documentation), with
    the pending recipients that no earlier backend claimed and that passed the core's relay
    guard. Not called when there are none.

    :param item: the queue item (envelope, ``auth_user``, ``origin``).
    :param recipients: the recipients still unclaimed, in the item's order.
    :param message: the message bytes as queued.

    **Result:** claim, not a verdict: a list of ``(recipient, DeliveryResult)`` pairs for the
    recipients this backend delivered (or tried to), each one of the ``Recipient`` objects
    given, at most once; the others go on to the next backends (``deliver_batch`` or
    ``deliver``). None or ``[]``: none of them. The core records every result (written to the
    item on disk before the next backend is asked) and fires ``delivery_attempted`` for each,
    as it does for ``deliver``. An exception, a timeout (``[server] delivery_timeout``) or a
    malformed answer counts as a temporary failure of every recipient given.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.2
    """


@hookspec
def delivery_attempted(item: QueueItem, recipient: Recipient, result: DeliveryResult,
                       backend: str) -> None:
    """A delivery attempt finished.

    **Fires:** after each ``deliver``, for each recipient a ``deliver_batch`` answered for
    (and after the core's own decisions: its relay guard, no backend claiming the recipient,
    a backend failing).

    :param item: the queue item.
    :param recipient: the recipient, already updated with the result.
    :param result: what the backend answered.
    :param backend: the plugin that answered, or ``core``.

    **Result:** notification (logs, metrics); every implementation runs.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec(firstresult=True)
def retry_delay(item: QueueItem, attempt: int) -> float | None:
    """How long to wait before the next attempt, after some recipients failed temporarily.

    **Fires:** after each round that left recipients pending.

    :param item: the queue item.
    :param attempt: how many rounds ran so far (1 after the first).

    **Result:** verdict. Seconds to wait; None: the core's schedule (``[server]
    retry_schedule``, with jitter).

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec
def queue_give_up(item: QueueItem, failed: list[Recipient]) -> None:
    """An item is finished and some recipients failed for good (or timed out).

    **Fires:** once per item, before it is removed, when ``failed`` is not empty.

    :param item: the queue item.
    :param failed: recipients that failed permanently or were still pending at give-up time.

    **Result:** notification; every implementation runs.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


@hookspec(firstresult=True)
def make_dsn(item: QueueItem, failed: list[Recipient], message: bytes,
             action: str) -> bytes | None:
    """Build a delivery status notification (RFC 3464) for some recipients.

    **Fires:** never for the null sender ``<>`` (no bounce loops); ``action`` ``failed``: once
    per item with failures, after ``queue_give_up``, for the failed recipients that did not
    ask for NOTIFY=NEVER; ``delayed``: once for recipients that asked for NOTIFY=DELAY and are
    still pending after ``[server] delay_warning_after``; ``delivered``: for recipients that
    asked for NOTIFY=SUCCESS, after their delivery.

    :param item: the queue item (``dsn_ret``, ``dsn_envid``; each recipient's ``orcpt``).
    :param failed: the recipients to report.
    :param message: the original message bytes.
    :param action: ``failed``, ``delayed`` or ``delivered`` (the report's Action field).

    **Result:** verdict. The DSN message bytes; the core queues it from ``<>`` to the sender
    with origin ``dsn``. None: no DSN is sent.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1 (``action`` since 0.2: before, only failures were reported)
    """


@hookspec
def queue_done(item: QueueItem) -> None:
    """An item left the queue (all recipients done, or given up).

    **Fires:** once per item, after its files are removed.

    :param item: the queue item.

    **Result:** notification; every implementation runs.

    **Async:** ``async def`` allowed, or ``@blocking``.

    **Since:** 0.1
    """


def _catalogue() -> tuple[list[str], frozenset[str]]:
    specs = {n: v for n, v in globals().items() if callable(v) and hasattr(v, "tampu_spec")}
    verdicts = frozenset(n for n, v in specs.items() if v.tampu_spec.get("firstresult"))
    return list(specs), verdicts


HOOK_NAMES, VERDICT_HOOKS = _catalogue()
"""Every hook of the catalogue, in order, and those that are verdict (first-result) hooks."""
