"""``tampu dkim keygen DOMAIN`` and ``tampu dkim dns DOMAIN``, like chasquid-util's
``dkim-keygen`` and ``dkim-dns``: same file layout (``domains/<domain>/dkim:<selector>.pem``,
PKCS#8 PEM) and default selector (today's date, ``YYYYMMDD``, UTC); the DNS record is printed
in zone-file syntax, split into strings of at most 255 bytes."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from tampu.addresses import AddressError, domain_to_ascii, normalize_domain
from tampu.plugins.dkim.keys import (
    KEY_PREFIX,
    KEY_SUFFIX,
    KEYGEN_ALGORITHMS,
    KeyFileError,
    KeygenAlgorithm,
    domain_folder,
    generate_key,
    is_valid_selector,
    key_files,
    key_path,
    load_key,
    parse_key,
    write_key_file,
)

DEFAULT_ALGORITHM: KeygenAlgorithm = "rsa2048"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tampu.cli import config_dir_option

    p = config_dir_option(subparsers.add_parser("dkim", help="DKIM keys: make one, print "
                                                "the DNS records"))
    sub = p.add_subparsers(dest="dkim_command", required=True)
    gen = config_dir_option(sub.add_parser("keygen", help="make a key for a domain and print "
                                           "its DNS record"))
    gen.add_argument("domain", help="the signing domain (a local domain)")
    gen.add_argument("--selector", help="the selector (default: today's date, YYYYMMDD)")
    gen.add_argument("--algorithm", choices=KEYGEN_ALGORITHMS, default=DEFAULT_ALGORITHM,
                     help=f"key type and size (default: {DEFAULT_ALGORITHM})")
    gen.add_argument("--force", action="store_true", help="replace an existing key file")
    dns = config_dir_option(sub.add_parser("dns", help="print the DNS TXT record of each key "
                                           "of a domain"))
    dns.add_argument("domain")
    p.set_defaults(func=main)


def _err(text: str) -> None:
    print(f"tampu: {text}", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    try:
        domain = normalize_domain(args.domain)
        domain_to_ascii(domain)
    except AddressError as exc:
        _err(str(exc))
        return 2
    domain_dir = domain_folder(Path(args.config_dir) / "domains", domain)
    if args.dkim_command == "keygen":
        return keygen(domain, domain_dir, args.selector, args.algorithm, args.force)
    return dns(domain, domain_dir)


def keygen(domain: str, domain_dir: Path, selector: str | None, algorithm: KeygenAlgorithm,
           force: bool) -> int:
    selector = selector or datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
    if not is_valid_selector(selector):
        _err(f"{selector!r} is not a valid selector (letters, digits, '-' and '.')")
        return 2
    path = key_path(domain_dir, selector)
    if path.exists() and not force:
        _err(f'key already exists at "{path}" (use --force to replace it)')
        return 1
    if not domain_dir.is_dir():
        domain_dir.mkdir(parents=True, mode=0o755)
        _err(f"created {domain_dir}/: every folder in domains/ is a local domain")
    pem = generate_key(algorithm)
    key = parse_key(pem, path, domain, selector)
    try:
        write_key_file(path, pem, overwrite=force)
    except FileExistsError:
        _err(f'key already exists at "{path}"')
        return 1
    print(f'Key written to "{path}"\n')
    print(key.zone_record())
    return 0


def dns(domain: str, domain_dir: Path) -> int:
    files = key_files(domain_dir)
    if not files:
        _err(f'no DKIM keys found in "{domain_dir}/{KEY_PREFIX}*{KEY_SUFFIX}"')
        return 1
    status = 0
    for path in files:
        try:
            print(load_key(path, domain).zone_record())
        except KeyFileError as exc:
            _err(str(exc))
            status = 1
    return status
