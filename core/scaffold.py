"""``tampu init``: write a commented production configuration directory.

Ports 25/587/465 on every address, real certificate paths (``certs/<hostname>/``, with
instructions for certbot), the data directory in ``/var/lib/tampu`` and every plugin table of
the default configuration.
"""

from __future__ import annotations

from pathlib import Path

from tampu.addresses import AddressError, domain_to_ascii, normalize_domain

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

DEFAULTS = "defaults"
"""The plugin tables of the default configuration (package data ``tampu/defaults/*.toml``; the
repository's ``conf.d/`` links to the same files): ``tampu init`` writes every one of them."""


def default_tables() -> dict[str, str]:
    """File name -> text of every plugin table file of the default configuration."""
    from importlib.resources import files

    folder = files("tampu") / DEFAULTS
    return {entry.name: entry.read_text(encoding="utf-8")
            for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".toml")}


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
    try:
        domain = normalize_domain(domain)  # IDN domains welcome: faß.de, bücher.example
        hostname = domain_to_ascii(hostname or f"mail.{domain}")
    except AddressError as exc:
        raise ValueError(str(exc)) from None
    for name in (domain_to_ascii(domain), hostname):
        if "." not in name or name.startswith("["):
            raise ValueError(f"{name!r} is not a domain name")
    confd = directory / "conf.d"
    if confd.is_dir() and any(confd.iterdir()) and not force:
        raise ValueError(f"{confd} already exists and is not empty (use --force to overwrite)")
    root = directory.resolve()
    values = {"domain": domain, "hostname": hostname, "data_dir": data_dir,
              "config_dir": str(root), "certs": str(root / "certs")}
    files = {confd / "00-server.toml": SERVER.format(**values),
             **{confd / name: text for name, text in default_tables().items()},
             directory / "certs" / "README.txt": CERTS_README.format(**values)}
    (directory / "certs" / hostname).mkdir(parents=True, exist_ok=True)
    (directory / "domains" / domain).mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
