"""Protocol buffers *text format*: the writer (the parser is :mod:`tampu.chasquid.prototext`).

:func:`format_text` writes a :func:`~tampu.chasquid.prototext.parse_text` tree back;
:func:`format_message` writes the values of
:func:`~tampu.chasquid.prototext.parse_message` in Go's multi-line form, as chasquid-util
does (by field number, map entries sorted, proto3 zero values left out), so the files tampu
writes for chasquid read the same in both programs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from tampu.chasquid.prototext import IDENT, FieldSpec, MessageSpec, zero_value


def quote_bytes(data: bytes) -> str:
    """A double-quoted string literal for ``data``, escaped as Go's prototext does: printable
    UTF-8 as it is, ``\\"`` ``\\\\`` ``\\n`` ``\\r`` ``\\t``, other controls and invalid bytes
    as ``\\xHH``, C1 controls as ``\\u00HH``."""
    out = ['"']
    text = data.decode("utf-8", "surrogateescape")
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not valid UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0x80 <= code <= 0x9F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _format_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return quote_bytes(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        if not IDENT.fullmatch(value):
            raise ValueError(f"{value!r} is not an identifier")
        return value
    raise TypeError(f"cannot write {type(value).__name__} in text format")


def format_text(tree: Mapping[str, Sequence[Any]], indent: str = "") -> str:
    """Write a :func:`parse_text` tree (``bytes`` are strings, ``str`` identifiers)."""
    lines: list[str] = []
    for name, values in tree.items():
        if not IDENT.fullmatch(name):
            raise ValueError(f"{name!r} is not a field name")
        for value in values:
            if isinstance(value, Mapping):
                lines.append(_message_lines(name, format_text(value, indent + "  "), indent))
            else:
                lines.append(f"{indent}{name}: {_format_scalar(value)}\n")
    return "".join(lines)


def _message_lines(name: str, body: str, indent: str) -> str:
    return f"{indent}{name}: {{}}\n" if not body else f"{indent}{name}: {{\n{body}{indent}}}\n"


def format_message(values: Mapping[str, Any], schema: MessageSpec, indent: str = "") -> str:
    """Write ``values`` (as :func:`parse_message` returns them) in Go's multi-line form: by
    field number, map entries sorted by key, proto3 zero values left out (unless the field
    is ``optional`` or in a oneof)."""
    lines: list[str] = []
    for name, spec in sorted(schema.items(), key=lambda kv: kv[1].number):
        if name not in values:
            continue
        value = values[name]
        if spec.kind == "map":
            assert spec.message is not None
            for key in sorted(value):
                entry = {"key": key, "value": value[key]}
                lines.append(_message_lines(name, format_message(entry, spec.message,
                                                                 indent + "  "), indent))
            continue
        items = value if spec.repeated else [value]
        for item in items:
            if spec.kind == "message":
                assert spec.message is not None
                lines.append(_message_lines(name, format_message(item, spec.message,
                                                                 indent + "  "), indent))
            elif (not spec.repeated and not spec.optional and spec.oneof is None
                  and item == zero_value(spec)):
                continue  # proto3: a zero value is not written
            else:
                lines.append(f"{indent}{name}: {_format_typed(item, spec)}\n")
    return "".join(lines)


def _format_typed(value: Any, spec: FieldSpec) -> str:
    if spec.kind == "string":
        return quote_bytes(value.encode("utf-8"))
    if spec.kind == "enum":
        return value if isinstance(value, str) else str(int(value))
    if spec.kind == "double":
        return _format_scalar(float(value))
    return _format_scalar(value)
