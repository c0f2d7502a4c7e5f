"""One List pipeline for every resource: page size, order_by, filter and page token → SQL.

Everything a client can get wrong is checked here, before a connection is taken.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agentstore.errors import invalid_argument
from agentstore.query.filter import FieldKind, FieldSpec, FilterError, compile_filter
from agentstore.query.ordering import OrderBy, OrderByError, SortKey, parse_order_by
from agentstore.query.page_token import PageTokenCodec, PageTokenError, binding_for

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class ListSpec:
    """What a resource's List accepts. `select` ends in a WHERE clause using $1..$base_params."""

    resource: str
    select: str
    fields: Mapping[str, FieldSpec]
    sort_keys: Mapping[str, SortKey]
    default_order: str
    tie_breaker: SortKey
    base_params: int = 1


@dataclass(frozen=True)
class ListPlan:
    sql: str
    # The parameters after the spec's base parameters.
    params: list[object]
    order: OrderBy
    page_size: int
    binding: str

    def page(
        self, rows: Sequence[Mapping[str, object]], codec: PageTokenCodec
    ) -> tuple[Sequence[Mapping[str, object]], str]:
        """The rows of this page and the token of the next one ("" on the last page)."""
        if len(rows) <= self.page_size:
            return rows, ""
        rows = rows[: self.page_size]
        cursor = self.order.encode_cursor(self.order.cursor_of(rows[-1]))
        return rows, codec.encode({"c": cursor}, self.binding)


def page_size_of(requested: int) -> int:
    if requested < 0:
        raise invalid_argument(
            "INVALID_PAGE_SIZE", "page_size must not be negative", [("page_size", "must not be negative")]
        )
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def plan_list(
    spec: ListSpec, codec: PageTokenCodec, *, page_size: int, page_token: str, filter: str, order_by: str
) -> ListPlan:
    size = page_size_of(page_size)
    try:
        order = parse_order_by(order_by, spec.sort_keys, spec.default_order, spec.tie_breaker)
    except OrderByError as exc:
        raise invalid_argument("INVALID_ORDER_BY", str(exc), [("order_by", str(exc))]) from None
    try:
        compiled = compile_filter(filter, spec.fields, first_param=spec.base_params + 1)
    except FilterError as exc:
        raise invalid_argument("INVALID_FILTER", str(exc), [("filter", str(exc))]) from None
    binding = binding_for(spec.resource, filter, order_by)
    predicates = [f"({compiled.sql})"]
    params = list(compiled.params)
    if page_token:
        try:
            payload = codec.decode(page_token, binding)
            cursor = order.decode_cursor(payload["c"])
        except (PageTokenError, ValueError, KeyError, TypeError):
            raise invalid_argument(
                "INVALID_PAGE_TOKEN",
                "page_token is not one this server issued for this filter and order_by",
                [("page_token", "invalid, tampered, or issued for another filter or order_by")],
            ) from None
        keyset, keyset_params = order.keyset_predicate(cursor, spec.base_params + 1 + len(params))
        predicates.append(keyset)
        params.extend(keyset_params)
    sql = f"{spec.select} AND {' AND '.join(predicates)} ORDER BY {order.sql()} LIMIT {size + 1}"
    return ListPlan(sql, params, order, size, binding)


# --- declaring a List's fields ----------------------------------------------------------------

# The usual tie-breaker: the id, which is unique within a tenant.
ID_KEY = SortKey("id", "id", FieldKind.UUID)


def filter_fields(**kinds: FieldKind | FieldSpec) -> dict[str, FieldSpec]:
    """Filterable fields by name: a kind for a column of that name, or a whole FieldSpec."""
    return {name: kind if isinstance(kind, FieldSpec) else FieldSpec(name, kind) for name, kind in kinds.items()}


def sort_keys(**kinds: FieldKind) -> dict[str, SortKey]:
    """order_by fields by name, each sorting by the column of that name."""
    return {name: SortKey(name, name, kind) for name, kind in kinds.items()}


def tags_field(column: str) -> FieldSpec:
    """A text[] column whose `:` containment goes through its tenant-scoped GIN index
    (agentstore_scoped_tags, migration 0001; $1 is the tenant)."""
    return _scoped(column, FieldKind.STRING_ARRAY, "agentstore_scoped_tags")


def json_field(column: str) -> FieldSpec:
    """A jsonb column whose `:` and `.key` containment goes through its tenant-scoped GIN index
    (agentstore_scoped_json, migration 0001; $1 is the tenant)."""
    return _scoped(column, FieldKind.JSON, "agentstore_scoped_json")


def _scoped(column: str, kind: FieldKind, function: str) -> FieldSpec:
    return FieldSpec(column, kind, contains_sql=f"{function}(tenant_id, {column}) @> {function}($1, {{value}})")
