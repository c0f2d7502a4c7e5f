"""AgentService end to end: real gRPC channel, real PostgreSQL, real Redis. No mocks."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format, timestamp_pb2

from agentstore.auth import new_api_key
from agentstore.v1 import agent_pb2, agent_service_pb2, tenant_pb2, tenant_service_pb2
from tests.integration.conftest import PLATFORM, PLATFORM_TOKEN, TenantKeys, bearer
from tests.integration.helpers import (
    agent,
    create_agent,
    expect_error,
    ids,
    list_all,
    metadata_value,
    unique,
)

if TYPE_CHECKING:
    from tests.conftest import ScratchDatabase

S = grpc.StatusCode
IDLE, BUSY = agent_pb2.AGENT_STATUS_IDLE, agent_pb2.AGENT_STATUS_BUSY
OFFLINE, ERROR = agent_pb2.AGENT_STATUS_OFFLINE, agent_pb2.AGENT_STATUS_ERROR


def ts(moment: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


def when(t: timestamp_pb2.Timestamp) -> datetime:
    return t.ToDatetime(tzinfo=UTC)


def update_request(a: agent_pb2.Agent, paths: list[str] | None = None) -> agent_service_pb2.UpdateAgentRequest:
    request = agent_service_pb2.UpdateAgentRequest(agent=a)
    if paths is not None:
        request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
    return request


async def get(stub: Any, md: Any, agent_id: str) -> agent_pb2.Agent:
    return await stub.GetAgent(agent_service_pb2.GetAgentRequest(id=agent_id), metadata=md)


# --- happy paths ------------------------------------------------------------------------------


async def test_create_assigns_output_fields_and_defaults(agents_stub, tenant: TenantKeys) -> None:
    heartbeat = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    bogus_id = str(uuid.uuid4())
    request = agent(
        "planner-1",
        role="planner",
        kind="llm",
        capabilities=["python", "sql"],
        metadata={"region": "eu", "nested": {"zone": "a", "n": 2}},
        # Output-only fields are ignored on create.
        id=bogus_id,
        etag='"999"',
        create_time=ts(datetime(2000, 1, 1, tzinfo=UTC)),
    )
    request.last_heartbeat_time.CopyFrom(ts(heartbeat))
    created = await agents_stub.CreateAgent(agent_service_pb2.CreateAgentRequest(agent=request), metadata=tenant.md())

    assert str(uuid.UUID(created.id)) == created.id
    assert created.id != bogus_id
    assert created.name == "planner-1"
    assert (created.role, created.kind) == ("planner", "llm")
    assert list(created.capabilities) == ["python", "sql"]
    assert json_format.MessageToDict(created.metadata) == {"region": "eu", "nested": {"zone": "a", "n": 2}}
    assert when(created.last_heartbeat_time) == heartbeat
    assert created.status == IDLE
    assert created.HasField("create_time") and created.HasField("update_time")
    assert when(created.create_time) > datetime(2020, 1, 1, tzinfo=UTC)
    assert created.create_time == created.update_time
    assert created.etag and created.etag != '"999"'

    got = await get(agents_stub, tenant.md("reader"), created.id)
    assert got == created


async def test_create_keeps_explicit_status(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(agents_stub, tenant.md(), status=BUSY)
    assert created.status == BUSY
    assert (await get(agents_stub, tenant.md(), created.id)).status == BUSY


async def test_batch_get_preserves_request_order(agents_stub, tenant: TenantKeys) -> None:
    agents = [await create_agent(agents_stub, tenant.md()) for _ in range(5)]
    for order in ([4, 0, 3, 1, 2], [0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2]):
        wanted = [agents[i].id for i in order]
        response = await agents_stub.BatchGetAgents(
            agent_service_pb2.BatchGetAgentsRequest(ids=wanted), metadata=tenant.md("reader")
        )
        assert ids(response.agents) == wanted
        assert list(response.agents) == [agents[i] for i in order]


async def test_batch_get_empty(agents_stub, tenant: TenantKeys) -> None:
    response = await agents_stub.BatchGetAgents(agent_service_pb2.BatchGetAgentsRequest(), metadata=tenant.md())
    assert list(response.agents) == []


async def test_update_single_field_mask(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(agents_stub, tenant.md(), role="planner", kind="llm", capabilities=["python"])
    patch = agent_pb2.Agent(id=created.id, role="worker", kind="ignored-not-in-mask", name="ignored-too")
    updated = await agents_stub.UpdateAgent(update_request(patch, ["role"]), metadata=tenant.md())

    assert updated.role == "worker"
    assert (updated.name, updated.kind) == (created.name, "llm")
    assert list(updated.capabilities) == ["python"]
    assert updated.status == created.status
    assert updated.create_time == created.create_time
    assert when(updated.update_time) >= when(created.update_time)
    assert updated.etag != created.etag
    assert await get(agents_stub, tenant.md(), created.id) == updated


async def test_update_star_mask_replaces_every_field(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(
        agents_stub, tenant.md(), role="planner", kind="llm", capabilities=["python"], metadata={"a": 1}
    )
    patch = agent(unique("renamed"), status=BUSY, kind="tool")
    patch.id = created.id
    updated = await agents_stub.UpdateAgent(update_request(patch, ["*"]), metadata=tenant.md())

    assert (updated.name, updated.kind, updated.status) == (patch.name, "tool", BUSY)
    # Fields absent from the patch are cleared by `*`.
    assert updated.role == ""
    assert list(updated.capabilities) == []
    assert json_format.MessageToDict(updated.metadata) == {}
    assert not updated.HasField("last_heartbeat_time")
    assert updated.id == created.id and updated.create_time == created.create_time
    assert await get(agents_stub, tenant.md(), created.id) == updated


async def test_update_empty_mask_updates_fields_that_are_set(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(
        agents_stub, tenant.md(), role="planner", kind="llm", capabilities=["python"], metadata={"a": 1}
    )
    patch = agent_pb2.Agent(id=created.id, kind="tool", capabilities=["go", "rust"], status=OFFLINE)
    updated = await agents_stub.UpdateAgent(update_request(patch), metadata=tenant.md())

    assert (updated.kind, list(updated.capabilities), updated.status) == ("tool", ["go", "rust"], OFFLINE)
    # Unset fields stay as they were.
    assert (updated.name, updated.role) == (created.name, "planner")
    assert json_format.MessageToDict(updated.metadata) == {"a": 1}
    assert updated.etag != created.etag


async def test_update_metadata_and_heartbeat(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(agents_stub, tenant.md(), metadata={"a": 1, "b": 2})
    beat = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    patch = agent_pb2.Agent(id=created.id)
    patch.metadata.update({"c": {"d": "e"}})
    patch.last_heartbeat_time.CopyFrom(ts(beat))
    updated = await agents_stub.UpdateAgent(
        update_request(patch, ["metadata", "last_heartbeat_time"]), metadata=tenant.md()
    )
    assert json_format.MessageToDict(updated.metadata) == {"c": {"d": "e"}}
    assert when(updated.last_heartbeat_time) == beat


async def test_update_with_matching_etag_bumps_it(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(agents_stub, tenant.md())
    first = await agents_stub.UpdateAgent(
        update_request(agent_pb2.Agent(id=created.id, role="r1", etag=created.etag), ["role"]), metadata=tenant.md()
    )
    assert first.etag != created.etag
    second = await agents_stub.UpdateAgent(
        update_request(agent_pb2.Agent(id=created.id, role="r2", etag=first.etag), ["role"]), metadata=tenant.md()
    )
    assert second.etag not in (created.etag, first.etag)
    assert second.role == "r2"
    # The first etag is stale now.
    await expect_error(
        agents_stub.UpdateAgent(
            update_request(agent_pb2.Agent(id=created.id, role="r3", etag=first.etag), ["role"]),
            metadata=tenant.md(),
        ),
        S.ABORTED,
        "ETAG_MISMATCH",
    )


async def test_delete(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(agents_stub, tenant.md())
    await agents_stub.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id=created.id), metadata=tenant.md())
    await expect_error(get(agents_stub, tenant.md(), created.id), S.NOT_FOUND, "AGENT_NOT_FOUND")
    # Deleting again: the agent is gone.
    await expect_error(
        agents_stub.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id=created.id), metadata=tenant.md()),
        S.NOT_FOUND,
        "AGENT_NOT_FOUND",
    )
    # The name is free again.
    again = await create_agent(agents_stub, tenant.md(), created.name)
    assert again.id != created.id


async def test_delete_with_matching_etag(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(agents_stub, tenant.md())
    updated = await agents_stub.UpdateAgent(
        update_request(agent_pb2.Agent(id=created.id, role="x"), ["role"]), metadata=tenant.md()
    )
    await agents_stub.DeleteAgent(
        agent_service_pb2.DeleteAgentRequest(id=created.id, etag=updated.etag), metadata=tenant.md()
    )
    await expect_error(get(agents_stub, tenant.md(), created.id), S.NOT_FOUND, "AGENT_NOT_FOUND")


async def test_admin_key_may_write(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(agents_stub, tenant.md("admin"))
    await agents_stub.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id=created.id), metadata=tenant.md("admin"))


# --- listing ----------------------------------------------------------------------------------


def by_create_time(agents: list[agent_pb2.Agent]) -> list[agent_pb2.Agent]:
    return sorted(agents, key=lambda a: (when(a.create_time), a.id))


async def test_list_default_order_is_create_time(agents_stub, tenant: TenantKeys) -> None:
    agents = [await create_agent(agents_stub, tenant.md(), f"n-{c}") for c in "dbeac"]
    response = await agents_stub.ListAgents(agent_service_pb2.ListAgentsRequest(), metadata=tenant.md("reader"))
    assert list(response.agents) == by_create_time(agents)
    assert response.next_page_token == ""
    # Created one after another, so create order is create_time order.
    assert ids(response.agents) == ids(agents)


async def test_list_order_by(agents_stub, tenant: TenantKeys) -> None:
    agents = [await create_agent(agents_stub, tenant.md(), f"n-{c}") for c in "dbeac"]
    # Touch them in a different order so update_time order differs from create_time order.
    for i in (3, 0, 4):
        agents[i] = await agents_stub.UpdateAgent(
            update_request(agent_pb2.Agent(id=agents[i].id, role=f"touched-{i}"), ["role"]), metadata=tenant.md()
        )

    def expect(key: Callable[[agent_pb2.Agent], Any], descending: bool) -> list[str]:
        # The id tie-breaker is always ascending.
        ordered = sorted(agents, key=lambda a: a.id)
        return ids(sorted(ordered, key=key, reverse=descending))

    cases = {
        "name": expect(lambda a: a.name, False),
        "name desc": expect(lambda a: a.name, True),
        "name asc": expect(lambda a: a.name, False),
        "create_time": expect(lambda a: when(a.create_time), False),
        "create_time desc": expect(lambda a: when(a.create_time), True),
        "update_time": expect(lambda a: when(a.update_time), False),
        "update_time desc": expect(lambda a: when(a.update_time), True),
        " update_time   desc ": expect(lambda a: when(a.update_time), True),
    }
    assert cases["name"] == ids(sorted(agents, key=lambda a: a.name))
    assert [a.name for a in agents if a.id == cases["name"][0]] == ["n-a"]
    for order_by, expected in cases.items():
        got = await list_all(agents_stub, tenant.md(), order_by=order_by)
        assert ids(got) == expected, order_by
        # The same order page by page.
        paged = await list_all(agents_stub, tenant.md(), order_by=order_by, page_size=2)
        assert ids(paged) == expected, order_by


async def test_list_pages_through_without_gaps_or_duplicates(agents_stub, tenant: TenantKeys) -> None:
    agents = [await create_agent(agents_stub, tenant.md()) for _ in range(7)]
    expected = ids(by_create_time(agents))
    for order_by in ("", "name desc", "update_time desc, name"):
        full = await list_all(agents_stub, tenant.md(), order_by=order_by, page_size=1000)
        assert sorted(ids(full)) == sorted(expected)
        pages: list[list[str]] = []
        token = ""
        while True:
            response = await agents_stub.ListAgents(
                agent_service_pb2.ListAgentsRequest(page_size=2, page_token=token, order_by=order_by),
                metadata=tenant.md("reader"),
            )
            pages.append(ids(response.agents))
            token = response.next_page_token
            if not token:
                break
        assert [len(p) for p in pages] == [2, 2, 2, 1], order_by
        flat = [i for page in pages for i in page]
        assert len(flat) == len(set(flat)) == 7
        assert flat == ids(full), order_by
    assert ids(await list_all(agents_stub, tenant.md(), page_size=3)) == expected


async def test_list_exact_multiple_of_page_size(agents_stub, tenant: TenantKeys) -> None:
    agents = [await create_agent(agents_stub, tenant.md()) for _ in range(4)]
    first = await agents_stub.ListAgents(agent_service_pb2.ListAgentsRequest(page_size=2), metadata=tenant.md())
    second = await agents_stub.ListAgents(
        agent_service_pb2.ListAgentsRequest(page_size=2, page_token=first.next_page_token), metadata=tenant.md()
    )
    assert first.next_page_token
    assert ids(first.agents) + ids(second.agents) == ids(by_create_time(agents))
    if second.next_page_token:
        third = await agents_stub.ListAgents(
            agent_service_pb2.ListAgentsRequest(page_size=2, page_token=second.next_page_token),
            metadata=tenant.md(),
        )
        assert list(third.agents) == [] and third.next_page_token == ""


async def test_list_paging_with_filter(agents_stub, tenant: TenantKeys) -> None:
    agents = [
        await create_agent(agents_stub, tenant.md(), capabilities=["python"] if i % 2 else ["go"]) for i in range(9)
    ]
    pythons = [a for a in by_create_time(agents) if "python" in a.capabilities]
    got = await list_all(agents_stub, tenant.md(), filter='capabilities:"python"', page_size=1)
    assert ids(got) == ids(pythons)


async def test_list_empty_tenant(agents_stub, tenant: TenantKeys) -> None:
    response = await agents_stub.ListAgents(agent_service_pb2.ListAgentsRequest(), metadata=tenant.md())
    assert list(response.agents) == [] and response.next_page_token == ""


async def test_list_page_size_above_maximum_is_clamped(agents_stub, tenant: TenantKeys) -> None:
    total = 1003
    for start in range(0, total, 25):
        await asyncio.gather(
            *(create_agent(agents_stub, tenant.md(), f"bulk-{i:05d}") for i in range(start, min(total, start + 25)))
        )
    first = await agents_stub.ListAgents(
        agent_service_pb2.ListAgentsRequest(page_size=5000, order_by="name"), metadata=tenant.md()
    )
    assert len(first.agents) == 1000
    assert first.next_page_token
    second = await agents_stub.ListAgents(
        agent_service_pb2.ListAgentsRequest(page_size=5000, order_by="name", page_token=first.next_page_token),
        metadata=tenant.md(),
    )
    assert [a.name for a in second.agents] == ["bulk-01000", "bulk-01001", "bulk-01002"]
    assert second.next_page_token == ""
    assert [a.name for a in first.agents] == [f"bulk-{i:05d}" for i in range(1000)]
    # 0 means the default of 50.
    default = await agents_stub.ListAgents(agent_service_pb2.ListAgentsRequest(), metadata=tenant.md())
    assert len(default.agents) == 50 and default.next_page_token


# --- filters ------------------------------------------------------------------------------------

FILTER_DATA: list[dict[str, Any]] = [
    {
        "key": "a1",
        "role": "planner",
        "kind": "llm",
        "status": IDLE,
        "capabilities": ["python", "sql"],
        "metadata": {"region": "eu", "tier": 1, "nested": {"zone": "a"}},
    },
    {
        "key": "a2",
        "role": "worker",
        "kind": "tool",
        "status": BUSY,
        "capabilities": ["python"],
        "metadata": {"region": "us", "gpu": True},
    },
    {"key": "a3", "role": "planner", "kind": "tool", "status": OFFLINE, "capabilities": [], "metadata": {}},
    {
        "key": "a4",
        "role": "worker",
        "kind": "llm",
        "status": ERROR,
        "capabilities": ["go"],
        "metadata": {"region": "eu", "nested": {"zone": "b"}},
    },
    {
        "key": "a5",
        "role": "",
        "kind": "llm",
        "status": BUSY,
        "capabilities": ["python", "go"],
        "metadata": {"tier": 2.5, "nested": {"zone": "a", "deep": {"x": None}}, "region": "EU"},
    },
    {
        "key": "a6",
        "role": "planner",
        "kind": "llm",
        "status": IDLE,
        "capabilities": ["sql"],
        "metadata": {"region": "eu", "tier": "1"},
    },
]


def _md(row: dict[str, Any]) -> dict[str, Any]:
    return row["metadata"]


def _zone(row: dict[str, Any]) -> Any:
    return _md(row).get("nested", {}).get("zone")


# (filter, predicate over the FILTER_DATA row that says whether it should match)
FILTER_CASES: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    ("", lambda r: True),
    ("status = IDLE", lambda r: r["status"] == IDLE),
    ("status = AGENT_STATUS_BUSY", lambda r: r["status"] == BUSY),
    ("status != AGENT_STATUS_BUSY", lambda r: r["status"] != BUSY),
    ('role = "planner"', lambda r: r["role"] == "planner"),
    ("role = planner", lambda r: r["role"] == "planner"),
    ('role != "planner"', lambda r: r["role"] != "planner"),
    ('role = ""', lambda r: r["role"] == ""),
    ("kind = llm", lambda r: r["kind"] == "llm"),
    ("kind != 'llm'", lambda r: r["kind"] != "llm"),
    ('capabilities:"python"', lambda r: "python" in r["capabilities"]),
    ("capabilities:go", lambda r: "go" in r["capabilities"]),
    ("capabilities:rust", lambda r: False),
    ('metadata.region = "eu"', lambda r: _md(r).get("region") == "eu"),
    ('metadata.region != "eu"', lambda r: _md(r).get("region") != "eu"),
    ('metadata.nested.zone = "a"', lambda r: _zone(r) == "a"),
    ("metadata.nested.deep.x = null", lambda r: "x" in _md(r).get("nested", {}).get("deep", {})),
    ("metadata.tier = 1", lambda r: _md(r).get("tier") == 1 and not isinstance(_md(r).get("tier"), str)),
    ('metadata.tier = "1"', lambda r: _md(r).get("tier") == "1"),
    ("metadata.tier = 2.5", lambda r: _md(r).get("tier") == 2.5),
    ("metadata.gpu = true", lambda r: _md(r).get("gpu") is True),
    ("metadata:region", lambda r: "region" in _md(r)),
    ("metadata:gpu", lambda r: "gpu" in _md(r)),
    ("metadata:nested.zone", lambda r: _zone(r) is not None),
    ("metadata:nested.deep", lambda r: "deep" in _md(r).get("nested", {})),
    ('role = "planner" AND status = IDLE', lambda r: r["role"] == "planner" and r["status"] == IDLE),
    ('role = "planner" status = IDLE', lambda r: r["role"] == "planner" and r["status"] == IDLE),
    ('role = "planner" OR capabilities:go', lambda r: r["role"] == "planner" or "go" in r["capabilities"]),
    ("NOT status = IDLE", lambda r: r["status"] != IDLE),
    ("-capabilities:python", lambda r: "python" not in r["capabilities"]),
    ("NOT metadata:region", lambda r: "region" not in _md(r)),
    (
        '(role = "planner" OR role = "worker") AND kind = llm',
        lambda r: r["role"] in ("planner", "worker") and r["kind"] == "llm",
    ),
    (
        "kind = llm (status = BUSY OR status = ERROR)",
        lambda r: r["kind"] == "llm" and r["status"] in (BUSY, ERROR),
    ),
    # AIP-160: OR binds tighter than AND.
    (
        "status = BUSY OR status = IDLE AND kind = llm",
        lambda r: r["status"] in (BUSY, IDLE) and r["kind"] == "llm",
    ),
    (
        "NOT (metadata:region OR capabilities:go)",
        lambda r: not ("region" in _md(r) or "go" in r["capabilities"]),
    ),
    (
        '-(metadata.region = "eu") AND (capabilities:python OR NOT kind = tool)',
        lambda r: _md(r).get("region") != "eu" and ("python" in r["capabilities"] or r["kind"] != "tool"),
    ),
    (
        '((status = IDLE)) OR (metadata.nested.zone = "b" AND -role = "")',
        lambda r: r["status"] == IDLE or (_zone(r) == "b" and r["role"] != ""),
    ),
]


@pytest.fixture(scope="module")
async def filter_tenant(new_tenant) -> TenantKeys:
    return await new_tenant("filters")


@pytest.fixture(scope="module")
async def filter_agents(agents_stub, filter_tenant: TenantKeys) -> dict[str, agent_pb2.Agent]:
    created: dict[str, agent_pb2.Agent] = {}
    for row in FILTER_DATA:
        fields = {k: v for k, v in row.items() if k != "key"}
        created[row["key"]] = await create_agent(agents_stub, filter_tenant.md(), f"f-{row['key']}", **fields)
    return created


@pytest.mark.parametrize(("filter_text", "predicate"), FILTER_CASES, ids=[c[0] or "<empty>" for c in FILTER_CASES])
async def test_list_filter(
    agents_stub,
    filter_tenant: TenantKeys,
    filter_agents: dict[str, agent_pb2.Agent],
    filter_text: str,
    predicate: Callable[[dict[str, Any]], bool],
) -> None:
    expected = {filter_agents[row["key"]].id for row in FILTER_DATA if predicate(row)}
    got = await list_all(agents_stub, filter_tenant.md("reader"), filter=filter_text)
    assert len(ids(got)) == len(set(ids(got)))
    names = {a.id: a.name for a in filter_agents.values()}
    assert {names[i] for i in ids(got)} == {names[i] for i in expected}, filter_text


async def test_list_filter_create_time_ranges(
    agents_stub, filter_tenant: TenantKeys, filter_agents: dict[str, agent_pb2.Agent]
) -> None:
    agents = list(filter_agents.values())
    times = {a.id: when(a.create_time) for a in agents}
    lo, hi = sorted(times.values())[1], sorted(times.values())[4]

    def rfc(moment: datetime, offset_hours: int = 0) -> str:
        tz = UTC if offset_hours == 0 else timezone(timedelta(hours=offset_hours))
        text = moment.astimezone(tz).isoformat(timespec="microseconds")
        return text.replace("+00:00", "Z")

    cases: list[tuple[str, Callable[[datetime], bool]]] = [
        (f'create_time >= "{rfc(lo)}"', lambda t: t >= lo),
        (f'create_time > "{rfc(lo)}"', lambda t: t > lo),
        (f'create_time < "{rfc(hi)}"', lambda t: t < hi),
        (f'create_time <= "{rfc(hi, 2)}"', lambda t: t <= hi),
        (f'create_time = "{rfc(lo, -5)}"', lambda t: t == lo),
        (f'create_time != "{rfc(lo)}"', lambda t: t != lo),
        (f'create_time > "{rfc(lo)}" AND create_time <= "{rfc(hi)}"', lambda t: lo < t <= hi),
        (f'create_time < "{rfc(lo)}" OR create_time >= "{rfc(hi)}"', lambda t: t < lo or t >= hi),
        (f"create_time >= '{lo.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}'", lambda t: t >= lo),
        ('create_time > "2000-01-01T00:00:00Z"', lambda t: True),
        ('create_time < "2000-01-01T00:00:00+01:00"', lambda t: False),
        (f'update_time >= "{rfc(lo)}" AND create_time < "{rfc(hi)}"', lambda t: lo <= t < hi),
    ]
    for filter_text, predicate in cases:
        expected = {i for i, t in times.items() if predicate(t)}
        got = await list_all(agents_stub, filter_tenant.md(), filter=filter_text)
        assert set(ids(got)) == expected, filter_text
    # The boundaries really split the set, so the comparisons above were not vacuous.
    assert 0 < len([t for t in times.values() if t >= lo]) < len(times)


async def test_list_filter_last_heartbeat_time(agents_stub, tenant: TenantKeys) -> None:
    early = agent(unique("early"))
    early.last_heartbeat_time.CopyFrom(ts(datetime(2026, 1, 1, tzinfo=UTC)))
    late = agent(unique("late"))
    late.last_heartbeat_time.CopyFrom(ts(datetime(2026, 6, 1, tzinfo=UTC)))
    never = agent(unique("never"))
    made = {}
    for a in (early, late, never):
        made[a.name] = await agents_stub.CreateAgent(
            agent_service_pb2.CreateAgentRequest(agent=a), metadata=tenant.md()
        )
    got = await list_all(agents_stub, tenant.md(), filter='last_heartbeat_time < "2026-03-01T00:00:00Z"')
    assert ids(got) == [made[early.name].id]
    got = await list_all(agents_stub, tenant.md(), filter='last_heartbeat_time >= "2026-03-01T00:00:00Z"')
    assert ids(got) == [made[late.name].id]


# --- errors: names, etags, ids, fields --------------------------------------------------------


async def test_duplicate_name_on_create(agents_stub, tenant: TenantKeys) -> None:
    first = await create_agent(agents_stub, tenant.md(), "dup")
    failure = await expect_error(
        create_agent(agents_stub, tenant.md(), "dup"), S.ALREADY_EXISTS, "AGENT_NAME_TAKEN", field="agent.name"
    )
    assert failure.trailer("x-request-id")
    assert ids(await list_all(agents_stub, tenant.md())) == [first.id]


async def test_same_name_in_two_tenants(agents_stub, new_tenant) -> None:
    a, b = await new_tenant("same-a"), await new_tenant("same-b")
    one = await create_agent(agents_stub, a.md(), "shared-name")
    two = await create_agent(agents_stub, b.md(), "shared-name")
    assert one.id != two.id


async def test_duplicate_name_on_update(agents_stub, tenant: TenantKeys) -> None:
    taken = await create_agent(agents_stub, tenant.md(), "taken")
    other = await create_agent(agents_stub, tenant.md(), "other")
    await expect_error(
        agents_stub.UpdateAgent(
            update_request(agent_pb2.Agent(id=other.id, name="taken"), ["name"]), metadata=tenant.md()
        ),
        S.ALREADY_EXISTS,
        "AGENT_NAME_TAKEN",
        field="agent.name",
    )
    # With an empty mask too.
    await expect_error(
        agents_stub.UpdateAgent(update_request(agent_pb2.Agent(id=other.id, name="taken")), metadata=tenant.md()),
        S.ALREADY_EXISTS,
        "AGENT_NAME_TAKEN",
    )
    assert await get(agents_stub, tenant.md(), other.id) == other
    assert await get(agents_stub, tenant.md(), taken.id) == taken
    # Renaming onto its own name is fine.
    same = await agents_stub.UpdateAgent(
        update_request(agent_pb2.Agent(id=other.id, name="other"), ["name"]), metadata=tenant.md()
    )
    assert same.name == "other"


async def test_stale_etag_on_update_changes_nothing(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(agents_stub, tenant.md(), role="before")
    current = await agents_stub.UpdateAgent(
        update_request(agent_pb2.Agent(id=created.id, role="current"), ["role"]), metadata=tenant.md()
    )
    for stale in (created.etag, '"12345"', "garbage"):
        await expect_error(
            agents_stub.UpdateAgent(
                update_request(agent_pb2.Agent(id=created.id, role="after", etag=stale), ["role"]),
                metadata=tenant.md(),
            ),
            S.ABORTED,
            "ETAG_MISMATCH",
        )
    assert await get(agents_stub, tenant.md(), created.id) == current


async def test_stale_etag_on_delete_changes_nothing(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(agents_stub, tenant.md())
    current = await agents_stub.UpdateAgent(
        update_request(agent_pb2.Agent(id=created.id, role="x"), ["role"]), metadata=tenant.md()
    )
    await expect_error(
        agents_stub.DeleteAgent(
            agent_service_pb2.DeleteAgentRequest(id=created.id, etag=created.etag), metadata=tenant.md()
        ),
        S.ABORTED,
        "ETAG_MISMATCH",
    )
    assert await get(agents_stub, tenant.md(), created.id) == current


BAD_FILTERS = [
    # (filter, a token the message must name)
    ("bogus = 1", "bogus"),
    ('metadata_region = "eu"', "metadata_region"),
    ("name ~ x", "~"),
    ("role > planner", ">"),
    ("capabilities = python", "="),
    ("status < IDLE", "<"),
    ('name = "abc', '"abc'),
    ("name = 'unterminated", "'unterminated"),
    ('create_time > "yesterday"', "yesterday"),
    ('create_time > "2026-13-01T00:00:00Z"', "2026-13-01T00:00:00Z"),
    ('create_time > "2026-01-01T00:00:00"', "2026-01-01T00:00:00"),
    ("status = SLEEPING", "SLEEPING"),
    ("name = x AND", "end of filter"),
    ("(name = x", "end of filter"),
    ("name = x)", ")"),
    ("name", "end of filter"),
    ("name ! x", "!"),
    ('role.sub = "x"', "role.sub"),
]


@pytest.mark.parametrize(("filter_text", "token"), BAD_FILTERS, ids=[f for f, _ in BAD_FILTERS])
async def test_bad_filter(agents_stub, tenant: TenantKeys, filter_text: str, token: str) -> None:
    failure = await expect_error(
        agents_stub.ListAgents(agent_service_pb2.ListAgentsRequest(filter=filter_text), metadata=tenant.md()),
        S.INVALID_ARGUMENT,
        "INVALID_FILTER",
        field="filter",
    )
    assert token in failure.message, (filter_text, failure.message)


@pytest.mark.parametrize("order_by", ["bogus", "name sideways", "role", "name, name", "name desc extra", ","])
async def test_bad_order_by(agents_stub, tenant: TenantKeys, order_by: str) -> None:
    await expect_error(
        agents_stub.ListAgents(agent_service_pb2.ListAgentsRequest(order_by=order_by), metadata=tenant.md()),
        S.INVALID_ARGUMENT,
        "INVALID_ORDER_BY",
        field="order_by",
    )


def flip(token: str, position: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    replacement = alphabet[(alphabet.index(token[position]) + 1) % len(alphabet)]
    return token[:position] + replacement + token[position + 1 :]


async def test_tampered_and_rebound_page_tokens(agents_stub, tenants_stub, tenant: TenantKeys) -> None:
    for _ in range(3):
        await create_agent(agents_stub, tenant.md(), role="r", capabilities=["python"])
    first = await agents_stub.ListAgents(
        agent_service_pb2.ListAgentsRequest(page_size=1, filter="role = r"), metadata=tenant.md()
    )
    token = first.next_page_token
    assert token
    # The genuine token works.
    ok = await agents_stub.ListAgents(
        agent_service_pb2.ListAgentsRequest(page_size=1, filter="role = r", page_token=token), metadata=tenant.md()
    )
    assert len(ok.agents) == 1 and ok.agents[0].id != first.agents[0].id

    def bad(**kwargs: Any) -> Any:
        request = agent_service_pb2.ListAgentsRequest(page_size=1, filter="role = r", page_token=token)
        for k, v in kwargs.items():
            setattr(request, k, v)
        return expect_error(
            agents_stub.ListAgents(request, metadata=tenant.md()),
            S.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
            field="page_token",
        )

    for position in (0, len(token) // 2, len(token) - 1):
        await bad(page_token=flip(token, position))
    await bad(page_token=token[:-1])
    await bad(page_token=token + "A")
    await bad(page_token="not a token!")
    # Reused with another filter or order_by.
    await bad(filter="role = s")
    await bad(filter='capabilities:"python"')
    await bad(filter="")
    await bad(order_by="name")
    await bad(order_by="create_time desc")
    # A token issued by another resource's listing is not an agents token.
    tenants_page = await tenants_stub.ListTenants(tenant_service_pb2.ListTenantsRequest(page_size=1), metadata=PLATFORM)
    assert tenants_page.next_page_token
    await expect_error(
        agents_stub.ListAgents(
            agent_service_pb2.ListAgentsRequest(page_token=tenants_page.next_page_token), metadata=tenant.md()
        ),
        S.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


async def test_negative_page_size(agents_stub, tenant: TenantKeys) -> None:
    for size in (-1, -1000):
        await expect_error(
            agents_stub.ListAgents(agent_service_pb2.ListAgentsRequest(page_size=size), metadata=tenant.md()),
            S.INVALID_ARGUMENT,
            "INVALID_PAGE_SIZE",
            field="page_size",
        )


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "1234", "x" * 100, "' OR 1=1 --"])
async def test_bad_uuid_ids(agents_stub, tenant: TenantKeys, bad_id: str) -> None:
    md = tenant.md()
    await expect_error(get(agents_stub, md, bad_id), S.INVALID_ARGUMENT, "INVALID_ID", field="id")
    await expect_error(
        agents_stub.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id=bad_id), metadata=md),
        S.INVALID_ARGUMENT,
        "INVALID_ID",
        field="id",
    )
    await expect_error(
        agents_stub.UpdateAgent(update_request(agent_pb2.Agent(id=bad_id, role="x"), ["role"]), metadata=md),
        S.INVALID_ARGUMENT,
        "INVALID_ID",
        field="agent.id",
    )
    await expect_error(
        agents_stub.BatchGetAgents(
            agent_service_pb2.BatchGetAgentsRequest(ids=[str(uuid.uuid4()), bad_id]), metadata=md
        ),
        S.INVALID_ARGUMENT,
        "INVALID_ID",
        field="ids[1]",
    )


async def test_empty_id(agents_stub, tenant: TenantKeys) -> None:
    await expect_error(get(agents_stub, tenant.md(), ""), S.INVALID_ARGUMENT, "INVALID_ID", field="id")


async def test_batch_get_too_many_ids(agents_stub, tenant: TenantKeys) -> None:
    await expect_error(
        agents_stub.BatchGetAgents(
            agent_service_pb2.BatchGetAgentsRequest(ids=[str(uuid.uuid4()) for _ in range(1001)]),
            metadata=tenant.md(),
        ),
        S.INVALID_ARGUMENT,
        "INVALID_ID",
        field="ids",
    )


async def test_missing_name(agents_stub, tenant: TenantKeys) -> None:
    await expect_error(
        create_agent(agents_stub, tenant.md(), "", role="planner"),
        S.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="agent.name",
    )
    created = await create_agent(agents_stub, tenant.md())
    await expect_error(
        agents_stub.UpdateAgent(update_request(agent_pb2.Agent(id=created.id), ["name"]), metadata=tenant.md()),
        S.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="agent.name",
    )
    await expect_error(
        agents_stub.CreateAgent(agent_service_pb2.CreateAgentRequest(), metadata=tenant.md()),
        S.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="agent",
    )
    assert await get(agents_stub, tenant.md(), created.id) == created


async def test_field_bounds(agents_stub, tenant: TenantKeys) -> None:
    md = tenant.md()
    await expect_error(
        create_agent(agents_stub, md, "n" * 257), S.INVALID_ARGUMENT, "INVALID_FIELD", field="agent.name"
    )
    assert (await create_agent(agents_stub, md, "n" * 256)).name == "n" * 256
    await expect_error(
        create_agent(agents_stub, md, role="r" * 129), S.INVALID_ARGUMENT, "INVALID_FIELD", field="agent.role"
    )
    await expect_error(
        create_agent(agents_stub, md, capabilities=["ok", ""]),
        S.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="agent.capabilities[1]",
    )
    await expect_error(
        create_agent(agents_stub, md, capabilities=[f"c{i}" for i in range(101)]),
        S.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="agent.capabilities",
    )
    await expect_error(
        create_agent(agents_stub, md, metadata={"big": "x" * (65 * 1024)}),
        S.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="agent.metadata",
    )
    await expect_error(
        create_agent(agents_stub, md, status=17), S.INVALID_ARGUMENT, "INVALID_FIELD", field="agent.status"
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": "nul\x00name"}, "agent.name"),
        ({"role": "r\x00"}, "agent.role"),
        ({"capabilities": ["py\x00thon"]}, "agent.capabilities[0]"),
        ({"metadata": {"k": "v\x00"}}, "agent.metadata"),
        ({"metadata": {"k\x00": "v"}}, "agent.metadata"),
        ({"metadata": {"n": float("nan")}}, "agent.metadata"),
        ({"metadata": {"deep": {"n": float("inf")}}}, "agent.metadata"),
        ({"metadata": {"list": [1, float("-inf")]}}, "agent.metadata"),
    ],
    ids=[
        "nul-name",
        "nul-role",
        "nul-capability",
        "nul-metadata-value",
        "nul-metadata-key",
        "nan",
        "inf",
        "neg-inf-in-list",
    ],
)
async def test_unstorable_values_are_invalid_argument(
    agents_stub, tenant: TenantKeys, fields: dict[str, Any], field: str
) -> None:
    fields = dict(fields)
    name = fields.pop("name", unique("ok"))
    await expect_error(create_agent(agents_stub, tenant.md(), name, **fields), S.INVALID_ARGUMENT, field=field)
    # The same through UpdateAgent.
    created = await create_agent(agents_stub, tenant.md())
    patch = agent(name, **fields)
    patch.id = created.id
    await expect_error(
        agents_stub.UpdateAgent(update_request(patch), metadata=tenant.md()), S.INVALID_ARGUMENT, field=field
    )
    assert await get(agents_stub, tenant.md(), created.id) == created


@pytest.mark.parametrize("path", ["bogus", "metadata.region", "Name", "id", "create_time", "update_time", "etag"])
async def test_bad_update_mask(agents_stub, tenant: TenantKeys, path: str) -> None:
    created = await create_agent(agents_stub, tenant.md())
    await expect_error(
        agents_stub.UpdateAgent(
            update_request(agent_pb2.Agent(id=created.id, role="x"), ["role", path]), metadata=tenant.md()
        ),
        S.INVALID_ARGUMENT,
        "INVALID_UPDATE_MASK",
        field="update_mask",
    )
    assert await get(agents_stub, tenant.md(), created.id) == created


async def test_update_status_to_unspecified_is_rejected(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(agents_stub, tenant.md())
    await expect_error(
        agents_stub.UpdateAgent(update_request(agent_pb2.Agent(id=created.id), ["status"]), metadata=tenant.md()),
        S.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="agent.status",
    )


async def test_unknown_ids_are_not_found(agents_stub, tenant: TenantKeys) -> None:
    md = tenant.md()
    missing = str(uuid.uuid4())
    await expect_error(get(agents_stub, md, missing), S.NOT_FOUND, "AGENT_NOT_FOUND")
    await expect_error(
        agents_stub.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id=missing), metadata=md),
        S.NOT_FOUND,
        "AGENT_NOT_FOUND",
    )
    await expect_error(
        agents_stub.UpdateAgent(update_request(agent_pb2.Agent(id=missing, role="x"), ["role"]), metadata=md),
        S.NOT_FOUND,
        "AGENT_NOT_FOUND",
    )
    known = await create_agent(agents_stub, md)
    await expect_error(
        agents_stub.BatchGetAgents(agent_service_pb2.BatchGetAgentsRequest(ids=[known.id, missing]), metadata=md),
        S.NOT_FOUND,
        "AGENT_NOT_FOUND",
    )


# --- errors: authentication and roles -----------------------------------------------------------


def _all_rpcs(stub: Any, agent_id: str) -> list[tuple[str, Callable[[Any], Any]]]:
    return [
        ("GetAgent", lambda md: stub.GetAgent(agent_service_pb2.GetAgentRequest(id=agent_id), metadata=md)),
        ("ListAgents", lambda md: stub.ListAgents(agent_service_pb2.ListAgentsRequest(), metadata=md)),
        (
            "BatchGetAgents",
            lambda md: stub.BatchGetAgents(agent_service_pb2.BatchGetAgentsRequest(ids=[agent_id]), metadata=md),
        ),
        ("CreateAgent", lambda md: stub.CreateAgent(agent_service_pb2.CreateAgentRequest(agent=agent()), metadata=md)),
        (
            "UpdateAgent",
            lambda md: stub.UpdateAgent(
                update_request(agent_pb2.Agent(id=agent_id, role="hacked"), ["role"]), metadata=md
            ),
        ),
        ("DeleteAgent", lambda md: stub.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id=agent_id), metadata=md)),
    ]


async def test_missing_credentials(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(agents_stub, tenant.md())
    for name, rpc in _all_rpcs(agents_stub, created.id):
        for md in (
            None,
            (),
            (("authorization", ""),),
            (("authorization", "Bearer "),),
            (("authorization", "Basic abc"),),
            (("authorization", tenant.writer),),
        ):
            failure = await expect_error(rpc(md), S.UNAUTHENTICATED, "API_KEY_MISSING")
            assert failure.trailer("x-request-id"), name
    assert await get(agents_stub, tenant.md(), created.id) == created


def _forged_secret(real: str) -> str:
    """The same key id and tenant as `real`, with a different secret."""
    body = real[len("ask_") :]
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[-1] ^= 0xFF
    return "ask_" + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")


async def test_invalid_keys(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(agents_stub, tenant.md())
    tenant_id = uuid.UUID(tenant.tenant.id)
    bad_keys = [
        "garbage",
        "ask_garbage",
        "ask_" + "A" * 300,
        PLATFORM_TOKEN,
        new_api_key(uuid.uuid4()).secret,  # well formed, unknown tenant
        new_api_key(tenant_id).secret,  # well formed, the right tenant, unknown key id
        _forged_secret(tenant.writer),  # the writer's key id with a wrong secret
        tenant.writer[:-2],
    ]
    for key in bad_keys:
        for _, rpc in _all_rpcs(agents_stub, created.id):
            await expect_error(rpc(bearer(key)), S.UNAUTHENTICATED, "API_KEY_INVALID")
    assert await get(agents_stub, tenant.md(), created.id) == created


async def test_revoked_key_is_rejected_at_once(agents_stub, tenants_stub, tenant: TenantKeys) -> None:
    key = await tenants_stub.CreateApiKey(
        tenant_service_pb2.CreateApiKeyRequest(
            tenant_id=tenant.tenant.id, api_key=tenant_pb2.ApiKey(role=tenant_pb2.API_KEY_ROLE_WRITER)
        ),
        metadata=PLATFORM,
    )
    # Used once first, so the server has it cached.
    created = await create_agent(agents_stub, bearer(key.secret))
    await get(agents_stub, bearer(key.secret), created.id)
    await tenants_stub.RevokeApiKey(
        tenant_service_pb2.RevokeApiKeyRequest(tenant_id=tenant.tenant.id, id=key.api_key.id), metadata=PLATFORM
    )
    for _, rpc in _all_rpcs(agents_stub, created.id):
        await expect_error(rpc(bearer(key.secret)), S.UNAUTHENTICATED, "API_KEY_REVOKED")
    # Other keys of the tenant are unaffected.
    assert await get(agents_stub, tenant.md(), created.id) == created


async def test_reader_may_read_but_not_write(agents_stub, tenant: TenantKeys) -> None:
    created = await create_agent(agents_stub, tenant.md())
    reader = tenant.md("reader")
    assert await get(agents_stub, reader, created.id) == created
    listed = await agents_stub.ListAgents(agent_service_pb2.ListAgentsRequest(), metadata=reader)
    assert list(listed.agents) == [created]
    batch = await agents_stub.BatchGetAgents(agent_service_pb2.BatchGetAgentsRequest(ids=[created.id]), metadata=reader)
    assert list(batch.agents) == [created]
    await expect_error(create_agent(agents_stub, reader), S.PERMISSION_DENIED, "ROLE_FORBIDDEN")
    await expect_error(
        agents_stub.UpdateAgent(update_request(agent_pb2.Agent(id=created.id, role="x"), ["role"]), metadata=reader),
        S.PERMISSION_DENIED,
        "ROLE_FORBIDDEN",
    )
    await expect_error(
        agents_stub.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id=created.id), metadata=reader),
        S.PERMISSION_DENIED,
        "ROLE_FORBIDDEN",
    )
    # The role check comes before validation: even a nonsense request is forbidden, not invalid.
    await expect_error(
        agents_stub.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id="nonsense"), metadata=reader),
        S.PERMISSION_DENIED,
        "ROLE_FORBIDDEN",
    )
    assert ids(await list_all(agents_stub, reader)) == [created.id]
    assert await get(agents_stub, reader, created.id) == created


# --- request ids --------------------------------------------------------------------------------


async def test_request_id_is_echoed_on_success(agents_stub, tenant: TenantKeys) -> None:
    rid = f"req-{uuid.uuid4()}"
    call = agents_stub.CreateAgent(
        agent_service_pb2.CreateAgentRequest(agent=agent()), metadata=(*tenant.md(), ("x-request-id", rid))
    )
    created = await call
    assert metadata_value(await call.trailing_metadata(), "x-request-id") == rid

    call = agents_stub.GetAgent(agent_service_pb2.GetAgentRequest(id=created.id), metadata=tenant.md())
    await call
    generated = metadata_value(await call.trailing_metadata(), "x-request-id")
    assert generated and generated != rid
    call2 = agents_stub.GetAgent(agent_service_pb2.GetAgentRequest(id=created.id), metadata=tenant.md())
    await call2
    assert metadata_value(await call2.trailing_metadata(), "x-request-id") not in (None, "", generated)


async def test_request_id_is_echoed_on_error(agents_stub, tenant: TenantKeys) -> None:
    rid = f"req-{uuid.uuid4()}"
    missing = str(uuid.uuid4())
    failure = await expect_error(
        agents_stub.GetAgent(
            agent_service_pb2.GetAgentRequest(id=missing), metadata=(*tenant.md(), ("x-request-id", rid))
        ),
        S.NOT_FOUND,
        "AGENT_NOT_FOUND",
    )
    assert failure.trailer("x-request-id") == rid
    # Also when authentication fails.
    failure = await expect_error(
        agents_stub.GetAgent(agent_service_pb2.GetAgentRequest(id=missing), metadata=(("x-request-id", rid),)),
        S.UNAUTHENTICATED,
        "API_KEY_MISSING",
    )
    assert failure.trailer("x-request-id") == rid
    failure = await expect_error(
        agents_stub.GetAgent(agent_service_pb2.GetAgentRequest(id=missing), metadata=tenant.md()),
        S.NOT_FOUND,
        "AGENT_NOT_FOUND",
    )
    generated = failure.trailer("x-request-id")
    assert isinstance(generated, str) and generated and generated != rid
    failure = await expect_error(
        agents_stub.ListAgents(agent_service_pb2.ListAgentsRequest(filter="bogus = 1")),
        S.UNAUTHENTICATED,
        "API_KEY_MISSING",
    )
    assert failure.trailer("x-request-id")


# --- idempotent creates (AIP-155) ---------------------------------------------------------------


async def test_create_retry_with_request_id_returns_the_same_agent(agents_stub, tenant: TenantKeys) -> None:
    request_id = str(uuid.uuid4())
    name = unique("idem")
    first = await create_agent(agents_stub, tenant.md(), name, request_id=request_id)
    second = await create_agent(agents_stub, tenant.md(), name, request_id=request_id)
    assert second == first
    # Even when the retry's body differs, the first create's agent comes back.
    third = await create_agent(agents_stub, tenant.md(), unique("other"), request_id=request_id)
    assert third == first
    assert ids(await list_all(agents_stub, tenant.md())) == [first.id]
    # A different request_id is a different create.
    fresh = await create_agent(agents_stub, tenant.md(), unique("idem"), request_id=str(uuid.uuid4()))
    assert fresh.id != first.id


async def test_concurrent_creates_with_one_request_id(
    agents_stub, tenant: TenantKeys, database: ScratchDatabase
) -> None:
    request_id = str(uuid.uuid4())
    name = unique("race")
    results = await asyncio.gather(
        *(create_agent(agents_stub, tenant.md(), name, request_id=request_id) for _ in range(5))
    )
    assert len({r.id for r in results}) == 1
    assert all(r == results[0] for r in results)
    assert ids(await list_all(agents_stub, tenant.md())) == [results[0].id]
    con = await asyncpg.connect(database.owner_url)
    try:
        audits = await con.fetchval(
            "SELECT count(*) FROM audit_logs WHERE tenant_id = $1 AND entity_id = $2 AND action = 'agent.create'",
            uuid.UUID(tenant.tenant.id),
            results[0].id,
        )
    finally:
        await con.close()
    assert audits == 1


@pytest.mark.parametrize("request_id", ["not-a-uuid", "12345", "x" * 200])
async def test_create_with_non_uuid_request_id(agents_stub, tenant: TenantKeys, request_id: str) -> None:
    await expect_error(
        create_agent(agents_stub, tenant.md(), request_id=request_id), S.INVALID_ARGUMENT, field="request_id"
    )
    assert await list_all(agents_stub, tenant.md()) == []


# --- audit log ----------------------------------------------------------------------------------


async def _audit_rows(database: ScratchDatabase, tenant_id: str, entity_id: str) -> list[dict[str, Any]]:
    con = await asyncpg.connect(database.owner_url)
    try:
        rows = await con.fetch(
            "SELECT tenant_id, actor, actor_key_id, action, entity_type, entity_id, before, after, request_id"
            " FROM audit_logs WHERE tenant_id = $1 AND entity_id = $2 ORDER BY revision",
            uuid.UUID(tenant_id),
            entity_id,
        )
    finally:
        await con.close()
    out = []
    for row in rows:
        record = dict(row)
        for column in ("before", "after"):
            record[column] = json.loads(record[column]) if record[column] is not None else None
        out.append(record)
    return out


def _as_json(a: agent_pb2.Agent) -> dict[str, Any]:
    return json_format.MessageToDict(a, preserving_proto_field_name=True)


async def test_audit_rows_for_create_update_delete(agents_stub, tenant: TenantKeys, database: ScratchDatabase) -> None:
    rids = [f"audit-{i}-{uuid.uuid4()}" for i in range(3)]
    created = await agents_stub.CreateAgent(
        agent_service_pb2.CreateAgentRequest(agent=agent(unique("audited"), capabilities=["python"])),
        metadata=(*tenant.md(), ("x-request-id", rids[0])),
    )
    updated = await agents_stub.UpdateAgent(
        update_request(agent_pb2.Agent(id=created.id, role="audited-role"), ["role"]),
        metadata=(*tenant.md(), ("x-request-id", rids[1])),
    )
    # A failed mutation writes nothing.
    await expect_error(
        agents_stub.UpdateAgent(
            update_request(agent_pb2.Agent(id=created.id, role="nope", etag=created.etag), ["role"]),
            metadata=tenant.md(),
        ),
        S.ABORTED,
        "ETAG_MISMATCH",
    )
    await expect_error(
        agents_stub.DeleteAgent(
            agent_service_pb2.DeleteAgentRequest(id=created.id, etag=created.etag), metadata=tenant.md()
        ),
        S.ABORTED,
        "ETAG_MISMATCH",
    )
    assert len(await _audit_rows(database, tenant.tenant.id, created.id)) == 2
    await agents_stub.DeleteAgent(
        agent_service_pb2.DeleteAgentRequest(id=created.id), metadata=(*tenant.md(), ("x-request-id", rids[2]))
    )

    rows = await _audit_rows(database, tenant.tenant.id, created.id)
    assert [r["action"] for r in rows] == ["agent.create", "agent.update", "agent.delete"]
    for row, rid in zip(rows, rids, strict=True):
        assert row["tenant_id"] == uuid.UUID(tenant.tenant.id)
        assert row["actor"] == "api_key"
        assert row["actor_key_id"] == uuid.UUID(tenant.writer_key_id)
        assert row["entity_type"] == "agent"
        assert row["entity_id"] == created.id
        assert row["request_id"] == rid
    create, update, delete = rows
    assert create["before"] is None
    assert create["after"] == _as_json(created)
    assert update["before"] == _as_json(created)
    assert update["after"] == _as_json(updated)
    assert delete["before"] == _as_json(updated)
    assert delete["after"] is None


async def test_audit_records_the_acting_key(
    agents_stub, tenant: TenantKeys, tenants_stub, database: ScratchDatabase
) -> None:
    keys = await tenants_stub.ListApiKeys(
        tenant_service_pb2.ListApiKeysRequest(tenant_id=tenant.tenant.id), metadata=PLATFORM
    )
    admin_ids = [k.id for k in keys.api_keys if k.role == tenant_pb2.API_KEY_ROLE_ADMIN]
    assert len(admin_ids) == 1
    created = await create_agent(agents_stub, tenant.md("admin"))
    rows = await _audit_rows(database, tenant.tenant.id, created.id)
    assert len(rows) == 1
    assert rows[0]["actor_key_id"] == uuid.UUID(admin_ids[0])
    # Without x-request-id the generated id is recorded.
    assert rows[0]["request_id"]


async def test_rejected_creates_write_no_audit(agents_stub, tenant: TenantKeys, database: ScratchDatabase) -> None:
    await create_agent(agents_stub, tenant.md(), "one")
    await expect_error(create_agent(agents_stub, tenant.md(), "one"), S.ALREADY_EXISTS, "AGENT_NAME_TAKEN")
    await expect_error(create_agent(agents_stub, tenant.md("reader")), S.PERMISSION_DENIED, "ROLE_FORBIDDEN")
    con = await asyncpg.connect(database.owner_url)
    try:
        count = await con.fetchval(
            "SELECT count(*) FROM audit_logs WHERE tenant_id = $1 AND entity_type = 'agent'",
            uuid.UUID(tenant.tenant.id),
        )
    finally:
        await con.close()
    assert count == 1


async def test_random_mutation_sequence_matches_model(agents_stub, tenant: TenantKeys) -> None:
    """A seeded random mix of creates, updates and deletes; List always equals the model."""
    rng = random.Random(1234)
    model: dict[str, agent_pb2.Agent] = {}
    for step in range(40):
        choice = rng.random()
        if choice < 0.5 or not model:
            a = await create_agent(agents_stub, tenant.md(), f"m-{step:03d}", role=rng.choice(["x", "y"]))
            model[a.id] = a
        elif choice < 0.8:
            target = rng.choice(sorted(model))
            a = await agents_stub.UpdateAgent(
                update_request(
                    agent_pb2.Agent(id=target, role=rng.choice(["x", "y", "z"]), etag=model[target].etag), ["role"]
                ),
                metadata=tenant.md(),
            )
            model[target] = a
        else:
            target = rng.choice(sorted(model))
            await agents_stub.DeleteAgent(
                agent_service_pb2.DeleteAgentRequest(id=target, etag=model[target].etag), metadata=tenant.md()
            )
            del model[target]
    listed = await list_all(agents_stub, tenant.md(), page_size=7)
    assert {a.id: a for a in listed} == model
    for role in ("x", "y", "z"):
        got = await list_all(agents_stub, tenant.md(), filter=f"role = {role}", order_by="name desc", page_size=3)
        expected = sorted((a for a in model.values() if a.role == role), key=lambda a: a.name, reverse=True)
        assert got == expected
