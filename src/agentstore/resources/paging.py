"""One page of a List RPC: the query plan of agentstore.query, run in one read-only transaction."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from agentstore.db import Database, Record
from agentstore.query import PageTokenCodec
from agentstore.query.listing import ListSpec, plan_list


async def fetch_page(
    db: Database,
    codec: PageTokenCodec,
    spec: ListSpec,
    tenant_id: uuid.UUID | None,
    *,
    page_size: int,
    page_token: str,
    filter: str = "",
    order_by: str = "",
    platform_scope: bool = False,
    base: Sequence[object] | None = None,
) -> tuple[Sequence[Record], str]:
    """One page of a List RPC and the next page token.

    `base` fills the spec's first `base_params` parameters; by default $1 is the tenant.
    """
    plan = plan_list(spec, codec, page_size=page_size, page_token=page_token, filter=filter, order_by=order_by)
    if base is None:
        base = (tenant_id,) if spec.base_params else ()
    rows = await db.run(
        lambda con: con.fetch(plan.sql, *base, *plan.params), tenant_id, readonly=True, platform_scope=platform_scope
    )
    return plan.page(rows, codec)
