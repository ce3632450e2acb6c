"""chasquid's protocol-buffer schemas (userdb, config, domaininfo) and its errors."""

from __future__ import annotations

from typing import Final

from tampu.chasquid.prototext import (
    FieldSpec,
    MessageSpec,
)
from tampu.errors import TampuError


class ChasquidError(TampuError, ValueError):
    """A chasquid file is valid text format but not something chasquid would accept."""


# ---------------------------------------------------------------------------- schemas

_SCRYPT: MessageSpec = {
    "logN": FieldSpec(1, "uint64"), "r": FieldSpec(2, "int32"), "p": FieldSpec(3, "int32"),
    "keyLen": FieldSpec(4, "int32"), "salt": FieldSpec(5, "bytes"),
    "encrypted": FieldSpec(6, "bytes"),
}
_PASSWORD: MessageSpec = {
    "scrypt": FieldSpec(2, "message", message=_SCRYPT, oneof="scheme"),
    "plain": FieldSpec(3, "message", message={"password": FieldSpec(1, "bytes")},
                       oneof="scheme"),
    "denied": FieldSpec(4, "message", message={}, oneof="scheme"),
}
USERDB_SCHEMA: Final[MessageSpec] = {
    "users": FieldSpec(1, "map", message={"key": FieldSpec(1, "string"),
                                          "value": FieldSpec(2, "message", message=_PASSWORD)}),
}
"""chasquid's ``userdb.proto`` (``ProtoDB``)."""

CONFIG_SCHEMA: Final[MessageSpec] = {
    "hostname": FieldSpec(1, "string"),
    "max_data_size_mb": FieldSpec(2, "int64"),
    "smtp_address": FieldSpec(3, "string", repeated=True),
    "submission_address": FieldSpec(4, "string", repeated=True),
    "submission_over_tls_address": FieldSpec(5, "string", repeated=True),
    "monitoring_address": FieldSpec(6, "string"),
    "mail_delivery_agent_bin": FieldSpec(7, "string"),
    "mail_delivery_agent_args": FieldSpec(8, "string", repeated=True),
    "data_dir": FieldSpec(9, "string"),
    "suffix_separators": FieldSpec(10, "string", optional=True),
    "drop_characters": FieldSpec(11, "string", optional=True),
    "mail_log_path": FieldSpec(12, "string"),
    "dovecot_auth": FieldSpec(13, "bool"),
    "dovecot_userdb_path": FieldSpec(14, "string"),
    "dovecot_client_path": FieldSpec(15, "string"),
    "haproxy_incoming": FieldSpec(16, "bool"),
    "max_queue_items": FieldSpec(17, "uint32"),
    "give_up_send_after": FieldSpec(18, "string"),
}
"""chasquid's ``config.proto`` (``Config``): fields 1-16 are 1.11's, 17-18 came in 1.16."""

SEC_LEVELS: Final = ("PLAIN", "TLS_CLIENT", "TLS_INSECURE", "TLS_SECURE")
DOMAININFO_SCHEMA: Final[MessageSpec] = {
    "name": FieldSpec(1, "string"),
    "incoming_sec_level": FieldSpec(2, "enum", enum=SEC_LEVELS),
    "outgoing_sec_level": FieldSpec(3, "enum", enum=SEC_LEVELS),
}
"""chasquid's ``domaininfo.proto`` (``Domain``)."""

