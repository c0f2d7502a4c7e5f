from __future__ import annotations

import functools
import json
import pickle
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentstore.query import FieldKind, OrderBy, OrderByError, OrderTerm, SortKey, parse_order_by

NAME = SortKey("name", "name", FieldKind.STRING)
CREATE = SortKey("create_time", "create_time", FieldKind.TIMESTAMP)
PRIORITY = SortKey("priority", "priority", FieldKind.INTEGER)
ID = SortKey("id", "id", FieldKind.UUID)
ALLOWED = {"name": NAME, "create_time": CREATE, "priority": PRIORITY}


def parse(text: str) -> OrderBy:
    return parse_order_by(text, ALLOWED, "create_time", ID)


def spec_of(order: OrderBy) -> list[tuple[str, bool]]:
    return [(t.key.name, t.descending) for t in order.terms]


# --- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\t"])
def test_empty_uses_default_plus_tie_breaker(text: str) -> None:
    assert spec_of(parse(text)) == [("create_time", False), ("id", False)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name", [("name", False)]),
        ("name desc", [("name", True)]),
        ("name DESC", [("name", True)]),
        ("name Asc", [("name", False)]),
        (
            "  name   desc ,create_time,priority  asc ",
            [("name", True), ("create_time", False), ("priority", False)],
        ),
        ("priority desc,name", [("priority", True), ("name", False)]),
    ],
)
def test_parse(text: str, expected: list[tuple[str, bool]]) -> None:
    assert spec_of(parse(text)) == [*expected, ("id", False)]


def test_default_may_carry_directions() -> None:
    order = parse_order_by("", ALLOWED, "create_time desc, name", ID)
    assert spec_of(order) == [("create_time", True), ("name", False), ("id", False)]


def test_explicit_tie_breaker_ends_the_order() -> None:
    allowed = {**ALLOWED, "id": ID}
    order = parse_order_by("name, id desc, priority", allowed, "create_time", ID)
    assert spec_of(order) == [("name", False), ("id", True)]
    order = parse_order_by("id", allowed, "create_time", ID)
    assert spec_of(order) == [("id", False)]


@pytest.mark.parametrize(
    ("text", "token", "fragment"),
    [
        ("bogus", "bogus", "unknown order_by field 'bogus'"),
        ("name, bogus desc", "bogus", "unknown order_by field 'bogus'"),
        ("NAME", "NAME", "unknown"),
        ("name, name desc", "name", "duplicate order_by field 'name'"),
        ("name up", "up", "invalid sort direction 'up'"),
        ("name descending", "descending", "invalid sort direction"),
        ("name desc extra", "extra", "unexpected 'extra'"),
        ("name,", "", "empty term"),
        (",name", "", "empty term"),
        ("name,,priority", "", "empty term"),
        ("name;drop", "name;drop", "unknown"),
        ("-name", "-name", "unknown"),
    ],
)
def test_parse_errors_name_the_token(text: str, token: str, fragment: str) -> None:
    with pytest.raises(OrderByError) as info:
        parse(text)
    assert info.value.token == token
    assert fragment in info.value.message
    assert str(info.value) == info.value.message


def test_aliases_of_one_column_are_duplicates() -> None:
    allowed = {**ALLOWED, "createTime": CREATE}
    with pytest.raises(OrderByError) as info:
        parse_order_by("create_time, createTime desc", allowed, "name", ID)
    assert info.value.token == "createTime"


def test_overlong_order_by() -> None:
    with pytest.raises(OrderByError):
        parse(", ".join(["name"] * 500))


def test_order_by_error_is_a_value_error_and_pickles() -> None:
    assert issubclass(OrderByError, ValueError)
    e = pickle.loads(pickle.dumps(OrderByError("unknown order_by field 'x'", "x")))
    assert (str(e), e.token) == ("unknown order_by field 'x'", "x")


def test_sort_key_rejects_unsortable_kinds() -> None:
    with pytest.raises(ValueError):
        SortKey("metadata", "metadata", FieldKind.JSON)


def test_order_by_needs_terms() -> None:
    with pytest.raises(ValueError):
        OrderBy(())


def test_sql() -> None:
    assert parse("name desc, priority").sql() == "name DESC, priority ASC, id ASC"
    assert parse("").sql() == "create_time ASC, id ASC"


# --- keyset predicate -------------------------------------------------------------------

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
U0 = uuid.UUID("123e4567-e89b-12d3-a456-426614174000")


def test_keyset_single_direction_uses_row_comparison() -> None:
    order = parse("name, create_time")
    sql, params = order.keyset_predicate(["bob", T0, U0], 4)
    assert sql == "((name, create_time, id) > ($4::text, $5::timestamptz, $6::uuid))"
    assert params == ["bob", T0, U0]


def test_keyset_all_descending() -> None:
    allowed = {**ALLOWED, "id": ID}
    order = parse_order_by("priority desc, id desc", allowed, "name", ID)
    sql, params = order.keyset_predicate([5, U0], 1)
    assert sql == "((priority, id) < ($1::bigint, $2::uuid))"
    assert params == [5, U0]


def test_keyset_single_term() -> None:
    allowed = {**ALLOWED, "id": ID}
    order = parse_order_by("id", allowed, "name", ID)
    assert order.keyset_predicate([U0], 2) == ("(id > $2::uuid)", [U0])


def test_keyset_mixed_directions_expands() -> None:
    order = parse("name desc, priority")
    sql, params = order.keyset_predicate(["bob", 3, U0], 2)
    assert sql == (
        "((name < $2::text)"
        " OR (name = $2::text AND priority > $3::bigint)"
        " OR (name = $2::text AND priority = $3::bigint AND id > $4::uuid))"
    )
    assert params == ["bob", 3, U0]


def test_keyset_rejects_mismatched_cursor() -> None:
    order = parse("name")
    with pytest.raises(ValueError):
        order.keyset_predicate(["bob"], 1)
    with pytest.raises(ValueError):
        order.keyset_predicate([3, U0], 1)


# --- cursors ----------------------------------------------------------------------------


def test_cursor_of_reads_columns() -> None:
    keys = {"name": SortKey("name", "agent_name", FieldKind.STRING)}
    order = parse_order_by("name desc", keys, "name", SortKey("id", "agent_id", FieldKind.UUID))
    assert order.cursor_of({"agent_name": "x", "agent_id": U0, "other": 1}) == ["x", U0]


def test_cursor_of_refuses_null_sort_values() -> None:
    with pytest.raises(ValueError):
        parse("name").cursor_of({"name": None, "id": U0})


def test_cursor_round_trip_is_exact() -> None:
    order = parse("name desc, create_time, priority")
    plus_two = timezone(timedelta(hours=2))
    cursor: list[object] = ["zoë", T0.astimezone(plus_two), -(2**63), U0]
    encoded = order.encode_cursor(cursor)
    assert encoded == ["zoë", "2026-01-02T03:04:05.678901+00:00", -(2**63), str(U0)]
    decoded = order.decode_cursor(json.loads(json.dumps(encoded)))
    assert decoded == cursor
    assert decoded[1] == T0
    assert order.encode_cursor(decoded) == encoded


def test_cursor_round_trip_keeps_whole_seconds_and_microseconds() -> None:
    order = parse("create_time")
    for when in [datetime(2026, 1, 1, tzinfo=UTC), datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC)]:
        assert order.decode_cursor(order.encode_cursor([when, U0])) == [when, U0]


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "x",
        {"c": 1},
        [],
        ["a"],
        ["a", str(U0), 1],
        [1, str(U0)],
        ["a", "not-a-uuid"],
        ["a", 5],
        ["a", None],
    ],
)
def test_decode_cursor_rejects_bad_shapes(raw: object) -> None:
    with pytest.raises(ValueError):
        parse("name").decode_cursor(raw)


@pytest.mark.parametrize(
    "raw",
    [
        ["2026-01-01T00:00:00", str(U0)],
        ["yesterday", str(U0)],
        [1767225600, str(U0)],
        [1767225600.5, str(U0)],
    ],
)
def test_decode_cursor_rejects_bad_timestamps(raw: object) -> None:
    with pytest.raises(ValueError):
        parse("create_time").decode_cursor(raw)


@pytest.mark.parametrize("value", [True, 2**63, 1.0, "1"])
def test_decode_cursor_rejects_bad_integers(value: object) -> None:
    with pytest.raises(ValueError):
        parse("priority").decode_cursor([value, str(U0)])


def test_encode_cursor_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError):
        parse("create_time").encode_cursor([datetime(2026, 1, 1), U0])


# --- semantics: evaluate the generated SQL against an in-memory table --------------------

COLUMNS = ("name", "create_time", "priority", "id")


def sql_to_python(sql: str) -> str:
    """Translate the small SQL subset keyset_predicate emits into a Python expression.

    SQL row comparisons and Python tuple comparisons are both lexicographic, so the
    translation preserves meaning for NOT NULL values.
    """
    py = re.sub(r"\$(\d+)::[a-z]+", r"p[\1]", sql)
    py = re.sub(r"\b(" + "|".join(COLUMNS) + r")\b", r"r['\1']", py)
    py = py.replace(" AND ", " and ").replace(" OR ", " or ")
    return re.sub(r"(?<![<>!=])=(?!=)", "==", py)


def sort_rows(rows: list[dict[str, object]], order: OrderBy) -> list[dict[str, object]]:
    def compare(a: Mapping[str, object], b: Mapping[str, object]) -> int:
        for term in order.terms:
            x, y = a[term.key.column], b[term.key.column]
            if x != y:
                less = x < y  # type: ignore[operator]
                return (1 if less else -1) if term.descending else (-1 if less else 1)
        return 0

    return sorted(rows, key=functools.cmp_to_key(compare))


_ROWS = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["a", "b", "c"]),
            "create_time": st.sampled_from([T0, T0 + timedelta(microseconds=1), T0 + timedelta(days=1)]),
            "priority": st.integers(min_value=-2, max_value=2),
            "id": st.uuids(),
        }
    ),
    min_size=1,
    max_size=25,
    unique_by=lambda r: r["id"],
)
_ORDERS = st.lists(
    st.tuples(st.sampled_from(["name", "create_time", "priority"]), st.sampled_from(["", " asc", " desc"])),
    max_size=3,
    unique_by=lambda t: t[0],
)


@settings(max_examples=300, deadline=None)
@given(_ROWS, _ORDERS, st.integers(min_value=1, max_value=9), st.booleans())
def test_keyset_pages_walk_the_whole_order(
    rows: list[dict[str, object]], terms: list[tuple[str, str]], first_param: int, descending_id: bool
) -> None:
    allowed = {**ALLOWED, "id": ID}
    text = ", ".join(name + direction for name, direction in terms)
    if descending_id:
        text = f"{text}, id desc" if text else "id desc"
    order = parse_order_by(text, allowed, "create_time", ID)
    expected = sort_rows(rows, order)
    for k, row in enumerate(expected):
        # The cursor travels through JSON, as it does inside a page token.
        cursor = order.decode_cursor(json.loads(json.dumps(order.encode_cursor(order.cursor_of(row)))))
        sql, params = order.keyset_predicate(cursor, first_param)
        predicate = sql_to_python(sql)
        p = {first_param + i: v for i, v in enumerate(params)}
        after = [r for r in rows if eval(predicate, {}, {"r": r, "p": p})]
        assert sort_rows(after, order) == expected[k + 1 :], sql


def _check(order: OrderBy, cursor: Sequence[object]) -> None:
    assert order.decode_cursor(order.encode_cursor(cursor)) == list(cursor)


def test_terms_are_order_terms() -> None:
    order = parse("name desc")
    assert order.terms == (OrderTerm(NAME, True), OrderTerm(ID, False))
    _check(order, ["", U0])
