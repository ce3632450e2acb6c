"""DKIM private keys in chasquid's layout: ``domains/<domain>/dkim:<selector>.pem``.

A key file is a PEM private key: PKCS#8 (``BEGIN PRIVATE KEY``, what ``tampu dkim keygen``,
``chasquid-util dkim-keygen`` and ``openssl genpkey`` write) or PKCS#1 (``BEGIN RSA PRIVATE
KEY``, what ``opendkim-genkey`` writes). RSA keys need at least 2048 bits (RFC 8301 says
signers MUST use at least 1024 and SHOULD use 2048); Ed25519 keys sign with
``ed25519-sha256`` (RFC 8463).

:class:`KeyStore` holds the keys of every local domain and re-reads them when the files
change (new, removed, replaced or edited), checking at most once per ``[server]
file_check_interval``.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from tampu.addresses import AddressError, domain_to_ascii, normalize_domain
from tampu.files import FileStamp, Stamp, fsync_dir
from tampu.users import Domains

if TYPE_CHECKING:  # cryptography (~8 MiB) is imported with the first key
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

log = logging.getLogger("tampu.plugins.dkim")

KEY_PREFIX: Final = "dkim:"
KEY_SUFFIX: Final = ".pem"
MIN_RSA_BITS: Final = 2048
MAX_KEY_FILE: Final = 64 * 1024

SignatureAlgorithm = Literal["rsa-sha256", "ed25519-sha256"]
KeygenAlgorithm = Literal["rsa2048", "rsa3072", "rsa4096", "ed25519"]
KEYGEN_ALGORITHMS: Final[tuple[KeygenAlgorithm, ...]] = ("rsa2048", "rsa3072", "rsa4096",
                                                         "ed25519")

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
"""RFC 6376 3.1: a selector is one or more dot-separated sub-domain labels (ASCII here)."""


class KeyFileError(ValueError):
    """A key file that cannot be used; the message starts with the file's path."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        self.why = why
        super().__init__(f"{path}: {why}")


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One signing key: which domain and selector it signs for, and its two halves."""

    domain: str
    """The canonical domain (tampu.addresses.normalize_domain)."""
    selector: str
    path: Path
    algorithm: SignatureAlgorithm
    bits: int
    signer: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | None = None
    """The private key (``cryptography``: the signature itself is OpenSSL's)."""
    public: str = ""
    """The base64 ``p=`` value: SubjectPublicKeyInfo (RSA) or the raw 32 bytes (Ed25519)."""

    @property
    def key_type(self) -> str:
        """The ``k=`` of the key record: ``rsa`` or ``ed25519``."""
        return "rsa" if self.algorithm == "rsa-sha256" else "ed25519"

    @property
    def ascii_domain(self) -> str:
        """The domain for ``d=`` and DNS: A-labels (RFC 6376 3.5 d= is ASCII)."""
        return domain_to_ascii(self.domain)

    def txt_record(self) -> str:
        """The text of the key record (RFC 6376 3.6.1), e.g. ``v=DKIM1; k=rsa; p=...``."""
        return f"v=DKIM1; k={self.key_type}; p={self.public}"

    def zone_record(self) -> str:
        """The TXT record to publish, in zone-file syntax, split into <=255-byte strings."""
        return zone_record(self.selector, self.ascii_domain, self.txt_record())


def zone_record(selector: str, domain: str, text: str) -> str:
    """``<selector>._domainkey.<domain>. IN TXT ("v=DKIM1; k=rsa; " "p=...")``."""
    head, sep, key = text.partition("p=")
    parts = [head] if head else []
    rest = sep + key
    parts += [rest[i:i + 255] for i in range(0, len(rest), 255)]
    strings = " ".join(f'"{p}"' for p in parts)
    return f"{selector}._domainkey.{domain}. IN TXT ({strings})"


def is_valid_selector(selector: str) -> bool:
    return bool(_SELECTOR.match(selector)) and len(selector) <= 200


def selector_of(path: Path) -> str | None:
    """The selector of a key file name ``dkim:<selector>.pem``; None for other files."""
    name = path.name
    if not (name.startswith(KEY_PREFIX) and name.endswith(KEY_SUFFIX)):
        return None
    return name[len(KEY_PREFIX):-len(KEY_SUFFIX)]


def key_path(domain_dir: Path, selector: str) -> Path:
    return domain_dir / f"{KEY_PREFIX}{selector}{KEY_SUFFIX}"


def domain_folder(domains_dir: Path, domain: str) -> Path:
    """The folder of ``domain`` in ``domains/`` (the core's one answer: an existing folder
    spelt differently, ``xn--`` or capitals, else ``domains/<canonical>``)."""
    return Domains(domains_dir, [], 0.0).folder(domain)


def key_files(domain_dir: Path) -> list[Path]:
    """The ``dkim:*.pem`` files of one domain folder, sorted by name (none if no folder)."""
    try:
        entries = list(os.scandir(domain_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(Path(e.path) for e in entries
                  if selector_of(Path(e.path)) is not None and not e.name.startswith("."))


def parse_key(data: bytes, path: Path, domain: str, selector: str) -> DkimKey:
    """A :class:`DkimKey` from PEM bytes; raises KeyFileError saying what is wrong."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if not is_valid_selector(selector):
        raise KeyFileError(path, f"{selector!r} is not a valid DKIM selector (letters, "
                           "digits, '-' and '.' as in a DNS name)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(path, "the key is encrypted; DKIM keys must be stored without "
                           "a passphrase") from None
    except ValueError as exc:
        raise KeyFileError(path, f"not a PEM private key ({exc})") from None
    except Exception as exc:  # UnsupportedAlgorithm and friends
        raise KeyFileError(path, f"cannot read the key: {type(exc).__name__}: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(path, f"RSA key of {key.key_size} bits is too small: DKIM "
                               f"keys need at least {MIN_RSA_BITS} bits (RFC 8301)")
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return DkimKey(domain, selector, path, "rsa-sha256", key.key_size, key,
                       base64.b64encode(public).decode("ascii"))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return DkimKey(domain, selector, path, "ed25519-sha256", 256, key,
                       base64.b64encode(raw).decode("ascii"))
    raise KeyFileError(path, f"unsupported key type {type(key).__name__}: DKIM keys are RSA "
                       "or Ed25519")


def load_key(path: Path, domain: str) -> DkimKey:
    """Read and parse one key file; raises KeyFileError naming the file."""
    selector = selector_of(path)
    if selector is None:
        raise KeyFileError(path, f"a key file is named {KEY_PREFIX}<selector>{KEY_SUFFIX}")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(path, f"larger than {MAX_KEY_FILE} bytes: not a key")
    return parse_key(data, path, domain, selector)


# ---------------------------------------------------------------------------- generation


def generate_key(algorithm: KeygenAlgorithm) -> bytes:
    """A new private key as PKCS#8 PEM (``BEGIN PRIVATE KEY``), as chasquid writes them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif algorithm in ("rsa2048", "rsa3072", "rsa4096"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm[3:]))
    else:
        raise ValueError(f"unsupported algorithm {algorithm!r}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_key_file(path: Path, pem: bytes, *, overwrite: bool = False) -> None:
    """Write ``pem`` to ``path`` with mode 0600, durably. Without ``overwrite`` an existing
    file is never replaced (FileExistsError), even by a race: the new file is linked in."""
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    fsync_dir(path.parent)


# ---------------------------------------------------------------------------- the store


@dataclass
class _KeyFile:
    stamp: FileStamp
    seen: Stamp | None = None
    loaded: bool = False
    key: DkimKey | None = None


@dataclass
class _Domain:
    path: Path
    stamp: FileStamp
    seen: Stamp | None = None
    files: dict[Path, _KeyFile] | None = None


class KeyStore:
    """The DKIM keys of the local domains, re-read when their files change.

    ``stamp`` makes the FileStamp of a path (``ServerContext.file_stamp``: checked at most
    once per ``[server] file_check_interval``). Thread-safe: signing runs in worker threads.
    """

    def __init__(self, domains_dir: Path, stamp: Callable[[Path], FileStamp]) -> None:
        self.domains_dir = domains_dir
        self._stamp = stamp
        self._root = stamp(domains_dir)
        self._root_seen: Stamp | None = None
        self._folders: dict[str, Path] = {}
        self._domains: dict[str, _Domain] = {}
        self._lock = threading.Lock()

    def load_all(self) -> list[str]:
        """Read every key of every domain now; returns the problems (``path: why``)."""
        problems: list[str] = []
        with self._lock:
            self._scan_folders()
            for domain in sorted(self._folders):
                problems += self._refresh(domain, initial=True)
        return problems

    def keys(self, domain: str) -> list[DkimKey]:
        """The usable keys of ``domain`` (any spelling), by selector; re-read if changed.

        A key file that became unreadable or broken is logged and left out.
        """
        try:
            canonical = normalize_domain(domain)
        except AddressError:
            return []
        with self._lock:
            root = self._root.stamp()
            if root != self._root_seen:
                self._scan_folders()
            self._refresh(canonical)
            entry = self._domains.get(canonical)
            if entry is None or not entry.files:
                return []
            return [f.key for _, f in sorted(entry.files.items()) if f.key is not None]

    def refresh(self) -> None:
        """Check every file at the next use (on reload)."""
        with self._lock:
            self._root.refresh()
            for entry in self._domains.values():
                entry.stamp.refresh()
                for f in (entry.files or {}).values():
                    f.stamp.refresh()

    def domains(self) -> list[str]:
        """The domains that have at least one usable key."""
        with self._lock:
            return sorted(d for d, e in self._domains.items()
                          if any(f.key is not None for f in (e.files or {}).values()))

    # ------------------------------------------------------------------ internals

    def _scan_folders(self) -> None:
        self._root_seen = self._root.stamp()
        folders: dict[str, Path] = {}
        try:
            entries = list(os.scandir(self.domains_dir))
        except OSError:
            entries = []
        for entry in entries:
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            try:
                folders.setdefault(normalize_domain(entry.name), Path(entry.path))
            except AddressError:
                continue
        self._folders = folders
        for gone in set(self._domains) - set(folders):
            del self._domains[gone]

    def _refresh(self, domain: str, initial: bool = False) -> list[str]:
        folder = self._folders.get(domain)
        if folder is None:
            return []
        entry = self._domains.get(domain)
        if entry is None or entry.path != folder:
            entry = self._domains[domain] = _Domain(folder, self._stamp(folder))
        dir_stamp = entry.stamp.stamp()
        if entry.files is None or dir_stamp != entry.seen:
            entry.seen = dir_stamp
            old = entry.files or {}
            entry.files = {p: old.get(p) or _KeyFile(self._stamp(p)) for p in key_files(folder)}
        problems: list[str] = []
        for path, kf in entry.files.items():
            stamp = kf.stamp.stamp()
            if kf.loaded and stamp == kf.seen:
                continue
            kf.seen, kf.loaded = stamp, True
            try:
                kf.key = load_key(path, domain)
                if not initial:
                    log.info("DKIM key %s loaded (%s, %d bits, selector %s)", path,
                             kf.key.algorithm, kf.key.bits, kf.key.selector)
            except KeyFileError as exc:
                kf.key = None
                problems.append(str(exc))
                if not initial:
                    log.error("DKIM key skipped: %s", exc)
        return problems
