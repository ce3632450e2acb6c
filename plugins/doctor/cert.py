"""The certificate the server presents for its hostname: names and expiry.

The choice is the server's own (:func:`tampu.tls.load_certificates`,
:func:`tampu.tls.server_context`): ``certs/<hostname>/`` when it exists, else the first
folder; with no certificate at all and ``self_signed_cert``, the self-signed one made at
start (:func:`tampu.runtime.selfsigned_dir`).
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from tampu.config import Config
from tampu.errors import ConfigError
from tampu.plugins.doctor.report import Finding, fail, ok, warn
from tampu.runtime import selfsigned_dir
from tampu.tls import load_certificates

CHECK = "certificate"


def chosen_certificate(config: Config) -> tuple[Path | None, list[str]]:
    """The ``fullchain.pem`` the server would present for its hostname, and the problems
    that make certificates unusable (the server would not start with them)."""
    base = config.certs_dir
    try:
        contexts = load_certificates(base)
        if not contexts and config.server.self_signed_cert:
            base = selfsigned_dir(config)
            contexts = load_certificates(base)
    except ConfigError as exc:
        return None, list(exc.problems)
    if not contexts:
        return None, []
    hostname = config.server.hostname.lower()
    name = hostname if hostname in contexts else next(iter(contexts))
    for sub in sorted(base.iterdir()):
        if sub.name.lower() == name:
            return sub / "fullchain.pem", []
    return None, []  # the folder went away since


def names_of(cert: x509.Certificate) -> list[str]:
    """The DNS names of the certificate (subjectAltName; the CN when it has none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [str(n) for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def covers(pattern: str, hostname: str) -> bool:
    """RFC 6125 6.4.3: exact, or ``*.rest`` for exactly one label more."""
    pattern, hostname = pattern.lower().rstrip("."), hostname.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = hostname.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return pattern == hostname


def check_certificate(config: Config, hostname: str, warn_days: int,
                      now: datetime.datetime) -> Finding:
    """One finding about the certificate for ``hostname`` (A-label form)."""
    get_one = (f"get one for {hostname} (certbot certonly --standalone -d {hostname}) and "
               f"link it into {config.certs_dir}/{hostname}/: docs/operations.md")
    path, problems = chosen_certificate(config)
    if problems:
        return fail(CHECK, "; ".join(problems), notes=[get_one])
    if path is None and config.server.self_signed_cert:
        return warn(CHECK, f"no certificate in {config.certs_dir}/: the server makes a "
                    "self-signed one at start, which senders that verify (MTA-STS, DANE) "
                    "refuse", notes=[get_one])
    if path is None:
        return fail(CHECK, f"no certificate in {config.certs_dir}/ (fullchain.pem and "
                    "privkey.pem): STARTTLS and the submissions port cannot work",
                    notes=[get_one])
    try:
        cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError) as exc:
        return fail(CHECK, f"{path}: cannot read the certificate: {exc}", notes=[get_one])
    names = names_of(cert)
    expires = cert.not_valid_after_utc
    left = expires - now
    when = f"expires {expires:%Y-%m-%d} ({left.days} days)"
    where = f"{path}: {', '.join(names) or 'no names'}"
    if not any(covers(n, hostname) for n in names):
        return fail(CHECK, f"{where}: not valid for {hostname}", notes=[get_one])
    if left.total_seconds() <= 0:
        return fail(CHECK, f"{where}: expired on {expires:%Y-%m-%d}",
                    notes=["renew it (certbot renew), then: tampu reload"])
    if cert.issuer == cert.subject:
        return warn(CHECK, f"{where}: self-signed, {when}; senders that verify (MTA-STS, "
                    "DANE) refuse it", notes=[get_one])
    if left < datetime.timedelta(days=warn_days):
        return warn(CHECK, f"{where}: {when}",
                    notes=["renew it (certbot renew --deploy-hook \"tampu reload\")"])
    return ok(CHECK, f"{where}; {when}")
