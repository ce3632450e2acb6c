"""Certificates in chasquid's layout (``certs/<name>/fullchain.pem`` + ``privkey.pem``), SNI."""

from __future__ import annotations

import datetime
import logging
import ssl
from pathlib import Path

from tampu.errors import ConfigError

log = logging.getLogger("tampu.tls")


def _context(fullchain: Path, privkey: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No session tickets: chasquid 1.15.1 turned them off after Microsoft's servers failed
    # to deliver with them; a mail server gains little from resumption.
    ctx.options |= ssl.OP_NO_TICKET  # TLS 1.2
    ctx.num_tickets = 0  # TLS 1.3
    ctx.load_cert_chain(fullchain, privkey)
    return ctx


def is_handshake_noise(exc: BaseException | None) -> bool:
    """A TLS error caused by the peer (aborted or failed handshake), not by tampu."""
    return isinstance(exc, ssl.SSLError | ConnectionResetError | BrokenPipeError |
                      ConnectionAbortedError | TimeoutError)


def load_certificates(certs_dir: Path) -> dict[str, ssl.SSLContext]:
    """One SSL context per ``certs_dir/<name>/`` with both files. Raises ConfigError."""
    contexts: dict[str, ssl.SSLContext] = {}
    if not certs_dir.is_dir():
        return contexts
    problems = []
    for sub in sorted(certs_dir.iterdir()):
        chain, key = sub / "fullchain.pem", sub / "privkey.pem"
        if not sub.is_dir() or not chain.exists() or not key.exists():
            continue
        try:
            contexts[sub.name.lower()] = _context(chain, key)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{sub}: cannot load certificate: {exc}")
    if problems:
        raise ConfigError(problems)
    return contexts


def server_context(contexts: dict[str, ssl.SSLContext], hostname: str) -> ssl.SSLContext | None:
    """The listening context: the hostname's certificate (or the first), others by SNI."""
    if not contexts:
        return None
    default = contexts.get(hostname.lower()) or next(iter(contexts.values()))

    def pick(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        if not name:
            return
        name = name.lower().rstrip(".")
        chosen = contexts.get(name)
        if chosen is None and "." in name:
            chosen = contexts.get(name.split(".", 1)[1])
        if chosen is not None:
            sslobj.context = chosen
        sslobj._tampu_sni = name  # type: ignore[attr-defined]  # read back for Received

    default.sni_callback = pick
    return default


_MAKE = ("import sys, pathlib, tampu.tls; "
         "tampu.tls.make_self_signed(pathlib.Path(sys.argv[1]), sys.argv[2])")


def ensure_self_signed(directory: Path, hostname: str) -> None:
    """Make the self-signed certificate once: before reception workers fork, and written
    atomically (a folder renamed into place), so that no process sees half of it. It is
    made by a short-lived interpreter: ``cryptography`` (8 MiB) stays out of the server's
    memory and out of the workers it forks. Raises ConfigError."""
    if (directory / hostname / "fullchain.pem").exists():
        return
    import subprocess
    import sys
    import tempfile

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-") as tmp:
        try:
            done = subprocess.run([sys.executable, "-c", _MAKE, tmp, hostname],
                                  capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError([f"{directory}: cannot make a self-signed certificate: "
                               f"{exc}"]) from None
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            raise ConfigError([f"{directory}: cannot make a self-signed certificate: {why}"])
        try:
            (Path(tmp) / hostname).rename(directory / hostname)
        except OSError:  # another process made it meanwhile: keep theirs
            return
    log.warning("made a self-signed certificate for %s in %s (for testing only)", hostname,
                directory / hostname)


def make_self_signed(directory: Path, hostname: str) -> Path:
    """Write a self-signed certificate for ``hostname`` into ``directory/<hostname>/``
    (:func:`ensure_self_signed` runs it in a child interpreter)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    target = directory / hostname
    target.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    keyfile = target / "privkey.pem"
    keyfile.touch(mode=0o600)
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    (target / "fullchain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return target
