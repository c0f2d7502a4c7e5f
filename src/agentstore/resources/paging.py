"""One page of a List RPC: the query plan of agentstore.query, run in one read-only transaction."""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from agentstore.config import Settings
from agentstore.db import Database, Record
from agentstore.query import PageTokenCodec
from agentstore.query.listing import ListSpec, plan_list

T = TypeVar("T")
log = logging.getLogger(__name__)


class Pages:
    """Pages of List and Search RPCs, with the server's page-token codec."""

    def __init__(self, db: Database, codec: PageTokenCodec) -> None:
        self._db = db
        self._codec = codec

    @staticmethod
    def for_settings(db: Database, settings: Settings) -> Pages:
        """Page tokens signed with AGENTSTORE_PAGE_TOKEN_SECRET (or, unset, a random secret of this
        process: then tokens do not survive a restart, nor work on another replica)."""
        secret = settings.page_token_secret
        if secret is None:
            log.warning("AGENTSTORE_PAGE_TOKEN_SECRET is unset: page tokens will not survive a restart")
            return Pages(db, PageTokenCodec(secrets.token_bytes(32)))
        return Pages(db, PageTokenCodec(secret.get_secret_value().encode()))

    async def fetch(
        self,
        spec: ListSpec,
        tenant_id: uuid.UUID | None,
        request: Any,
        convert: Callable[[Record], T],
        *,
        filter: str | None = None,
        platform_scope: bool = False,
        base: Sequence[object] | None = None,
    ) -> tuple[list[T], str]:
        """The rows of one page, each `convert`ed, and the next page token, from the AIP-158 fields of `request`
        (page_size, page_token, and filter and order_by where it has them). `filter` replaces the
        request's (a List that narrows it, e.g. to one agent); `base` fills the spec's first
        `base_params` parameters (by default $1 is the tenant)."""
        plan = plan_list(
            spec,
            self._codec,
            page_size=request.page_size,
            page_token=request.page_token,
            filter=getattr(request, "filter", "") if filter is None else filter,
            order_by=getattr(request, "order_by", ""),
        )
        if base is None:
            base = (tenant_id,) if spec.base_params else ()
        params = (*base, *plan.params)
        rows = await self._db.run(
            lambda con: con.fetch(plan.sql, *params), tenant_id, readonly=True, platform_scope=platform_scope
        )
        page, token = plan.page(rows, self._codec)
        return [convert(row) for row in page], token
