"""Pure query logic shared by every List RPC: AIP-160 filters, AIP-132 ordering, page tokens."""

from agentstore.query.filter import CompiledFilter, FieldKind, FieldSpec, FilterError, compile_filter
from agentstore.query.ordering import OrderBy, OrderByError, OrderTerm, SortKey, parse_order_by
from agentstore.query.page_token import PageTokenCodec, PageTokenError, binding_for

__all__ = [
    "CompiledFilter",
    "FieldKind",
    "FieldSpec",
    "FilterError",
    "OrderBy",
    "OrderByError",
    "OrderTerm",
    "PageTokenCodec",
    "PageTokenError",
    "SortKey",
    "binding_for",
    "compile_filter",
    "parse_order_by",
]
