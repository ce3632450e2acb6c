"""``tampu init``: write a commented production configuration directory.

Ports 25/587/465 on every address, real certificate paths (``certs/<hostname>/``, with
instructions for certbot), the data directory in ``/var/lib/tampu`` and the usual plugins.
"""

from __future__ import annotations

import re
from pathlib import Path

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")

SERVER = """\
# tampu for {domain}, written by `tampu init`. Every key: docs/configuration.md. Running it in
# production (systemd, DNS records, backups, monitoring): docs/operations.md.
# Check after each change: tampu check --config-dir {config_dir}

[server]
hostname = "{hostname}"   # greeting, Received headers, HELO; your MX record points here
data_dir = "{data_dir}"   # queue, mail log, mailboxes: owned by user tampu; back it up
local_domains = ["{domain}"]   # more: add them here, or make domains/<domain>/ folders
certs_dir = "certs"       # certs/<name>/fullchain.pem + privkey.pem; see certs/README.txt
self_signed_cert = false
max_message_size = 52428800    # 50 MiB
max_recipients = 100
log_level = "info"

# Incoming mail from the Internet (MX): port 25 on every address, IPv4 and IPv6.
[server.listeners.smtp]
kind = "smtp"
addresses = []            # empty: all addresses; or ["192.0.2.1:25", "[2001:db8::1]:25"]

# Your users' mail programs: port 587 (STARTTLS, then AUTH) ...
[server.listeners.submission]
kind = "submission"
addresses = []

# ... and port 465 (TLS from the first byte, then AUTH).
[server.listeners.submissions]
kind = "submissions"
addresses = []

# Behind a TCP proxy or load balancer that sends the PROXY protocol (v1 or v2), let the
# listener take the client's address from it, only from the proxy's own address:
# [server.listeners.smtp]
# proxy_protocol = true
# proxy_trusted = ["10.0.0.5/32"]
"""

PLUGINS = {
    "20-reception.toml": """\
# Who may send, to whom. Keep all four: together they make tampu a closed relay.
[plugins.auth]             # SMTP AUTH against domains/<domain>/users (tampu user add)
enabled = true

[plugins.localusers]       # local recipients must exist (users, postmaster, aliases)
enabled = true

[plugins.relay]            # remote recipients only for authenticated users
enabled = true

[plugins.loopdetect]       # refuse messages with too many Received: headers
enabled = true
""",
    "30-spf.toml": """\
# SPF check of incoming mail (MAIL FROM); fail is refused, the rest is recorded.
[plugins.spf]
enabled = true
""",
    "31-aliases.toml": """\
# domains/<domain>/aliases, in chasquid's format.
[plugins.aliases]
enabled = true
""",
    "33-dkim.toml": """\
# DKIM: submitted mail is signed for its From domain once that domain has a key
# (tampu dkim keygen DOMAIN; publish what tampu dkim dns DOMAIN prints); incoming
# signatures are verified and recorded.
[plugins.dkim]
enabled = true
""",
    "40-delivery-local.toml": """\
# Local mailboxes: a Maildir per user in <data_dir>/mail/<domain>/<user>/ (point Dovecot
# there), or see docs for an MDA or LMTP instead.
[plugins.delivery_maildir]
enabled = true
""",
    "45-delivery-remote.toml": """\
# Mail for other domains (sent by your authenticated users): through their MX, with STARTTLS.
[plugins.delivery_smtp]
enabled = true
""",
    "50-dsn.toml": """\
# Tell senders about mail that could not be delivered.
[plugins.dsn]
enabled = true
""",
    "60-metrics.toml": """\
# Prometheus metrics and a status page on http://127.0.0.1:9125/ (keep it private).
[plugins.metrics]
enabled = true
address = "127.0.0.1:9125"
""",
    "61-maillog.toml": """\
# One line per mail event in <data_dir>/mail.log (or syslog = true).
[plugins.maillog]
enabled = true
path = "mail.log"
format = "text"
""",
    "62-ratelimit.toml": """\
# Limits per client address and per user; generous defaults (docs/operations.md).
[plugins.ratelimit]
enabled = true
recipients_per_hour = 1000
""",
}

CERTS_README = """\
Certificates for tampu: one folder per name, each with fullchain.pem and privkey.pem.
The folder {hostname}/ is waiting for the certificate of your server name.

With certbot (Let's Encrypt), get the certificate, then link it here:

    certbot certonly --standalone -d {hostname}
    ln -s /etc/letsencrypt/live/{hostname}/fullchain.pem {certs}/{hostname}/fullchain.pem
    ln -s /etc/letsencrypt/live/{hostname}/privkey.pem {certs}/{hostname}/privkey.pem

The tampu user must be able to read them (e.g. chgrp -R tampu /etc/letsencrypt/{{live,archive}}
and chmod g+rx on those folders). After each renewal tell tampu to load the new files:

    certbot renew --deploy-hook "tampu reload --config-dir {config_dir}"

Other names (one folder each) are chosen by SNI; the hostname's is the default.
"""


def init_config(directory: Path, domain: str, *, hostname: str | None = None,
                data_dir: str = "/var/lib/tampu", force: bool = False) -> list[Path]:
    """Write the configuration into ``directory``; returns the files written.

    Raises ValueError for a bad domain or a directory that already has a conf.d (unless
    ``force``).
    """
    domain = domain.lower().rstrip(".")
    hostname = (hostname or f"mail.{domain}").lower().rstrip(".")
    for name in (domain, hostname):
        if not _DOMAIN.match(name):
            raise ValueError(f"{name!r} is not a domain name")
    confd = directory / "conf.d"
    if confd.is_dir() and any(confd.iterdir()) and not force:
        raise ValueError(f"{confd} already exists and is not empty (use --force to overwrite)")
    root = directory.resolve()
    values = {"domain": domain, "hostname": hostname, "data_dir": data_dir,
              "config_dir": str(root), "certs": str(root / "certs")}
    files = {confd / "00-server.toml": SERVER.format(**values),
             **{confd / name: text for name, text in PLUGINS.items()},
             directory / "certs" / "README.txt": CERTS_README.format(**values)}
    (directory / "certs" / hostname).mkdir(parents=True, exist_ok=True)
    (directory / "domains" / domain).mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
