"""RSA signature checks for dkimpy with OpenSSL (``cryptography``), as signing already is.

dkimpy verifies RSASSA-PKCS1-v1_5 in pure Python (``dkim.crypto.RSASSA_PKCS1_v1_5_verify``:
about 380 us for a 2048-bit key, against 34 us in OpenSSL). :func:`install` puts
:func:`rsa_verify` in its place: the same arguments (dkimpy's hash object, the signature,
dkimpy's parsed public key) and the same answer; everything else (parsing, canonicalization,
the body hash, the key-size rule) stays dkimpy's. dkimpy calls the function by its module
name from ``DKIM.verify_sig_process``; ``tests/plugins/test_dkim.py`` fails if it stops doing
so, or if the two disagree.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import dkim
import dkim.crypto

if TYPE_CHECKING:  # cryptography (~8 MiB) is imported by the first verification
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

_PURE = dkim.crypto.RSASSA_PKCS1_v1_5_verify
"""dkimpy's own (for a hash OpenSSL is not asked about)."""


@functools.lru_cache(maxsize=1024)
def _public_key(modulus: int, exponent: int) -> RSAPublicKey:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    return RSAPublicNumbers(exponent, modulus).public_key()


@functools.cache
def _openssl() -> tuple[type[Exception], Any, dict[str, Any]]:
    """What a check needs from cryptography, made once: InvalidSignature, the PKCS #1 v1.5
    padding, and the prehashed algorithm per hash name."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    # SHA-1 is refused before this (RFC 8301); kept for parity with dkimpy
    return InvalidSignature, PKCS1v15(), {"sha256": Prehashed(hashes.SHA256()),
                                          "sha1": Prehashed(hashes.SHA1())}


def rsa_verify(hash_: Any, signature: bytes, public_key: dict[str, int]) -> bool:  # noqa: ANN401 - dkimpy's hash object
    """``dkim.crypto.RSASSA_PKCS1_v1_5_verify`` with OpenSSL: True when ``signature`` is
    ``hash_``'s digest signed with the key. Raises ``dkim.crypto.DigestTooLargeError`` for a
    key OpenSSL cannot use (too small a modulus), as dkimpy does."""
    invalid, padding, prehashed = _openssl()
    algorithm = prehashed.get(hash_.name)
    if algorithm is None:
        return bool(_PURE(hash_, signature, public_key))
    modulus = public_key["modulus"]
    try:
        key = _public_key(modulus, public_key["publicExponent"])
    except ValueError as exc:  # e.g. an even or tiny modulus
        raise dkim.crypto.DigestTooLargeError(str(exc)) from None
    size = (modulus.bit_length() + 7) // 8
    if len(signature) != size:  # dkimpy reads the signature as a number (RFC 8017 8.2.2
        # wants exactly k octets): one without its leading zeros, or with more, still counts
        signature = (int.from_bytes(signature, "big") % modulus).to_bytes(size, "big")
    try:
        key.verify(signature, hash_.digest(), padding, algorithm)
    except invalid:
        return False
    except ValueError as exc:
        raise dkim.crypto.DigestTooLargeError(str(exc)) from None
    return True


def install() -> None:
    """Make dkimpy check RSA signatures with :func:`rsa_verify` (idempotent)."""
    dkim.RSASSA_PKCS1_v1_5_verify = rsa_verify
