"""``chasquid.conf`` -> tampu conf.d (:func:`tampu.chasquid.to_confd`).

Every field of chasquid's ``config.proto`` is either mapped (a line ``field -> tampu key``)
or listed as not mapped with the reason. Besides the fields, chasquid has fixed behaviours
that become tampu settings: ``localhost`` is always a local domain, certificates are in
``certs/``, the post-data hook is ``hooks/post-data`` (1 minute), the MDA gets 30 seconds,
50 ``Received:`` headers make a loop, only SPF ``fail`` is refused.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Collection
from pathlib import Path
from typing import Any, Final

from tampu.chasquid.conf import ChasquidConfig, parse_duration

CHASQUID_PLACEHOLDERS: Final = frozenset({"from", "from_user", "from_domain", "to", "to_user",
                                          "to_domain"})
SYSTEMD_PORTS: Final = {"smtp": 25, "submission": 587, "submissions": 465}
MDA_TIMEOUT: Final = 30.0
"""chasquid's MDA courier timeout (hard-coded)."""

_LISTENERS: Final = (("smtp", "smtp_address", "smtp"),
                     ("submission", "submission_address", "submission"),
                     ("submissions", "submission_over_tls_address", "submissions"))


def toml_string(value: str) -> str:
    """A TOML basic string (control characters escaped, UTF-8 as it is)."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"{value!r}: a lone surrogate cannot be written in TOML")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} cannot be written in TOML here")
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


class _File:
    """One conf.d file: a header comment, then tables of ``key = value  # comment`` lines."""

    def __init__(self, header: str) -> None:
        self.lines = [f"# {line}".rstrip() for line in header.splitlines()]

    def table(self, name: str, comment: str = "") -> None:
        self.lines.append("")
        if comment:
            self.lines.extend(f"# {line}".rstrip() for line in comment.splitlines())
        self.lines.append(f"[{name}]")

    def key(self, key: str, value: Any, comment: str = "") -> None:
        line = f"{key} = {toml_value(value)}"
        if comment:
            line += "  # " + comment.replace("\n", " ")
        self.lines.append(line)

    def note(self, comment: str) -> None:
        self.lines.extend(f"# {line}".rstrip() for line in comment.splitlines())

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _split_address(addr: str) -> tuple[str, int] | str:
    """Go's ``host:port`` (port may be a service name) -> (host, port), or why not."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        return "not host:port (chasquid would not start with it)"
    if host.startswith("[") != host.endswith("]"):
        return "not host:port (unbalanced brackets)"
    if ":" in host.strip("[]") and not host.startswith("["):
        return "an IPv6 address needs brackets: [addr]:port"
    if port.isdigit() and 0 <= int(port) <= 65535:
        return host, int(port)
    try:
        return host, socket.getservbyname(port, "tcp")
    except OSError:
        return f"unknown port {port!r}"


def _tampu_address(host: str, port: int) -> str:
    if ":" in host.strip("[]"):
        return f"[{host.strip('[]')}]:{port}"
    return f"{host}:{port}"


def _installed_plugins() -> set[str]:
    from tampu.registry import available_entry_points

    return set(available_entry_points())


def to_confd(cfg: ChasquidConfig, config_dir: Path, *, target_dir: Path | None = None,
             available_plugins: Collection[str] | None = None
             ) -> tuple[dict[str, str], list[str], list[tuple[str, str]]]:
    """See :func:`tampu.chasquid.to_confd`."""
    plugins = set(_installed_plugins() if available_plugins is None else available_plugins)
    base = config_dir.resolve()
    moved = target_dir is not None and target_dir.resolve() != base
    mapped: list[str] = []
    unmapped: list[tuple[str, str]] = []

    def path_here(value: str) -> str:
        """chasquid's path (relative to its directory) for tampu's config directory."""
        if Path(value).is_absolute() or not moved:
            return value
        return str(base / value)

    def given(name: str) -> str:
        return "" if name in cfg.explicit else " (chasquid's default)"

    header = (f"Made by `tampu import chasquid` from {base / 'chasquid.conf'}.\n"
              "The comments name the chasquid.conf field each value comes from; the rest are\n"
              "chasquid's fixed behaviours. Every key: docs/configuration.md and "
              "docs/coming-from-chasquid.md.")
    files: dict[str, str] = {}

    # ------------------------------------------------------------------ [server]
    srv = _File(header)
    srv.table("server")
    srv.key("hostname", cfg.hostname, "hostname" + ("" if "hostname" in cfg.explicit else
                                                    ": unset, this system's name"))
    mapped.append(f"hostname -> [server] hostname = {toml_string(cfg.hostname)}"
                  f"{given('hostname')}")
    data_dir = path_here(cfg.data_dir)
    srv.key("data_dir", data_dir, "data_dir (tampu's queue and state go here too)")
    mapped.append(f"data_dir -> [server] data_dir = {toml_string(data_dir)}{given('data_dir')}")
    srv.key("local_domains", ["localhost"], "chasquid always treats localhost as local; "
            "the others are the domains/<domain>/ folders")
    srv.key("certs_dir", path_here("certs"), "certs/<name>/fullchain.pem + privkey.pem")
    srv.key("self_signed_cert", False)
    size = cfg.max_data_size_mb * 1024 * 1024
    srv.key("max_message_size", size, f"max_data_size_mb = {cfg.max_data_size_mb} (MiB)")
    mapped.append(f"max_data_size_mb -> [server] max_message_size = {size}"
                  f"{given('max_data_size_mb')}")
    srv.key("max_recipients", 100, "chasquid: 100 per message")
    srv.key("suffix_separators", cfg.suffix_separators, "suffix_separators")
    mapped.append(f"suffix_separators -> [server] suffix_separators = "
                  f"{toml_string(cfg.suffix_separators)}{given('suffix_separators')}")
    srv.key("drop_characters", cfg.drop_characters, "drop_characters")
    mapped.append(f"drop_characters -> [server] drop_characters = "
                  f"{toml_string(cfg.drop_characters)}{given('drop_characters')}")
    srv.key("max_queue_items", cfg.max_queue_items, "max_queue_items")
    mapped.append(f"max_queue_items -> [server] max_queue_items = {cfg.max_queue_items}"
                  f"{given('max_queue_items')}")
    give_up = parse_duration(cfg.give_up_send_after)
    if give_up > 0:
        srv.key("give_up_after", give_up,
                f"give_up_send_after = {toml_string(cfg.give_up_send_after)}")
        mapped.append(f"give_up_send_after -> [server] give_up_after = {give_up!r} (seconds)"
                      f"{given('give_up_send_after')}")
    else:
        unmapped.append(("give_up_send_after", f"{cfg.give_up_send_after!r} is not a positive "
                         "duration; tampu needs one: kept tampu's default, 20 hours"))

    proxy_note = (" (tampu trusts the PROXY header from loopback only: set proxy_trusted to "
                  "your HAProxy's network if it runs elsewhere; chasquid trusted any client)")
    for name, field_name, kind in _LISTENERS:
        addresses: list[str] = []
        for addr in getattr(cfg, field_name):
            if addr == "systemd":
                addresses.append(f":{SYSTEMD_PORTS[kind]}")
                mapped.append(f"{field_name} \"systemd\" -> [server.listeners.{name}] "
                              f"addresses: \":{SYSTEMD_PORTS[kind]}\" (the port of chasquid's "
                              "systemd socket; tampu binds it itself)")
                continue
            split = _split_address(addr)
            if isinstance(split, str):
                unmapped.append((field_name, f"{addr!r}: {split}"))
                continue
            tampu_addr = _tampu_address(*split)
            addresses.append(tampu_addr)
            mapped.append(f"{field_name} {toml_string(addr)} -> [server.listeners.{name}] "
                          f"addresses: {toml_string(tampu_addr)}")
        addresses = list(dict.fromkeys(addresses))
        if not addresses:
            unmapped.append((field_name, f"no usable address: the {name} listener is left out"))
            continue
        srv.table(f"server.listeners.{name}")
        srv.key("kind", kind)
        srv.key("addresses", addresses, field_name)
        if cfg.haproxy_incoming and kind != "submissions":
            srv.key("proxy_protocol", True, "haproxy_incoming")
            srv.note("proxy_trusted: loopback by default; add your HAProxy's network here")
    if cfg.haproxy_incoming:
        mapped.append("haproxy_incoming -> proxy_protocol = true on [server.listeners.smtp] "
                      "and [server.listeners.submission]" + proxy_note)
        unmapped.append(("haproxy_incoming", "not on the submissions listener "
                         "(submission_over_tls_address): tampu reads no PROXY header on "
                         "implicit TLS, where chasquid expected it inside the TLS session"))
    else:
        mapped.append("haproxy_incoming -> proxy_protocol = false (tampu's default)"
                      f"{given('haproxy_incoming')}")
    files["00-server.toml"] = srv.text()

    # ------------------------------------------------------------------ reception
    rec = _File("Reception, as chasquid does it: SMTP AUTH against domains/<domain>/users "
                "(chasquid's\nfiles, read as they are), local users must exist, relay only "
                "for authenticated users.")
    rec.table("plugins.auth")
    rec.key("enabled", True)
    rec.table("plugins.localusers")
    rec.key("enabled", True)
    rec.table("plugins.relay")
    rec.key("enabled", True)
    rec.table("plugins.loopdetect")
    rec.key("enabled", True)
    rec.key("max_received", 50, "chasquid: 50 Received: headers")
    files["20-reception.toml"] = rec.text()
    spf = _File("SPF at MAIL FROM for unauthenticated sessions; like chasquid, only fail is "
                "refused.")
    spf.table("plugins.spf")
    spf.key("enabled", True)
    spf.key("on_fail", "reject")
    for result in ("softfail", "neutral", "none", "temperror", "permerror"):
        spf.key(f"on_{result}", "accept")
    files["30-spf.toml"] = spf.text()
    ali = _File("domains/<domain>/aliases and hooks/alias-resolve, chasquid's files as they "
                "are.")
    ali.table("plugins.aliases")
    ali.key("enabled", True)
    ali.key("max_depth", 10, "chasquid's recursion limit")
    files["31-aliases.toml"] = ali.text()
    hooks = _File("chasquid's post-data hook: same program, environment and exit codes.")
    hooks.table("plugins.hooks")
    hooks.key("enabled", True)
    hooks.key("program", path_here("hooks/post-data"))
    hooks.key("timeout", 60.0, "chasquid: 1 minute")
    files["32-hooks.toml"] = hooks.text()

    # ------------------------------------------------------------------ delivery
    local = _File("Local delivery: chasquid hands every local mailbox to its MDA; so does "
                  "this. The\nbuilt-in Maildir delivery is off (turn it on, and the MDA off, "
                  "to let tampu write\nMaildirs itself).")
    local.table("plugins.delivery_mda")
    odd = sorted({p for arg in cfg.mail_delivery_agent_args for p in _placeholders(arg)}
                 - CHASQUID_PLACEHOLDERS)
    local.key("enabled", not odd)
    local.key("command", cfg.mail_delivery_agent_bin, "mail_delivery_agent_bin")
    local.key("args", list(cfg.mail_delivery_agent_args), "mail_delivery_agent_args")
    local.key("timeout", MDA_TIMEOUT, "chasquid: 30 seconds")
    mapped.append(f"mail_delivery_agent_bin -> [plugins.delivery_mda] command = "
                  f"{toml_string(cfg.mail_delivery_agent_bin)}"
                  f"{given('mail_delivery_agent_bin')}")
    if odd:
        names = " ".join(f"%{p}%" for p in odd)
        local.note(f"NOT ENABLED: {names} in the arguments: chasquid passes them as they are, "
                   "tampu would\nreplace (or refuse) them. Fix args, then set enabled = true.")
        unmapped.append(("mail_delivery_agent_args", f"{names}: chasquid leaves these as they "
                         "are, tampu treats %name% as a placeholder; delivery_mda is written "
                         "disabled (local mail waits in the queue) until args are fixed"))
    else:
        mapped.append("mail_delivery_agent_args -> [plugins.delivery_mda] args = "
                      f"{toml_value(list(cfg.mail_delivery_agent_args))} (same placeholders)"
                      f"{given('mail_delivery_agent_args')}")
    local.table("plugins.delivery_maildir")
    local.key("enabled", False, "chasquid delivers through the MDA only")
    files["40-delivery-local.toml"] = local.text()
    remote = _File("Remote delivery over SMTP (MX, STARTTLS, HELO = [server] hostname) and the "
                   "per-domain\nsecurity levels (chasquid's domaininfo, converted to "
                   "<data_dir>/domaininfo/<domain>.json).")
    remote.table("plugins.delivery_smtp")
    remote.key("enabled", True)
    remote.table("plugins.domaininfo")
    remote.key("enabled", True)
    files["45-delivery-remote.toml"] = remote.text()
    dsn = _File("Delivery status notifications, as chasquid sends them.")
    dsn.table("plugins.dsn")
    dsn.key("enabled", True)
    files["50-dsn.toml"] = dsn.text()
    if "dkim" in plugins:
        dkim = _File("DKIM, as chasquid 1.14+ does: mail from your users is signed with the keys "
                     "in\ndomains/<domain>/dkim:<selector>.pem; incoming signatures are "
                     "verified.")
        dkim.table("plugins.dkim")
        dkim.key("enabled", True)
        files["33-dkim.toml"] = dkim.text()
    if "dmarc" in plugins:
        dmarc = _File("Not in chasquid: DMARC (RFC 7489) for incoming mail. Off, as in "
                      "chasquid;\nsee docs/plugins/dmarc.md before turning it on.")
        dmarc.table("plugins.dmarc")
        dmarc.key("enabled", False)
        files["34-dmarc.toml"] = dmarc.text()

    # ------------------------------------------------------------------ observability
    mon = _File("chasquid's monitoring_address: tampu's metrics (Prometheus) and status page.")
    mon.table("plugins.metrics")
    if cfg.monitoring_address:
        split = _split_address(cfg.monitoring_address)
        if isinstance(split, str):
            mon.key("enabled", False)
            unmapped.append(("monitoring_address", f"{cfg.monitoring_address!r}: {split}"))
        else:
            address = _tampu_address(*split)
            mon.key("enabled", True)
            mon.key("address", address, "monitoring_address")
            mapped.append(f"monitoring_address -> [plugins.metrics] address = "
                          f"{toml_string(address)} (tampu's own pages and metric names)")
    else:
        mon.key("enabled", False, "monitoring_address is not set")
        mapped.append("monitoring_address -> [plugins.metrics] enabled = false (not set)")
    files["60-metrics.toml"] = mon.text()
    log = _File("chasquid's mail_log_path: one line per mail event (tampu's line format).")
    log.table("plugins.maillog")
    log.key("enabled", True)
    if cfg.mail_log_path == "<syslog>":
        log.key("syslog", True, "mail_log_path = \"<syslog>\"")
        mapped.append(f"mail_log_path -> [plugins.maillog] syslog = true (facility mail)"
                      f"{given('mail_log_path')}")
    elif cfg.mail_log_path in ("<stdout>", "<stderr>"):
        log.key("path", "mail.log")
        unmapped.append(("mail_log_path", f"{cfg.mail_log_path}: tampu's mail log goes to a "
                         "file or to syslog; it is written to <data_dir>/mail.log"))
    else:
        path = cfg.mail_log_path if Path(cfg.mail_log_path).is_absolute() \
            else str(base / cfg.mail_log_path)
        log.key("path", path, "mail_log_path (tampu's paths are relative to the data dir)")
        mapped.append(f"mail_log_path -> [plugins.maillog] path = {toml_string(path)}")
    files["61-maillog.toml"] = log.text()
    if "ratelimit" in plugins:
        rate = _File("Not in chasquid: per-address limits (password guessing, floods); "
                     "generous defaults.")
        rate.table("plugins.ratelimit")
        rate.key("enabled", True)
        files["62-ratelimit.toml"] = rate.text()

    # ------------------------------------------------------------------ dovecot
    dovecot_fields = ("dovecot_auth", "dovecot_userdb_path", "dovecot_client_path")
    if not cfg.dovecot_auth:
        for name in dovecot_fields[1:]:
            mapped.append(f"{name} -> nothing: dovecot_auth is off, chasquid does not use it "
                          "either")
        mapped.append(f"dovecot_auth -> off{given('dovecot_auth')}")
    elif "dovecot_auth" in plugins:
        dove = _File("chasquid's dovecot_auth: users unknown to domains/<d>/users are "
                     "checked against Dovecot's\nauth sockets (empty paths: found "
                     "automatically).")
        dove.table("plugins.dovecot_auth")
        dove.key("enabled", True, "dovecot_auth")
        dove.key("userdb_path", cfg.dovecot_userdb_path, "dovecot_userdb_path")
        dove.key("client_path", cfg.dovecot_client_path, "dovecot_client_path")
        files["70-dovecot-auth.toml"] = dove.text()
        mapped.append("dovecot_auth -> [plugins.dovecot_auth] enabled = true")
        mapped.append(f"dovecot_userdb_path -> [plugins.dovecot_auth] userdb_path = "
                      f"{toml_string(cfg.dovecot_userdb_path)}")
        mapped.append(f"dovecot_client_path -> [plugins.dovecot_auth] client_path = "
                      f"{toml_string(cfg.dovecot_client_path)}")
    else:
        for name in dovecot_fields:
            unmapped.append((name, "the dovecot_auth plugin is not installed: Dovecot's users "
                             "cannot log in (users in domains/<d>/users can)"))
    return files, mapped, unmapped


def _placeholders(arg: str) -> list[str]:
    import re

    return re.findall(r"%([a-z_]+)%", arg)
