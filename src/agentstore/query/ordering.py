"""AIP-132 ``order_by`` parsing against an allowlist, and keyset pagination SQL.

Keyset pagination needs a total order, so ``parse_order_by`` always ends the order with a
unique tie-breaker key. Sort columns must be NOT NULL: SQL comparisons with NULL are never
true, so a NULL sort value would silently end pagination early (``cursor_of`` refuses them).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from agentstore.query.filter import FieldKind

__all__ = ["MAX_ORDER_BY_LENGTH", "OrderBy", "OrderByError", "OrderTerm", "SortKey", "parse_order_by"]

MAX_ORDER_BY_LENGTH: Final = 1024

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

_CASTS: Final[Mapping[FieldKind, str]] = {
    FieldKind.STRING: "text",
    FieldKind.TIMESTAMP: "timestamptz",
    FieldKind.INTEGER: "bigint",
    FieldKind.UUID: "uuid",
}


class OrderByError(ValueError):
    """An ``order_by`` the allowlist or the AIP-132 syntax rejects; ``message`` names ``token``."""

    def __init__(self, message: str, token: str) -> None:
        super().__init__(message)
        self.message = message
        self.token = token

    def __reduce__(self) -> tuple[type[OrderByError], tuple[str, str]]:
        # The default would call __init__ with the message only.
        return (type(self), (self.message, self.token))


@dataclass(frozen=True)
class SortKey:
    name: str
    column: str
    kind: FieldKind

    def __post_init__(self) -> None:
        if self.kind not in _CASTS:
            raise ValueError(f"sort key {self.name!r} has unsortable kind {self.kind.name}")


@dataclass(frozen=True)
class OrderTerm:
    key: SortKey
    descending: bool


@dataclass(frozen=True)
class OrderBy:
    terms: tuple[OrderTerm, ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("an OrderBy needs at least one term")

    def sql(self) -> str:
        return ", ".join(f"{t.key.column} {'DESC' if t.descending else 'ASC'}" for t in self.terms)

    def cursor_of(self, row: Mapping[str, object]) -> list[object]:
        values: list[object] = []
        for term in self.terms:
            value = row[term.key.column]
            if value is None:
                raise ValueError(f"sort column {term.key.column!r} is NULL; sort columns must be NOT NULL")
            values.append(value)
        return values

    def keyset_predicate(self, cursor: Sequence[object], first_param: int) -> tuple[str, list[object]]:
        """SQL selecting the rows strictly after ``cursor`` in this order, fully parenthesized."""
        self._check_length(cursor)
        for term, value in zip(self.terms, cursor, strict=True):
            _check_value(term.key, value)
        placeholders = [f"${first_param + i}::{_CASTS[term.key.kind]}" for i, term in enumerate(self.terms)]
        params = list(cursor)
        columns = [term.key.column for term in self.terms]
        directions = {term.descending for term in self.terms}
        if len(directions) == 1:
            # One direction: a row comparison is equivalent and lets PostgreSQL use a
            # composite index as a range scan.
            op = "<" if self.terms[0].descending else ">"
            if len(columns) == 1:
                return f"({columns[0]} {op} {placeholders[0]})", params
            return f"(({', '.join(columns)}) {op} ({', '.join(placeholders)}))", params
        disjuncts: list[str] = []
        for i, term in enumerate(self.terms):
            conditions = [f"{columns[j]} = {placeholders[j]}" for j in range(i)]
            conditions.append(f"{columns[i]} {'<' if term.descending else '>'} {placeholders[i]}")
            disjuncts.append("(" + " AND ".join(conditions) + ")")
        return "(" + " OR ".join(disjuncts) + ")", params

    def encode_cursor(self, cursor: Sequence[object]) -> list[object]:
        """JSON-safe form of ``cursor``; ``decode_cursor`` restores it exactly."""
        self._check_length(cursor)
        encoded: list[object] = []
        for term, value in zip(self.terms, cursor, strict=True):
            _check_value(term.key, value)
            if isinstance(value, datetime):
                # Fixed microsecond precision matches PostgreSQL and avoids any float rounding.
                encoded.append(value.astimezone(UTC).isoformat(timespec="microseconds"))
            elif isinstance(value, uuid.UUID):
                encoded.append(str(value))
            else:
                encoded.append(value)
        return encoded

    def decode_cursor(self, raw: object) -> list[object]:
        """Inverse of ``encode_cursor``; raises ValueError if ``raw`` does not fit this order."""
        if not isinstance(raw, list | tuple):
            raise ValueError("cursor is not a list")
        self._check_length(raw)
        return [_decode_value(term.key, value) for term, value in zip(self.terms, raw, strict=True)]

    def _check_length(self, cursor: Sequence[object]) -> None:
        if len(cursor) != len(self.terms):
            raise ValueError(f"cursor has {len(cursor)} values, the order has {len(self.terms)} terms")


def _check_value(key: SortKey, value: object) -> None:
    ok: bool
    if key.kind is FieldKind.STRING:
        ok = isinstance(value, str)
    elif key.kind is FieldKind.INTEGER:
        ok = isinstance(value, int) and not isinstance(value, bool) and _INT64_MIN <= value <= _INT64_MAX
    elif key.kind is FieldKind.UUID:
        ok = isinstance(value, uuid.UUID)
    else:
        ok = isinstance(value, datetime) and value.utcoffset() is not None
    if not ok:
        raise ValueError(f"{type(value).__name__} value does not fit sort key {key.name!r} ({key.kind.name})")


def _decode_value(key: SortKey, value: object) -> object:
    decoded: object = value
    try:
        if key.kind is FieldKind.UUID and isinstance(value, str):
            decoded = uuid.UUID(value)
        elif key.kind is FieldKind.TIMESTAMP and isinstance(value, str):
            decoded = datetime.fromisoformat(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"bad cursor value for sort key {key.name!r}") from exc
    _check_value(key, decoded)
    return decoded


def parse_order_by(text: str, allowed: Mapping[str, SortKey], default: str, tie_breaker: SortKey) -> OrderBy:
    """Parse ``field [asc|desc], ...``; an empty ``text`` means ``default``.

    The unique ``tie_breaker`` (ascending) is appended unless the order already names it,
    in which case terms after it are dropped since they can never break a tie.
    """
    source = text if text.strip() else default
    if len(source) > MAX_ORDER_BY_LENGTH:
        excess = source[MAX_ORDER_BY_LENGTH : MAX_ORDER_BY_LENGTH + 20]
        raise OrderByError(f"order_by is longer than {MAX_ORDER_BY_LENGTH} characters at {excess!r}", excess)
    terms: list[OrderTerm] = []
    seen: set[str] = set()
    seen_columns: set[str] = set()
    for part in source.split(","):
        words = part.split()
        if not words:
            raise OrderByError(f"empty term in order_by {source!r}", part)
        name = words[0]
        key = allowed.get(name)
        if key is None:
            choices = ", ".join(sorted(allowed))
            raise OrderByError(f"unknown order_by field {name!r}; expected one of: {choices}", name)
        # Aliases of one column count as duplicates too: a repeated column never changes the order.
        if name in seen or key.column in seen_columns:
            raise OrderByError(f"duplicate order_by field {name!r}", name)
        seen.add(name)
        seen_columns.add(key.column)
        descending = False
        if len(words) >= 2:
            direction = words[1].lower()
            if direction not in ("asc", "desc"):
                raise OrderByError(
                    f"invalid sort direction {words[1]!r} after {name!r}; expected 'asc' or 'desc'", words[1]
                )
            descending = direction == "desc"
        if len(words) > 2:
            raise OrderByError(f"unexpected {words[2]!r} after {name!r} {words[1]!r} in order_by", words[2])
        terms.append(OrderTerm(key, descending))
    for i, term in enumerate(terms):
        if term.key.column == tie_breaker.column:
            return OrderBy(tuple(terms[: i + 1]))
    terms.append(OrderTerm(tie_breaker, descending=False))
    return OrderBy(tuple(terms))
