"""chasquid's own files, read as they are: the users databases, ``chasquid.conf`` and the
domaininfo store; and ``chasquid.conf`` turned into an equivalent tampu conf.d.

All three are protocol-buffer *text format* (:mod:`tampu.chasquid.prototext`), with the schemas of
chasquid's ``userdb.proto``, ``config.proto`` and ``domaininfo.proto`` (chasquid 1.11 as
packaged by Debian, plus the fields added up to 1.18: ``Denied`` users, ``max_queue_items``,
``give_up_send_after``).

* ``domains/<domain>/users``: a ``ProtoDB`` with a ``users`` map, user -> ``Password``, whose
  scheme is ``scrypt {logN r p keyLen salt encrypted}``, ``plain {password}`` or
  ``denied {}`` (a receive-only user: exists for RCPT TO, never authenticates)::

      users: {
        key: "jose"
        value: {
          scrypt: {
            logN: 14
            r: 8
            p: 1
            keyLen: 32
            salt: "\\xfeo`\\x02{wv6..."
            encrypted: "Re\\xc9\\t..."
          }
        }
      }

* ``<data_dir>/domaininfo/s:<url.QueryEscape(domain)>``: one ``Domain`` per file,
  ``name: "example.com"  incoming_sec_level: TLS_CLIENT  outgoing_sec_level: TLS_SECURE``
  (PLAIN, the zero value, is not written).
"""


from __future__ import annotations

from tampu.chasquid.conf import (
    ChasquidConfig,
    confd_for_chasquid_dir,
    parse_config,
    parse_duration,
    read_config,
    to_confd,
)
from tampu.chasquid.domaininfo import (
    DomainInfo,
    read_domaininfo,
    tampu_domaininfo,
    tampu_domaininfo_path,
    write_tampu_domaininfo,
)
from tampu.chasquid.prototext import TextFormatError, parse_message, parse_text
from tampu.chasquid.prototext_format import format_text
from tampu.chasquid.schema import CONFIG_SCHEMA, DOMAININFO_SCHEMA, USERDB_SCHEMA, ChasquidError
from tampu.chasquid.users import (
    UserEntry,
    format_users,
    from_tampu_hash,
    looks_like_users_file,
    parse_users,
    read_users,
    verify_tampu_hash,
    write_users,
)

__all__ = [
    "CONFIG_SCHEMA",
    "DOMAININFO_SCHEMA",
    "USERDB_SCHEMA",
    "ChasquidConfig",
    "ChasquidError",
    "DomainInfo",
    "TextFormatError",
    "UserEntry",
    "confd_for_chasquid_dir",
    "format_text",
    "format_users",
    "from_tampu_hash",
    "looks_like_users_file",
    "parse_config",
    "parse_duration",
    "parse_message",
    "parse_text",
    "parse_users",
    "read_config",
    "read_domaininfo",
    "read_users",
    "tampu_domaininfo",
    "tampu_domaininfo_path",
    "to_confd",
    "verify_tampu_hash",
    "write_tampu_domaininfo",
    "write_users",
]
