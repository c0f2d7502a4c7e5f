"""A documented subset of Google AIP-160 filters, compiled to parameterized PostgreSQL.

Grammar (AIP-160 precedence, loosest first)::

    filter      := [expression]
    expression  := sequence {"AND" sequence}
    sequence    := factor {factor}              -- adjacency means AND
    factor      := term {"OR" term}             -- OR binds tighter than AND
    term        := ["NOT" | "-"] simple
    simple      := restriction | "(" expression ")"
    restriction := member comparator value
    member      := NAME {"." KEY}               -- dotted keys only on JSON fields
    comparator  := "=" | "!=" | "<" | "<=" | ">" | ">=" | ":"
    value       := STRING | WORD                -- WORD covers numbers, true, false, null

``AND``, ``OR`` and ``NOT`` are keywords only in upper case; ``-`` negates only when it
directly precedes the term. Strings take double or single quotes; inside them ``\\\\``,
``\\"`` and ``\\'`` are the only escapes. Bare values have no quotes and stop at
whitespace, parentheses, quotes and comparator characters, so RFC 3339 timestamps
(which contain ``:``) must be quoted.

What each field kind accepts:

============  =========================  ==================================================
kind          operators                  value
============  =========================  ==================================================
STRING        ``=`` ``!=``               string, bare word, number or boolean (as text)
ENUM          ``=`` ``!=``               a key of ``FieldSpec.enum_values`` (case-sensitive)
TIMESTAMP     all six comparisons        RFC 3339 string with a zone offset
INTEGER       all six comparisons        integer literal in the int64 range
UUID          ``=`` ``!=``               UUID in canonical 8-4-4-4-12 form
STRING_ARRAY  ``:`` (membership)         string, bare word, number or boolean (as text)
JSON          ``.key =`` ``.key !=``     string, bare word, number, true, false or null
JSON          ``:key`` / ``.a:b``        key (or dotted key path) presence
============  =========================  ==================================================

SQL semantics worth knowing:

* Comparisons follow SQL three-valued logic: a NULL column makes both ``col = v`` and
  ``NOT col = v`` unknown, so such rows match neither.
* ``metadata.k != v`` is ``NOT (metadata @> '{"k": v}')``; it also matches rows that lack
  the key ``k``.
* JSON numbers compare numerically (``metadata.n = 1`` matches ``{"n": 1.0}``); exponent
  notation is not a number here, so ``1e5`` is the string ``"1e5"``.
* Timestamps with more than microsecond precision are rounded in the direction that keeps
  ``<``, ``<=``, ``>``, ``>=`` exact against PostgreSQL's microsecond values; ``=`` and
  ``!=`` with a sub-microsecond part are rejected, as they could never be exact.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Final

from agentstore.query.filter_lexer import (
    KEYWORDS,
    MAX_FILTER_LENGTH,
    NUMBER_RE,
    FilterError,
    Token,
    TokenKind,
    Value,
    ValueKind,
    check_raw_text,
    classify,
    describe,
    show,
    tokenize,
)

__all__ = [
    "MAX_COMPARISONS",
    "MAX_DEPTH",
    "MAX_FILTER_LENGTH",
    "CompiledFilter",
    "FieldKind",
    "FieldSpec",
    "FilterError",
    "compile_filter",
]

MAX_COMPARISONS: Final = 64
MAX_DEPTH: Final = 32

_TEXTUAL: Final = frozenset({ValueKind.STRING, ValueKind.WORD, ValueKind.NUMBER, ValueKind.TRUE, ValueKind.FALSE})
_STRINGISH: Final = frozenset({ValueKind.STRING, ValueKind.WORD})

_FIELD_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_UUID_RE: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII)
_TIMESTAMP_RE: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))?",
    re.ASCII,
)

_SQL_OPERATORS: Final = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_EQUALITY: Final = frozenset({"=", "!="})
_ALL_COMPARISONS: Final = frozenset(_SQL_OPERATORS)
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


class FieldKind(enum.Enum):
    STRING = "string"
    ENUM = "enum"
    TIMESTAMP = "timestamp"
    STRING_ARRAY = "string_array"
    JSON = "json"
    INTEGER = "integer"
    UUID = "uuid"


@dataclass(frozen=True)
class FieldSpec:
    column: str
    kind: FieldKind
    # Excluded from the hash so a FieldSpec stays hashable despite holding a dict.
    enum_values: Mapping[str, str] = field(default_factory=dict, hash=False)
    # Containment (`@>`) SQL for STRING_ARRAY and JSON fields, with `{value}` standing for the
    # parameter expression. Lets a resource match an expression index, e.g. a tenant-scoped GIN
    # index; None means `column @> value`.
    contains_sql: str | None = None

    def contains(self, value: str) -> str:
        template = self.contains_sql or f"{self.column} @> {{value}}"
        return "(" + template.format(value=value) + ")"


@dataclass(frozen=True)
class CompiledFilter:
    sql: str
    params: list[object]


def compile_filter(text: str, fields: Mapping[str, FieldSpec], first_param: int) -> CompiledFilter:
    """Compile ``text`` into a fully parenthesized boolean SQL expression.

    Placeholders are numbered from ``$first_param``; every user value is a parameter with
    an explicit cast, and column names come only from ``fields``.
    """
    if first_param < 1:
        raise ValueError(f"first_param must be at least 1, not {first_param}")
    check_raw_text(text)
    tokens = tokenize(text)
    parser = _Parser(tokens, fields, first_param)
    sql = parser.parse()
    return CompiledFilter(sql=sql, params=parser.params)


# --- parsing ----------------------------------------------------------------------------


def _join(parts: list[str], op: str) -> str:
    if len(parts) == 1:
        return parts[0]
    return "(" + f" {op} ".join(parts) + ")"


class _Parser:
    """Recursive descent over the token list; only parentheses recurse, and only MAX_DEPTH deep."""

    def __init__(self, tokens: list[Token], fields: Mapping[str, FieldSpec], first_param: int) -> None:
        self._tokens = tokens
        self._fields = fields
        self._i = 0
        self._next_param = first_param
        self._comparisons = 0
        self.params: list[object] = []

    # token helpers

    def _peek(self) -> Token:
        return self._tokens[self._i]

    def _advance(self) -> Token:
        tok = self._tokens[self._i]
        if tok.kind is not TokenKind.EOF:
            self._i += 1
        return tok

    @staticmethod
    def _is_keyword(tok: Token, keyword: str) -> bool:
        return tok.kind is TokenKind.WORD and tok.text == keyword

    def _param(self, value: object, cast: str) -> str:
        n = self._next_param
        self._next_param += 1
        self.params.append(value)
        return f"${n}::{cast}"

    # grammar

    def parse(self) -> str:
        if self._peek().kind is TokenKind.EOF:
            return "TRUE"
        sql = self._expression(0)
        tok = self._peek()
        if tok.kind is TokenKind.RPAREN:
            raise FilterError(f"unbalanced {show(tok.source)}", tok.source, tok.pos)
        if tok.kind is not TokenKind.EOF:
            raise FilterError(f"unexpected {describe(tok)}", tok.source, tok.pos)
        return sql

    def _expression(self, depth: int) -> str:
        # Adjacency and AND mean the same thing, so both flatten into one conjunction.
        parts = self._sequence(depth)
        while self._is_keyword(self._peek(), "AND"):
            self._advance()
            parts.extend(self._sequence(depth))
        return _join(parts, "AND")

    def _sequence(self, depth: int) -> list[str]:
        parts = [self._factor(depth)]
        while True:
            tok = self._peek()
            if tok.kind in (TokenKind.EOF, TokenKind.RPAREN) or self._is_keyword(tok, "AND"):
                return parts
            parts.append(self._factor(depth))

    def _factor(self, depth: int) -> str:
        parts = [self._term(depth)]
        while self._is_keyword(self._peek(), "OR"):
            self._advance()
            parts.append(self._term(depth))
        return _join(parts, "OR")

    def _term(self, depth: int) -> str:
        tok = self._peek()
        negate = False
        if self._is_keyword(tok, "NOT"):
            self._advance()
            negate = True
        elif tok.kind is TokenKind.WORD and tok.text.startswith("-"):
            negate = True
            if tok.text == "-":
                self._advance()
                following = self._peek()
                if following.pos != tok.pos + 1 or following.kind is TokenKind.EOF:
                    raise FilterError(f"{show('-')} must directly precede the term it negates", "-", tok.pos)
            else:
                # '-' lexes as part of the word, so split it off in place.
                rest = tok.text[1:]
                self._tokens[self._i] = Token(TokenKind.WORD, rest, rest, tok.pos + 1)
        inner = self._simple(depth)
        return f"(NOT {inner})" if negate else inner

    def _simple(self, depth: int) -> str:
        tok = self._peek()
        if tok.kind is TokenKind.LPAREN:
            if depth >= MAX_DEPTH:
                raise FilterError(
                    f"parentheses nested deeper than {MAX_DEPTH} at {show(tok.source)}", tok.source, tok.pos
                )
            self._advance()
            inner = self._expression(depth + 1)
            close = self._peek()
            if close.kind is not TokenKind.RPAREN:
                raise FilterError(
                    f"expected ')' to close the '(' at position {tok.pos}, found {describe(close)}",
                    close.source,
                    close.pos,
                )
            self._advance()
            return inner
        if tok.kind is TokenKind.WORD and tok.text not in KEYWORDS:
            return self._restriction()
        if tok.kind is TokenKind.STRING:
            raise FilterError(f"expected a field name, found {describe(tok)}", tok.source, tok.pos)
        raise FilterError(f"expected a term, found {describe(tok)}", tok.source, tok.pos)

    def _restriction(self) -> str:
        member = self._advance()
        self._comparisons += 1
        if self._comparisons > MAX_COMPARISONS:
            raise FilterError(
                f"too many comparisons (more than {MAX_COMPARISONS}) at {show(member.source)}",
                member.source,
                member.pos,
            )
        name, spec, path = self._resolve(member)
        op = self._peek()
        if op.kind is not TokenKind.COMPARATOR:
            raise FilterError(
                f"expected a comparison operator after {show(member.source)}, found {describe(op)}",
                op.source,
                op.pos,
            )
        self._advance()
        value_tok = self._peek()
        if value_tok.kind not in (TokenKind.STRING, TokenKind.WORD) or value_tok.text in KEYWORDS:
            raise FilterError(
                f"expected a value after {show(op.source)}, found {describe(value_tok)}",
                value_tok.source,
                value_tok.pos,
            )
        self._advance()
        value = classify(value_tok)
        if path and spec.kind is not FieldKind.JSON:
            raise FilterError(
                f"field {show(name)} has no subfields, found {show(member.source)}",
                member.source,
                member.pos,
            )
        compile_kind = _COMPILERS[spec.kind]
        return compile_kind(self, name, spec, path, op, value)

    def _resolve(self, member: Token) -> tuple[str, FieldSpec, list[str]]:
        segments = member.text.split(".")
        for seg in segments:
            if not seg:
                raise FilterError(f"empty segment in field path {show(member.source)}", member.source, member.pos)
        # Longest prefix first, so a field registered under a dotted name wins over a JSON path.
        for k in range(len(segments), 0, -1):
            name = ".".join(segments[:k])
            spec = self._fields.get(name)
            if spec is None:
                continue
            path = segments[k:]
            offset = member.pos + len(name) + 1
            for seg in path:
                if not _KEY_RE.fullmatch(seg):
                    raise FilterError(f"invalid key {show(seg)} in field path", seg, offset)
                offset += len(seg) + 1
            return name, spec, path
        head = segments[0]
        if not _FIELD_NAME_RE.fullmatch(head):
            raise FilterError(f"expected a field name, found {show(member.source)}", member.source, member.pos)
        raise FilterError(f"unknown field {show(member.source)}", member.source, member.pos)

    # per-kind compilation

    def _check_operator(self, name: str, op: Token, allowed: frozenset[str]) -> None:
        if op.text not in allowed:
            raise FilterError(f"operator {show(op.text)} is not supported for field {show(name)}", op.source, op.pos)

    @staticmethod
    def _wrong_value(name: str, expected: str, value: Value) -> FilterError:
        return FilterError(
            f"expected {expected} for field {show(name)}, found {show(value.token.source)}",
            value.token.source,
            value.token.pos,
        )

    def _compile_string(self, name: str, spec: FieldSpec, path: list[str], op: Token, value: Value) -> str:
        self._check_operator(name, op, _EQUALITY)
        if value.kind not in _TEXTUAL:
            raise self._wrong_value(name, "a string", value)
        return f"({spec.column} {_SQL_OPERATORS[op.text]} {self._param(value.text, 'text')})"

    def _compile_enum(self, name: str, spec: FieldSpec, path: list[str], op: Token, value: Value) -> str:
        self._check_operator(name, op, _EQUALITY)
        stored = spec.enum_values.get(value.text) if value.kind is not ValueKind.NULL else None
        if stored is None:
            choices = sorted(spec.enum_values)
            listed = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
            raise FilterError(
                f"invalid value {show(value.token.source)} for field {show(name)}; expected one of: {listed}",
                value.token.source,
                value.token.pos,
            )
        return f"({spec.column} {_SQL_OPERATORS[op.text]} {self._param(stored, 'text')})"

    def _compile_timestamp(self, name: str, spec: FieldSpec, path: list[str], op: Token, value: Value) -> str:
        self._check_operator(name, op, _ALL_COMPARISONS)
        if value.kind not in _STRINGISH:
            raise self._wrong_value(name, "an RFC 3339 timestamp string", value)
        when = _parse_timestamp(value, op.text)
        return f"({spec.column} {_SQL_OPERATORS[op.text]} {self._param(when, 'timestamptz')})"

    def _compile_integer(self, name: str, spec: FieldSpec, path: list[str], op: Token, value: Value) -> str:
        self._check_operator(name, op, _ALL_COMPARISONS)
        m = NUMBER_RE.fullmatch(value.text) if value.kind is ValueKind.NUMBER else None
        if m is None or m.group(3) is not None:
            raise self._wrong_value(name, "an integer", value)
        digits = m.group(2).lstrip("0")
        # Checking the digit count first keeps int() away from absurdly long literals.
        number = int(m.group(1) + (digits or "0")) if len(digits) <= 19 else None
        if number is None or not _INT64_MIN <= number <= _INT64_MAX:
            raise FilterError(
                f"integer {show(value.token.source)} is out of the 64-bit range",
                value.token.source,
                value.token.pos,
            )
        return f"({spec.column} {_SQL_OPERATORS[op.text]} {self._param(number, 'bigint')})"

    def _compile_uuid(self, name: str, spec: FieldSpec, path: list[str], op: Token, value: Value) -> str:
        self._check_operator(name, op, _EQUALITY)
        if value.kind not in _STRINGISH or not _UUID_RE.fullmatch(value.text):
            raise self._wrong_value(name, "a UUID", value)
        return f"({spec.column} {_SQL_OPERATORS[op.text]} {self._param(uuid.UUID(value.text), 'uuid')})"

    def _compile_string_array(self, name: str, spec: FieldSpec, path: list[str], op: Token, value: Value) -> str:
        self._check_operator(name, op, frozenset({":"}))
        if value.kind not in _TEXTUAL:
            raise self._wrong_value(name, "a string", value)
        return spec.contains(f"ARRAY[{self._param(value.text, 'text')}]")

    def _compile_json(self, name: str, spec: FieldSpec, path: list[str], op: Token, value: Value) -> str:
        if op.text == ":":
            keys = path + self._json_keys(value)
            if len(keys) == 1:
                return f"({spec.column} ? {self._param(keys[0], 'text')})"
            return f"(({spec.column} #> {self._param(keys, 'text[]')}) IS NOT NULL)"
        self._check_operator(name, op, _EQUALITY)
        if not path:
            raise FilterError(
                f"field {show(name)} needs a key to compare, e.g. '{name}.key = value'", op.source, op.pos
            )
        document = _json_literal(value)
        for key in reversed(path):
            document = "{" + json.dumps(key, ensure_ascii=False) + ":" + document + "}"
        contains = spec.contains(self._param(document, "jsonb"))
        return contains if op.text == "=" else f"(NOT {contains})"

    def _json_keys(self, value: Value) -> list[str]:
        if value.kind is ValueKind.STRING:
            # A quoted key is taken whole, so keys containing dots stay reachable.
            return [value.text]
        keys = value.text.split(".")
        offset = value.token.pos
        for key in keys:
            if not _KEY_RE.fullmatch(key):
                raise FilterError(f"invalid key {show(key)}", key, offset)
            offset += len(key) + 1
        return keys


_Compiler = Callable[[_Parser, str, FieldSpec, list[str], Token, Value], str]

_COMPILERS: Final[Mapping[FieldKind, _Compiler]] = {
    FieldKind.STRING: _Parser._compile_string,
    FieldKind.ENUM: _Parser._compile_enum,
    FieldKind.TIMESTAMP: _Parser._compile_timestamp,
    FieldKind.INTEGER: _Parser._compile_integer,
    FieldKind.UUID: _Parser._compile_uuid,
    FieldKind.STRING_ARRAY: _Parser._compile_string_array,
    FieldKind.JSON: _Parser._compile_json,
}


def _json_literal(value: Value) -> str:
    if value.kind is ValueKind.NUMBER:
        m = NUMBER_RE.fullmatch(value.text)
        assert m is not None
        sign, whole, frac = m.groups()
        # JSON forbids leading zeros; the digits are kept as text so no precision is lost.
        text = sign + (whole.lstrip("0") or "0")
        return text + "." + frac if frac is not None else text
    if value.kind in (ValueKind.TRUE, ValueKind.FALSE, ValueKind.NULL):
        return value.text
    return json.dumps(value.text, ensure_ascii=False)


def _parse_timestamp(value: Value, op: str) -> datetime:
    tok = value.token
    m = _TIMESTAMP_RE.fullmatch(value.text)
    if m is None:
        raise FilterError(f"invalid RFC 3339 timestamp {show(tok.source)}", tok.source, tok.pos)
    year, month, day, hour, minute, second, frac, zulu, sign, off_h, off_m = m.groups()
    if zulu is None and sign is None:
        raise FilterError(
            f"timestamp {show(tok.source)} needs a time zone offset such as 'Z' or '+02:00'",
            tok.source,
            tok.pos,
        )
    frac = frac or ""
    sub_micro = frac[6:].strip("0") != ""
    if sub_micro and op in _EQUALITY:
        raise FilterError(
            f"timestamp {show(tok.source)} is more precise than the microseconds PostgreSQL stores, "
            f"so {show(op)} could never be exact",
            tok.source,
            tok.pos,
        )
    try:
        if sign is None:
            tz = UTC
        else:
            if int(off_h) > 23 or int(off_m) > 59:
                raise ValueError("offset out of range")
            offset = timedelta(hours=int(off_h), minutes=int(off_m))
            tz = timezone(-offset if sign == "-" else offset)
        when = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int(frac[:6].ljust(6, "0")),
            tzinfo=tz,
        )
        if sub_micro and op in ("<", ">="):
            # Truncation already rounds down, which is exact for '<=' and '>'; '<' and '>=' need
            # the next representable microsecond instead.
            when += timedelta(microseconds=1)
        # Normalizing here surfaces out-of-range instants now rather than inside the driver.
        return when.astimezone(UTC)
    except (ValueError, OverflowError):
        raise FilterError(f"invalid RFC 3339 timestamp {show(tok.source)}", tok.source, tok.pos) from None
