"""Protocol buffers *text format*, by hand (no protoc): a strict parser and a writer.

Enough of the language for chasquid's files (``chasquid.conf``, ``domains/<d>/users``, the
domaininfo store), following the text format specification and Go's ``prototext`` (which
chasquid uses): ``name: scalar``, ``name {...}`` / ``name: <...>``, repeated fields and
``name: [a, b]`` lists, map entries as ``name { key: ... value: ... }``, strings in single or
double quotes with C escapes (``\\n``, octal ``\\123``, hex ``\\xAB``, ``\\uXXXX``,
``\\UXXXXXXXX``; adjacent strings are concatenated), decimal/hex/octal integers, floats,
identifiers (enum values, ``true``), ``#`` comments and optional ``,``/``;`` separators.
Extensions and ``Any`` (``[type.name]``) are not supported: they are an error.

Two levels (the writer is :mod:`tampu.chasquid.prototext_format`):

* :func:`parse_text` (no schema) gives plain Python structures: a message is a
  ``dict[str, list[value]]`` (every occurrence of a field, in order); a value is ``bytes``
  (a string literal), ``int``, ``float``, ``str`` (an identifier) or a nested message.
  ``format_text`` writes such a tree back.
* :func:`parse_message` checks the text against a schema (:class:`FieldSpec` per field name),
  as Go's ``prototext.Unmarshal`` does (unknown fields, a repeated singular field, two members
  of a oneof, invalid UTF-8 in a string field and out-of-range numbers are errors), and gives a
  ``dict[str, Any]`` of the fields present. ``format_message`` writes Go's multi-line form.

Every error is a :class:`TextFormatError` carrying the line number.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from tampu.errors import TampuError

MAX_DEPTH: Final = 100
"""Deepest nesting of messages accepted (Go allows more; no real file comes near)."""

TextValue = bytes | int | float | str | dict[str, list[Any]]
"""A value of :func:`parse_text`: string literal, integer, float, identifier, or message."""

Kind = Literal["string", "bytes", "bool", "int32", "int64", "uint32", "uint64", "double",
               "enum", "message", "map"]


class TextFormatError(TampuError, ValueError):
    """The text is not valid text format (or does not fit the schema); ``line`` is 1-based."""

    def __init__(self, message: str, line: int) -> None:
        self.message = message
        self.line = line
        super().__init__(f"line {line}: {message}")


@dataclass(frozen=True)
class FieldSpec:
    """One field of a message schema.

    ``message`` is the schema of a message field; for a ``map`` it is the entry's schema (its
    ``key`` and ``value`` fields). ``enum`` names the enum's values by number. ``optional`` is
    proto3's explicit presence (written even when zero); ``oneof`` names the field's oneof.
    """

    number: int
    kind: Kind
    repeated: bool = False
    message: Mapping[str, FieldSpec] | None = None
    enum: tuple[str, ...] = ()
    optional: bool = False
    oneof: str | None = None


MessageSpec = Mapping[str, FieldSpec]

# ---------------------------------------------------------------------------- tokenizer

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"""
    0[xX][0-9a-fA-F]+                                          (?P<hex>)
  | (?: (?:0|[1-9][0-9]*)\.[0-9]*(?:[eE][+-]?[0-9]+)?
      | \.[0-9]+(?:[eE][+-]?[0-9]+)?
      | (?:0|[1-9][0-9]*)[eE][+-]?[0-9]+ ) [fF]?               (?P<float>)
  | (?:0|[1-9][0-9]*)[fF]                                      (?P<decf>)
  | 0[0-7]+                                                    (?P<oct>)
  | (?:0|[1-9][0-9]*)                                          (?P<dec>)
""", re.VERBOSE)
_WORD_CHAR = re.compile(r"[A-Za-z0-9_.]")
_SPACE = " \t\n\r\v\f"
_PUNCT = "{}<>[]:,;"
_SIMPLE_ESCAPES: Final = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11,
                          "\\": 92, "'": 39, '"': 34, "?": 63}
_FLOAT_WORDS = ("inf", "infinity", "nan")


@dataclass
class _Tok:
    kind: Literal["punct", "ident", "string", "int", "float", "eof"]
    value: Any
    line: int


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self._peeked: _Tok | None = None

    def error(self, message: str, line: int | None = None) -> TextFormatError:
        return TextFormatError(message, self.line if line is None else line)

    def _skip(self) -> None:
        text, n = self.text, len(self.text)
        while self.pos < n:
            c = text[self.pos]
            if c == "\n":
                self.line += 1
                self.pos += 1
            elif c in _SPACE:
                self.pos += 1
            elif c == "#":
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end
            else:
                return

    def peek(self) -> _Tok:
        if self._peeked is None:
            self._peeked = self._next()
        return self._peeked

    def take(self) -> _Tok:
        tok = self.peek()
        self._peeked = None
        return tok

    def _next(self) -> _Tok:
        self._skip()
        if self.pos >= len(self.text):
            return _Tok("eof", None, self.line)
        c = self.text[self.pos]
        line = self.line
        if c in _PUNCT:
            self.pos += 1
            return _Tok("punct", c, line)
        if c in "\"'":
            data = self._string()
            while True:  # adjacent string literals are one value
                self._skip()
                if self.pos < len(self.text) and self.text[self.pos] in "\"'":
                    data += self._string()
                else:
                    return _Tok("string", data, line)
        if c == "-":
            self.pos += 1
            self._skip()  # the spec allows whitespace and comments after the sign
            m = IDENT.match(self.text, self.pos)
            if m and m.group().lower() in _FLOAT_WORDS:
                self.pos = m.end()
                return _Tok("float", -float(m.group().lower().replace("infinity", "inf")),
                            line)
            kind, value = self._number(negative=True)
            return _Tok(kind, value, line)
        if c.isdigit() or (c == "." and self.text[self.pos + 1:self.pos + 2].isdigit()):
            kind, value = self._number(negative=False)
            return _Tok(kind, value, line)
        m = IDENT.match(self.text, self.pos)
        if m:
            self.pos = m.end()
            return _Tok("ident", m.group(), line)
        raise self.error(f"unexpected character {c!r}")

    def _number(self, *, negative: bool) -> tuple[Literal["int", "float"], int | float]:
        m = _NUMBER.match(self.text, self.pos)
        if m is None or not m.group():
            raise self.error("expected a number after '-'" if negative else "invalid number")
        end = m.end()
        if end < len(self.text) and _WORD_CHAR.match(self.text, end):
            raise self.error(f"invalid number {self.text[self.pos:end + 1]!r}")
        raw = m.group()
        if len(raw) > 400:  # no field needs more; Python refuses ints of over 4300 digits
            raise self.error("number too long")
        self.pos = end
        sign = -1 if negative else 1
        group = m.lastgroup
        if group == "hex":
            return "int", sign * int(raw, 16)
        if group == "oct":
            return "int", sign * int(raw, 8)
        if group == "dec":
            return "int", sign * int(raw)
        return "float", sign * float(raw.rstrip("fF"))

    def _string(self) -> bytes:
        text = self.text
        quote = text[self.pos]
        i = self.pos + 1
        out = bytearray()
        n = len(text)
        while True:
            if i >= n:
                raise self.error("unterminated string")
            c = text[i]
            if c == quote:
                self.pos = i + 1
                return bytes(out)
            if c == "\n" or c == "\x00":
                raise self.error(f"invalid character {c!r} in string")
            if c != "\\":
                j = i + 1
                while j < n and text[j] not in ("\\", quote, "\n", "\x00"):
                    j += 1
                try:
                    out += text[i:j].encode("utf-8")
                except UnicodeEncodeError:
                    raise self.error("invalid character (a lone surrogate) in string") from None
                i = j
                continue
            i = self._escape(i + 1, out)

    def _escape(self, i: int, out: bytearray) -> int:
        """Decode the escape after the backslash at ``i - 1`` into ``out``; the next index."""
        text = self.text
        if i >= len(text):
            raise self.error("unterminated string")
        c = text[i]
        if c in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[c])
            return i + 1
        if c in "01234567":
            j = i
            while j < len(text) and j < i + 3 and text[j] in "01234567":
                j += 1
            value = int(text[i:j], 8)
            if value > 0xFF:
                raise self.error(f"invalid octal escape \\{text[i:j]} (above \\377)")
            out.append(value)
            return j
        if c in "xX":
            j = i + 1
            while j < len(text) and j < i + 3 and text[j] in "0123456789abcdefABCDEF":
                j += 1
            if j == i + 1:
                raise self.error("invalid hex escape: \\x needs one or two hex digits")
            out.append(int(text[i + 1:j], 16))
            return j
        if c in "uU":
            code, j = self._hex_digits(i + 1, 4 if c == "u" else 8)
            if 0xD800 <= code <= 0xDBFF and text[j:j + 2] == "\\u":
                low, k = self._hex_digits(j + 2, 4)
                if 0xDC00 <= low <= 0xDFFF:
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    j = k
            if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
                raise self.error(f"invalid Unicode escape \\{c}{text[i + 1:j]}")
            out += chr(code).encode("utf-8")
            return j
        raise self.error(f"invalid escape \\{c}")

    def _hex_digits(self, i: int, count: int) -> tuple[int, int]:
        digits = self.text[i:i + count]
        if len(digits) != count or any(d not in "0123456789abcdefABCDEF" for d in digits):
            raise self.error(f"invalid Unicode escape: expected {count} hex digits")
        return int(digits, 16), i + count


# ---------------------------------------------------------------------------- parser


@dataclass
class _Node:
    """One occurrence of a field: a scalar token, or a message (its nodes)."""

    name: str
    line: int
    scalar: _Tok | None = None
    fields: list[_Node] = field(default_factory=list)


_CLOSE = {"{": "}", "<": ">"}


def _parse_fields(lex: _Lexer, close: str | None, depth: int) -> list[_Node]:
    if depth > MAX_DEPTH:
        raise lex.error(f"messages nested deeper than {MAX_DEPTH} levels")
    nodes: list[_Node] = []
    while True:
        tok = lex.take()
        if tok.kind == "eof":
            if close is not None:
                raise lex.error(f"unexpected end of input: missing {close!r}", tok.line)
            return nodes
        if tok.kind == "punct" and tok.value == close:
            return nodes
        if tok.kind == "punct" and tok.value == "[":
            raise lex.error("extension and Any fields ([name]) are not supported", tok.line)
        if tok.kind != "ident":
            raise lex.error(f"expected a field name, got {_describe(tok)}", tok.line)
        name = tok.value
        colon = lex.peek().kind == "punct" and lex.peek().value == ":"
        if colon:
            lex.take()
        nxt = lex.peek()
        if nxt.kind == "punct" and nxt.value == "[":
            lex.take()
            nodes.extend(_parse_list(lex, name, colon, depth))
        elif nxt.kind == "punct" and nxt.value in _CLOSE:
            lex.take()
            nodes.append(_Node(name, nxt.line, fields=_parse_fields(lex, _CLOSE[nxt.value],
                                                                   depth + 1)))
        elif not colon:
            raise lex.error(f"missing ':' after field name {name!r}", nxt.line)
        else:
            nodes.append(_Node(name, nxt.line, scalar=_scalar(lex)))
        sep = lex.peek()
        if sep.kind == "punct" and sep.value in ",;":
            lex.take()


def _parse_list(lex: _Lexer, name: str, colon: bool, depth: int) -> list[_Node]:
    nodes: list[_Node] = []
    first = True
    while True:
        tok = lex.peek()
        if tok.kind == "punct" and tok.value == "]":
            lex.take()
            return nodes
        if not first:
            if not (tok.kind == "punct" and tok.value == ","):
                raise lex.error(f"expected ',' or ']' in the list of {name!r}, got "
                                f"{_describe(tok)}", tok.line)
            lex.take()
            tok = lex.peek()
        first = False
        if tok.kind == "punct" and tok.value in _CLOSE:
            lex.take()
            nodes.append(_Node(name, tok.line, fields=_parse_fields(lex, _CLOSE[tok.value],
                                                                   depth + 1)))
        elif not colon:
            raise lex.error(f"missing ':' after field name {name!r}", tok.line)
        else:
            nodes.append(_Node(name, tok.line, scalar=_scalar(lex)))


def _scalar(lex: _Lexer) -> _Tok:
    tok = lex.take()
    if tok.kind in ("string", "int", "float", "ident"):
        return tok
    raise lex.error(f"expected a value, got {_describe(tok)}", tok.line)


def _describe(tok: _Tok) -> str:
    if tok.kind == "eof":
        return "the end of the input"
    if tok.kind == "punct":
        return repr(tok.value)
    return f"{tok.kind} {tok.value!r}"


def _parse(text: str | bytes) -> list[_Node]:
    if isinstance(text, bytes):
        data = text
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            raise TextFormatError("not valid UTF-8", line) from None
    return _parse_fields(_Lexer(text), None, 0)


def parse_text(text: str | bytes) -> dict[str, list[Any]]:
    """Parse without a schema into plain structures (see the module docstring)."""
    return _plain(_parse(text))


def _plain(nodes: list[_Node]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in nodes:
        value = node.scalar.value if node.scalar is not None else _plain(node.fields)
        out.setdefault(node.name, []).append(value)
    return out


# ---------------------------------------------------------------------------- schema

_RANGES: Final = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1),
                  "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1)}
_BOOL_WORDS: Final = {"true": True, "True": True, "t": True, "false": False, "False": False,
                      "f": False}


def parse_message(text: str | bytes, schema: MessageSpec) -> dict[str, Any]:
    """Parse and check against ``schema``: the fields present, typed (see module docstring).

    Strings are ``str``, bytes ``bytes``, enums their value's name (or the number, for a
    number no name has), messages dicts, repeated fields lists, maps dicts (last key wins).
    """
    return _typed(_parse(text), schema)


def _typed(nodes: list[_Node], schema: MessageSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    oneofs: dict[str, str] = {}
    for node in nodes:
        spec = schema.get(node.name)
        if spec is None:
            raise TextFormatError(f"unknown field {node.name!r}", node.line)
        if spec.oneof is not None:
            other = oneofs.setdefault(spec.oneof, node.name)
            if other != node.name:
                raise TextFormatError(f"field {node.name!r}: oneof {spec.oneof!r} is already "
                                      f"set by {other!r}", node.line)
        value = _value(node, spec)
        if spec.kind == "map":
            key, val = value
            out.setdefault(node.name, {})[key] = val
        elif spec.repeated:
            out.setdefault(node.name, []).append(value)
        elif node.name in out:
            raise TextFormatError(f"non-repeated field {node.name!r} is repeated", node.line)
        else:
            out[node.name] = value
    return out


def _value(node: _Node, spec: FieldSpec) -> Any:
    if spec.kind in ("message", "map"):
        if node.scalar is not None:
            raise TextFormatError(f"field {node.name!r}: expected a message {{...}}, got "
                                  f"{_describe(node.scalar)}", node.line)
        assert spec.message is not None
        value = _typed(node.fields, spec.message)
        if spec.kind == "message":
            return value
        key_spec, value_spec = spec.message["key"], spec.message["value"]
        key = value.get("key", zero_value(key_spec))
        return key, value.get("value", zero_value(value_spec))
    tok = node.scalar
    if tok is None:
        raise TextFormatError(f"field {node.name!r}: expected a {spec.kind} value, got a "
                              "message", node.line)
    kind = spec.kind
    if kind in ("string", "bytes"):
        if tok.kind != "string":
            raise TextFormatError(f"field {node.name!r}: expected a quoted string, got "
                                  f"{_describe(tok)}", tok.line)
        if kind == "bytes":
            return tok.value
        try:
            return tok.value.decode("utf-8")
        except UnicodeDecodeError:
            raise TextFormatError(f"field {node.name!r}: string is not valid UTF-8 (use a "
                                  "bytes field for binary data)", tok.line) from None
    if kind == "bool":
        if tok.kind == "ident" and tok.value in _BOOL_WORDS:
            return _BOOL_WORDS[tok.value]
        if tok.kind == "int" and tok.value in (0, 1):
            return bool(tok.value)
        raise TextFormatError(f"field {node.name!r}: expected true or false, got "
                              f"{_describe(tok)}", tok.line)
    if kind in _RANGES:
        if tok.kind != "int":
            raise TextFormatError(f"field {node.name!r}: expected an integer, got "
                                  f"{_describe(tok)}", tok.line)
        low, high = _RANGES[kind]
        if not low <= tok.value <= high:
            raise TextFormatError(f"field {node.name!r}: {tok.value} is out of range for "
                                  f"{kind}", tok.line)
        return tok.value
    if kind == "double":
        if tok.kind in ("int", "float"):
            return float(tok.value)
        if tok.kind == "ident" and tok.value.lower() in _FLOAT_WORDS:
            return float(tok.value.lower().replace("infinity", "inf"))
        raise TextFormatError(f"field {node.name!r}: expected a number, got "
                              f"{_describe(tok)}", tok.line)
    # enum
    if tok.kind == "ident" and tok.value in spec.enum:
        return tok.value
    if tok.kind == "int" and _RANGES["int32"][0] <= tok.value <= _RANGES["int32"][1]:
        return spec.enum[tok.value] if 0 <= tok.value < len(spec.enum) else tok.value
    raise TextFormatError(f"field {node.name!r}: {_describe(tok)} is not one of "
                          f"{', '.join(spec.enum)}", tok.line)


def zero_value(spec: FieldSpec) -> Any:
    """The proto3 zero value of a field (what an absent scalar means)."""
    zeros: dict[str, Any] = {"string": "", "bytes": b"", "bool": False, "double": 0.0,
                             "message": {}}
    if spec.kind == "enum":
        return spec.enum[0]
    return zeros.get(spec.kind, 0)
