from __future__ import annotations

import json
import pickle
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agentstore.query import CompiledFilter, FieldKind, FieldSpec, FilterError, compile_filter
from agentstore.query.filter import MAX_COMPARISONS, MAX_DEPTH, MAX_FILTER_LENGTH

FIELDS: dict[str, FieldSpec] = {
    "name": FieldSpec("name", FieldKind.STRING),
    "role": FieldSpec("role_col", FieldKind.STRING),
    "status": FieldSpec(
        "status",
        FieldKind.ENUM,
        {"IDLE": "idle", "BUSY": "busy", "AGENT_STATUS_IDLE": "idle", "AGENT_STATUS_BUSY": "busy"},
    ),
    "create_time": FieldSpec("create_time", FieldKind.TIMESTAMP),
    "capabilities": FieldSpec("capabilities", FieldKind.STRING_ARRAY),
    "metadata": FieldSpec("metadata", FieldKind.JSON),
    "priority": FieldSpec("priority", FieldKind.INTEGER),
    "id": FieldSpec("id", FieldKind.UUID),
}

UID = "123e4567-e89b-12d3-a456-426614174000"


def c(text: str, first_param: int = 1) -> CompiledFilter:
    return compile_filter(text, FIELDS, first_param)


def err(text: str) -> FilterError:
    with pytest.raises(FilterError) as info:
        c(text)
    return info.value


# --- basics -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "\t\n  "])
def test_empty_filter_is_true(text: str) -> None:
    assert c(text) == CompiledFilter("TRUE", [])


def test_string_equality_and_inequality() -> None:
    assert c('name = "alpha"') == CompiledFilter("(name = $1::text)", ["alpha"])
    assert c("name != alpha") == CompiledFilter("(name <> $1::text)", ["alpha"])
    assert c("role='x'") == CompiledFilter("(role_col = $1::text)", ["x"])


def test_params_number_from_first_param() -> None:
    got = c('name = "a" AND role = b AND priority > 3', first_param=4)
    assert got.sql == "((name = $4::text) AND (role_col = $5::text) AND (priority > $6::bigint))"
    assert got.params == ["a", "b", 3]


def test_first_param_must_be_positive() -> None:
    with pytest.raises(ValueError):
        compile_filter("", FIELDS, 0)


def test_string_escapes_and_quotes() -> None:
    assert c(r'name = "a \"quoted\" \\ word"').params == ['a "quoted" \\ word']
    assert c(r"name = 'it\'s'").params == ["it's"]
    assert c("name = 'say \"hi\"'").params == ['say "hi"']
    assert c('name = ""').params == [""]
    assert c('name = "AND (x) OR -y"').params == ["AND (x) OR -y"]


def test_string_accepts_numbers_and_booleans_as_text() -> None:
    assert c("name = 42").params == ["42"]
    assert c("name = 1.50").params == ["1.50"]
    assert c("name = true").params == ["true"]
    assert c("name = python3.11-rc").params == ["python3.11-rc"]


def test_user_values_never_reach_sql_text() -> None:
    got = c("name = \"x'); DROP TABLE agents; --\" OR metadata.k = 'a\"b'")
    assert "DROP" not in got.sql
    assert 'a"b' not in got.sql
    assert got.params == ["x'); DROP TABLE agents; --", '{"k":"a\\"b"}']


# --- precedence ---------------------------------------------------------------------------


def test_or_binds_tighter_than_and() -> None:
    sql = c("name = a AND name = b OR name = c").sql
    assert sql == "((name = $1::text) AND ((name = $2::text) OR (name = $3::text)))"
    sql = c("name = a OR name = b AND name = c").sql
    assert sql == "(((name = $1::text) OR (name = $2::text)) AND (name = $3::text))"


def test_adjacency_means_and_and_binds_looser_than_or() -> None:
    sql = c("name = a name = b OR name = c").sql
    assert sql == "((name = $1::text) AND ((name = $2::text) OR (name = $3::text)))"
    assert c("name = a name = b").sql == c("name = a AND name = b").sql


def test_parentheses_override_precedence() -> None:
    sql = c("(name = a AND name = b) OR name = c").sql
    assert sql == "(((name = $1::text) AND (name = $2::text)) OR (name = $3::text))"
    assert c("((((name = a))))").sql == "(name = $1::text)"


def test_not_and_minus_negate_a_single_term() -> None:
    assert c("NOT name = a").sql == "(NOT (name = $1::text))"
    assert c("-name = a").sql == "(NOT (name = $1::text))"
    assert c("NOT name = a OR name = b").sql == "((NOT (name = $1::text)) OR (name = $2::text))"
    assert c("-(name = a OR name = b)").sql == "(NOT ((name = $1::text) OR (name = $2::text)))"
    assert c("NOT(name = a)").sql == "(NOT (name = $1::text))"
    assert c("name = a -capabilities:x").sql == "((name = $1::text) AND (NOT (capabilities @> ARRAY[$2::text])))"


def test_negative_number_value_is_not_negation() -> None:
    assert c("priority > -5") == CompiledFilter("(priority > $1::bigint)", [-5])


def test_keywords_are_uppercase_only() -> None:
    e = err("name = a and name = b")
    assert e.token == "and"
    assert e.position == 9
    assert "unknown field 'and'" in str(e)
    # As a value, a lowercase keyword is just a word.
    assert c("name = or").params == ["or"]


def test_sql_is_fully_parenthesized_for_composition() -> None:
    # The caller writes `tenant_id = $1 AND (<sql>)`; each piece must carry its own parentheses.
    for text in ["name = a OR name = b", "NOT name = a", "name = a name = b"]:
        sql = c(text).sql
        assert sql.startswith("(") and sql.endswith(")")
        depth = 0
        for i, ch in enumerate(sql):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                assert i == len(sql) - 1


# --- kinds ------------------------------------------------------------------------------


def test_enum_maps_to_stored_value() -> None:
    assert c("status = IDLE") == CompiledFilter("(status = $1::text)", ["idle"])
    assert c('status != "AGENT_STATUS_BUSY"') == CompiledFilter("(status <> $1::text)", ["busy"])


def test_enum_rejects_unknown_and_wrong_case() -> None:
    e = err("status = idle")
    assert (e.token, e.position) == ("idle", 9)
    assert "'idle'" in e.message and "IDLE" in e.message
    assert err("status = null").token == "null"
    assert err("status < IDLE").token == "<"


@pytest.mark.parametrize("op", ["=", "!=", "<", "<=", ">", ">="])
def test_timestamp_comparisons(op: str) -> None:
    sql_op = "<>" if op == "!=" else op
    got = c(f'create_time {op} "2026-01-01T00:00:00Z"')
    assert got.sql == f"(create_time {sql_op} $1::timestamptz)"
    assert got.params == [datetime(2026, 1, 1, tzinfo=UTC)]


def test_timestamp_offsets_and_fractions() -> None:
    (when,) = c('create_time > "2026-03-04T05:06:07.123456+02:30"').params
    assert when == datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=timezone(timedelta(hours=2, minutes=30)))
    assert isinstance(when, datetime) and when.utcoffset() == timedelta(0)
    (when,) = c("create_time < '2026-03-04t05:06:07.5-08:00'").params
    assert when == datetime(2026, 3, 4, 13, 6, 7, 500000, tzinfo=UTC)
    (when,) = c('create_time >= "2026-03-04 05:06:07z"').params
    assert when == datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


@pytest.mark.parametrize(
    ("op", "micros"),
    [("<", 2), ("<=", 1), (">", 1), (">=", 2)],
)
def test_sub_microsecond_timestamps_round_to_stay_exact(op: str, micros: int) -> None:
    (when,) = c(f'create_time {op} "2026-01-01T00:00:00.000001500Z"').params
    assert when == datetime(2026, 1, 1, 0, 0, 0, micros, tzinfo=UTC)


def test_trailing_zero_nanoseconds_are_fine_for_equality() -> None:
    (when,) = c('create_time = "2026-01-01T00:00:00.000001000Z"').params
    assert when == datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('"2026-01-01T00:00:00"', "time zone"),
        ('"2026-01-01"', "invalid RFC 3339"),
        ('"2026-13-01T00:00:00Z"', "invalid RFC 3339"),
        ('"2026-02-30T00:00:00Z"', "invalid RFC 3339"),
        ('"2026-01-01T24:00:00Z"', "invalid RFC 3339"),
        ('"2026-01-01T00:00:60Z"', "invalid RFC 3339"),
        ('"2026-01-01T00:00:00+24:00"', "invalid RFC 3339"),
        ('"0001-01-01T00:00:00+01:00"', "invalid RFC 3339"),
        ('"2026-01-01T00:00:00.0000001Z"', "more precise"),
        ('"yesterday"', "invalid RFC 3339"),
        ("2026-01-01", "invalid RFC 3339"),
        ("12", "RFC 3339 timestamp string"),
    ],
)
def test_timestamp_rejects(value: str, fragment: str) -> None:
    e = err(f"create_time = {value}")
    assert fragment in e.message
    assert e.token == value
    assert e.position == len("create_time = ")


@pytest.mark.parametrize("op", ["=", "!=", "<", "<=", ">", ">="])
def test_integer_comparisons(op: str) -> None:
    sql_op = "<>" if op == "!=" else op
    assert c(f"priority {op} 7") == CompiledFilter(f"(priority {sql_op} $1::bigint)", [7])


def test_integer_bounds() -> None:
    assert c("priority = 9223372036854775807").params == [2**63 - 1]
    assert c("priority = -9223372036854775808").params == [-(2**63)]
    assert c("priority = 0000000000000000000000000042").params == [42]
    for text in [
        "priority = 9223372036854775808",
        "priority = -9223372036854775809",
        "priority = " + "9" * 4000,
    ]:
        e = err(text)
        assert "64-bit" in e.message
        assert e.position == len("priority = ")


@pytest.mark.parametrize("value", ["1.5", '"7"', "seven", "true", "null", "1e3", "٣"])
def test_integer_rejects_non_integers(value: str) -> None:
    e = err(f"priority = {value}")
    assert e.token == value
    assert "integer" in e.message


def test_uuid() -> None:
    assert c(f"id = {UID}") == CompiledFilter("(id = $1::uuid)", [uuid.UUID(UID)])
    assert c(f'id != "{UID.upper()}"') == CompiledFilter("(id <> $1::uuid)", [uuid.UUID(UID)])
    for bad in ["123", f"{{{UID}}}", UID.replace("-", ""), UID[:-1] + "g", "null"]:
        assert err(f"id = {bad}").token == bad
    assert err(f"id < {UID}").token == "<"


def test_string_array_membership() -> None:
    assert c("capabilities:python") == CompiledFilter("(capabilities @> ARRAY[$1::text])", ["python"])
    assert c('capabilities : "c++"').params == ["c++"]
    assert err("capabilities = python").token == "="
    assert err("capabilities:null").token == "null"


def test_json_equality_builds_typed_containment() -> None:
    cases = {
        'metadata.region = "eu"': '{"region":"eu"}',
        "metadata.region = eu": '{"region":"eu"}',
        "metadata.n = 42": '{"n":42}',
        "metadata.n = -0.50": '{"n":-0.50}',
        "metadata.n = 007": '{"n":7}',
        "metadata.ok = true": '{"ok":true}',
        "metadata.ok = false": '{"ok":false}',
        "metadata.gone = null": '{"gone":null}',
        'metadata.n = "42"': '{"n":"42"}',
        "metadata.a.b-c.d_e = x": '{"a":{"b-c":{"d_e":"x"}}}',
        'metadata.k = "é\\"\\\\"': '{"k":"é\\"\\\\"}',
    }
    for text, document in cases.items():
        got = c(text)
        assert got.sql == "(metadata @> $1::jsonb)", text
        assert got.params == [document], text
        json.loads(document)


def test_json_inequality_negates_containment() -> None:
    assert c("metadata.a.b != 1") == CompiledFilter("(NOT (metadata @> $1::jsonb))", ['{"a":{"b":1}}'])


def test_json_has_key() -> None:
    assert c("metadata:region") == CompiledFilter("(metadata ? $1::text)", ["region"])
    assert c('metadata:"dotted.key"') == CompiledFilter("(metadata ? $1::text)", ["dotted.key"])
    assert c("metadata:a.b") == CompiledFilter("((metadata #> $1::text[]) IS NOT NULL)", [["a", "b"]])
    assert c("metadata.a:b") == CompiledFilter("((metadata #> $1::text[]) IS NOT NULL)", [["a", "b"]])


def test_json_rejects() -> None:
    assert err("metadata = x").token == "="
    assert err("metadata.a > 1").token == ">"
    e = err("metadata.a$b = 1")
    assert (e.token, e.position) == ("a$b", 9)
    e = err("metadata:a..b")
    assert e.token == ""
    assert err("metadata:*").token == "*"
    e = err("metadata..a = 1")
    assert e.token == "metadata..a"


def test_dotted_path_only_on_json_fields() -> None:
    e = err("name.first = x")
    assert e.token == "name.first"
    assert "no subfields" in e.message


def test_dotted_field_names_resolve_before_json_paths() -> None:
    fields = {**FIELDS, "owner.name": FieldSpec("owner_name", FieldKind.STRING)}
    assert compile_filter("owner.name = x", fields, 1).sql == "(owner_name = $1::text)"


def test_operator_not_allowed_for_string() -> None:
    e = err("name < b")
    assert (e.token, e.position) == ("<", 5)
    assert str(e) == "operator '<' is not supported for field 'name' at position 5"
    assert err("name:b").token == ":"


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "token", "position", "fragment"),
    [
        ("foo = 1", "foo", 0, "unknown field 'foo'"),
        ("name = a AND foo = 1", "foo", 13, "unknown field 'foo'"),
        ("name = a AND AND name = b", "AND", 13, "expected a term"),
        ("AND name = a", "AND", 0, "expected a term"),
        ("name = a AND", "", 12, "end of filter"),
        ("name = a OR", "", 11, "end of filter"),
        ("name = a OR OR name = b", "OR", 12, "expected a term"),
        ("NOT", "", 3, "end of filter"),
        ("NOT NOT name = a", "NOT", 4, "expected a term"),
        ("(name = a", "", 9, "expected ')'"),
        ("name = a)", ")", 8, "unbalanced ')'"),
        ("()", ")", 1, "expected a term"),
        ("name = a ) OR (", ")", 9, "unbalanced"),
        ('name = "abc', '"abc', 7, "unterminated string"),
        ("name = 'abc\\'", "'abc\\'", 7, "unterminated string"),
        ('name = "a\\n"', "\\n", 9, "invalid escape"),
        ("name = a\\b", "\\", 8, "outside a string"),
        ("name", "", 4, "expected a comparison operator after 'name'"),
        ("name name = a", "name", 5, "expected a comparison operator"),
        ("name =", "", 6, "expected a value after '='"),
        ("name = = a", "=", 7, "expected a value"),
        ("name = (a)", "(", 7, "expected a value"),
        ("name = AND", "AND", 7, "expected a value"),
        ("name ! a", "!", 5, "unexpected '!'"),
        ("name == a", "=", 6, "expected a value"),
        ("name = a = b", "=", 9, "expected a term"),
        ('"name" = a', '"name"', 0, "expected a field name"),
        ("- name = a", "-", 0, "must directly precede"),
        ("name = a -", "-", 9, "must directly precede"),
        ("1abc = 2", "1abc", 0, "expected a field name"),
        ("name = \x00", "\x00", 7, "NUL"),
        ("name = '\ud800'", "\ud800", 8, "invalid character"),
    ],
)
def test_errors_name_token_and_position(text: str, token: str, position: int, fragment: str) -> None:
    e = err(text)
    assert e.token == token
    assert e.position == position
    assert fragment in e.message
    assert str(e) == f"{e.message} at position {position}"


def test_error_messages_quote_the_token() -> None:
    e = err("name = a OR OR x")
    assert str(e) == "expected a term, found 'OR' at position 12"
    e = err("nope = 1")
    assert str(e) == "unknown field 'nope' at position 0"


def test_filter_error_is_a_value_error_and_pickles() -> None:
    assert issubclass(FilterError, ValueError)
    e = pickle.loads(pickle.dumps(err("nope = 1")))
    assert (str(e), e.token, e.position) == ("unknown field 'nope' at position 0", "nope", 0)


def test_length_limit() -> None:
    ok = "name = " + '"' + "x" * (MAX_FILTER_LENGTH - 9) + '"'
    assert len(ok) == MAX_FILTER_LENGTH
    c(ok)
    e = err(ok + " ")
    assert e.position == MAX_FILTER_LENGTH
    assert "longer than" in e.message


def test_comparison_limit() -> None:
    c(" OR ".join(["name = a"] * MAX_COMPARISONS))
    text = " ".join(["name = a"] * (MAX_COMPARISONS + 1))
    e = err(text)
    assert e.token == "name"
    assert e.position == MAX_COMPARISONS * len("name = a ")
    assert "too many comparisons" in e.message


def test_depth_limit() -> None:
    c("(" * MAX_DEPTH + "name = a" + ")" * MAX_DEPTH)
    e = err("(" * (MAX_DEPTH + 1) + "name = a" + ")" * (MAX_DEPTH + 1))
    assert (e.token, e.position) == ("(", MAX_DEPTH)
    assert "nested deeper" in e.message


def test_pathological_nesting_never_recurses_out() -> None:
    for text in ["(" * 4000, "-(" * 2000, "NOT (" * 800, "(" * 2000 + ")" * 2000]:
        with pytest.raises(FilterError):
            c(text)


# --- properties -------------------------------------------------------------------------


_PLACEHOLDER = re.compile(r"\$(\d+)::(?:text\[\]|text|timestamptz|jsonb|bigint|uuid)")
_SQL_TOKEN = re.compile(
    r"\s+|\$\d+::(?:text\[\]|text|timestamptz|jsonb|bigint|uuid)|\(|\)|\[|\]|<>|<=|>=|<|>|=|@>|\?|#>"
    r"|\b(?:AND|OR|NOT|TRUE|IS|NULL|ARRAY)\b|\b(?:"
    + "|".join(sorted((spec.column for spec in FIELDS.values()), key=len, reverse=True))
    + r")\b"
)


def check_compiled(got: CompiledFilter, first_param: int) -> None:
    """Invariants of any successful compile: SQL built only from trusted pieces, params numbered densely."""
    assert "".join(_SQL_TOKEN.findall(got.sql)) == got.sql
    numbers = sorted(int(n) for n in _PLACEHOLDER.findall(got.sql))
    assert numbers == list(range(first_param, first_param + len(got.params)))
    assert got.sql.count("(") == got.sql.count(")")


def compile_or_reject(text: str, first_param: int = 1) -> None:
    try:
        got = compile_filter(text, FIELDS, first_param)
    except FilterError as e:
        assert isinstance(e.message, str) and isinstance(e.token, str)
        assert 0 <= e.position <= len(text)
        return
    check_compiled(got, first_param)


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=200))
def test_any_text_compiles_or_raises_filter_error(text: str) -> None:
    compile_or_reject(text)


_VALID_COMPARISONS = [
    'name = "a b"',
    "name != x",
    "status = IDLE",
    'create_time >= "2026-01-01T00:00:00Z"',
    'create_time < "2026-01-01T00:00:00.5+01:00"',
    "capabilities:python",
    "metadata.region = eu",
    "metadata.a.b != 1.5",
    "metadata:region",
    "metadata:a.b",
    "priority <= -3",
    f"id = {UID}",
]

_MEMBERS = [
    *FIELDS,
    "metadata.a",
    "metadata.a.b-c",
    "metadata.",
    "metadata.a$",
    "name.x",
    "unknown",
    "-name",
    "1x",
]
_OPERATORS = ["=", "!=", "<", "<=", ">", ">=", ":", ":", "=="]
_VALUES = [
    '"2026-01-01T00:00:00Z"',
    '"2026-01-01T00:00:00.123456789+05:30"',
    '"2026-01-01T00:00:00"',
    '"9999-12-31T23:59:59.9999999-23:59"',
    '"0001-01-01T00:00:00+00:01"',
    "IDLE",
    "AGENT_STATUS_BUSY",
    UID,
    f'"{UID}"',
    "0",
    "-1",
    "1.5",
    "007",
    "9223372036854775808",
    "-9223372036854775808",
    "true",
    "false",
    "null",
    '"a\\"b"',
    "'x\\'y'",
    '"\\q"',
    "python",
    "a.b",
    "a..b",
    "٣",
    '"',
    "(",
    "AND",
]
_CONNECTORS = ["AND", "OR", "NOT", "-", "and", "(", ")", "(", ")", "NOT (", "-("]
_NOISE = ['"', "'", "\\", ".", "*", "\x00", "\u2028", "\ud800", "!", "="]
_SEPARATORS = st.sampled_from(["", " ", " ", "  ", "\t"])


@st.composite
def _restriction(draw: st.DrawFn) -> str:
    member, op, value = (draw(st.sampled_from(xs)) for xs in (_MEMBERS, _OPERATORS, _VALUES))
    return member + draw(_SEPARATORS) + op + draw(_SEPARATORS) + value


@st.composite
def near_valid(draw: st.DrawFn) -> str:
    """Sequences of mostly well-formed pieces, so that errors come from deep inside the parser too."""
    pieces: list[str] = []
    for _ in range(draw(st.integers(min_value=0, max_value=10))):
        # Lexer-fatal noise is kept rare so most examples reach the parser and the per-kind checks.
        roll = draw(st.integers(min_value=0, max_value=19))
        if roll == 0:
            pieces.append(draw(st.sampled_from(_NOISE)))
        elif roll < 6:
            pieces.append(draw(st.sampled_from(_CONNECTORS)))
        elif roll < 13:
            pieces.append(draw(st.sampled_from(_VALID_COMPARISONS)))
        else:
            pieces.append(draw(_restriction()))
        pieces.append(draw(_SEPARATORS))
    return "".join(pieces)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid(), st.integers(min_value=1, max_value=50))
def test_near_valid_filters_compile_or_raise_filter_error(text: str, first_param: int) -> None:
    compile_or_reject(text, first_param)


_COMPARISONS = st.sampled_from(_VALID_COMPARISONS)


def _wrap(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pair = st.tuples(children, children)
    return st.one_of(
        pair.map(lambda p: f"{p[0]} AND {p[1]}"),
        pair.map(lambda p: f"{p[0]} OR {p[1]}"),
        pair.map(lambda p: f"{p[0]} {p[1]}"),
        children.map(lambda s: f"({s})"),
        children.map(lambda s: f"NOT ({s})"),
        children.map(lambda s: f"-({s})"),
    )


@settings(max_examples=500, deadline=None)
@given(st.recursive(_COMPARISONS, _wrap, max_leaves=20), st.integers(min_value=1, max_value=50))
def test_grammar_generated_filters_compile(text: str, first_param: int) -> None:
    depth = deepest = 0
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        deepest = max(deepest, depth)
    assume(deepest <= MAX_DEPTH)
    got = compile_filter(text, FIELDS, first_param)
    check_compiled(got, first_param)
