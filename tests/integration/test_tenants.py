"""TenantService end to end: tenants, API keys, platform authentication, key expiry."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2

from agentstore.v1 import agent_service_pb2, tenant_pb2, tenant_service_pb2
from tests.integration.conftest import PLATFORM, PLATFORM_TOKEN, TenantKeys, bearer
from tests.integration.helpers import create_agent, expect_error, unique

S = grpc.StatusCode
READER, WRITER, ADMIN = tenant_pb2.API_KEY_ROLE_READER, tenant_pb2.API_KEY_ROLE_WRITER, tenant_pb2.API_KEY_ROLE_ADMIN


def ts(moment: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


async def create_tenant(stub, name: str, md=PLATFORM) -> tenant_pb2.Tenant:
    return await stub.CreateTenant(
        tenant_service_pb2.CreateTenantRequest(tenant=tenant_pb2.Tenant(name=name)), metadata=md
    )


async def create_key(
    stub,
    tenant_id: str,
    role: int = WRITER,
    *,
    display_name: str = "",
    expire_time: datetime | None = None,
    md=PLATFORM,
) -> tenant_service_pb2.CreateApiKeyResponse:
    spec = tenant_pb2.ApiKey(role=role, display_name=display_name)
    if expire_time is not None:
        spec.expire_time.CopyFrom(ts(expire_time))
    return await stub.CreateApiKey(
        tenant_service_pb2.CreateApiKeyRequest(tenant_id=tenant_id, api_key=spec), metadata=md
    )


async def list_keys(stub, tenant_id: str, page_size: int = 0) -> list[tenant_pb2.ApiKey]:
    keys: list[tenant_pb2.ApiKey] = []
    token = ""
    while True:
        page = await stub.ListApiKeys(
            tenant_service_pb2.ListApiKeysRequest(tenant_id=tenant_id, page_size=page_size, page_token=token),
            metadata=PLATFORM,
        )
        if page_size:
            assert len(page.api_keys) <= page_size
        keys.extend(page.api_keys)
        token = page.next_page_token
        if not token:
            return keys


# --- tenants ------------------------------------------------------------------------------------


async def test_create_and_get_tenant(tenants_stub) -> None:
    name = unique("tenant")
    created = await create_tenant(tenants_stub, name)
    assert str(uuid.UUID(created.id)) == created.id
    assert created.name == name
    assert created.HasField("create_time") and created.HasField("update_time")
    got = await tenants_stub.GetTenant(tenant_service_pb2.GetTenantRequest(id=created.id), metadata=PLATFORM)
    assert got == created


async def test_create_tenant_ignores_output_only_fields(tenants_stub) -> None:
    bogus = str(uuid.uuid4())
    created = await tenants_stub.CreateTenant(
        tenant_service_pb2.CreateTenantRequest(tenant=tenant_pb2.Tenant(id=bogus, name=unique("t"))),
        metadata=PLATFORM,
    )
    assert created.id != bogus


async def test_list_tenants_pages_by_name(tenants_stub) -> None:
    run = uuid.uuid4().hex[:10]
    # Same length and prefix, so every collation orders them alike.
    mine = {}
    for c in "cadeb":
        t = await create_tenant(tenants_stub, f"lt-{run}-{c}")
        mine[t.id] = t
    seen: list[tenant_pb2.Tenant] = []
    token = ""
    pages = 0
    while True:
        page = await tenants_stub.ListTenants(
            tenant_service_pb2.ListTenantsRequest(page_size=2, page_token=token), metadata=PLATFORM
        )
        pages += 1
        assert len(page.tenants) <= 2
        seen.extend(page.tenants)
        token = page.next_page_token
        if not token:
            break
    seen_ids = [t.id for t in seen]
    assert len(seen_ids) == len(set(seen_ids)), "a tenant was listed twice"
    assert pages >= 3
    ours = [t for t in seen if t.id in mine]
    assert [t.name for t in ours] == [f"lt-{run}-{c}" for c in "abcde"]
    assert all(t == mine[t.id] for t in ours)
    # One page holding everything agrees with the paged walk.
    everything = await tenants_stub.ListTenants(
        tenant_service_pb2.ListTenantsRequest(page_size=1000), metadata=PLATFORM
    )
    if not everything.next_page_token:
        assert [t.id for t in everything.tenants] == seen_ids


async def test_list_tenants_bad_paging(tenants_stub) -> None:
    await expect_error(
        tenants_stub.ListTenants(tenant_service_pb2.ListTenantsRequest(page_size=-1), metadata=PLATFORM),
        S.INVALID_ARGUMENT,
        "INVALID_PAGE_SIZE",
    )
    await expect_error(
        tenants_stub.ListTenants(tenant_service_pb2.ListTenantsRequest(page_token="forged"), metadata=PLATFORM),
        S.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


async def test_duplicate_tenant_name(tenants_stub) -> None:
    name = unique("dup-tenant")
    await create_tenant(tenants_stub, name)
    await expect_error(create_tenant(tenants_stub, name), S.ALREADY_EXISTS, "TENANT_NAME_TAKEN")


@pytest.mark.parametrize("name", ["", "x" * 129, "nul\x00name"])
async def test_invalid_tenant_name(tenants_stub, name: str) -> None:
    await expect_error(create_tenant(tenants_stub, name), S.INVALID_ARGUMENT, "INVALID_FIELD", field="tenant.name")


async def test_get_unknown_tenant(tenants_stub) -> None:
    await expect_error(
        tenants_stub.GetTenant(tenant_service_pb2.GetTenantRequest(id=str(uuid.uuid4())), metadata=PLATFORM),
        S.NOT_FOUND,
        "TENANT_NOT_FOUND",
    )
    await expect_error(
        tenants_stub.GetTenant(tenant_service_pb2.GetTenantRequest(id="not-a-uuid"), metadata=PLATFORM),
        S.INVALID_ARGUMENT,
        "INVALID_ID",
        field="id",
    )


# --- platform authentication --------------------------------------------------------------------


async def test_platform_token_required(tenants_stub, tenant: TenantKeys) -> None:
    tid = tenant.tenant.id
    calls = [
        lambda md: tenants_stub.CreateTenant(
            tenant_service_pb2.CreateTenantRequest(tenant=tenant_pb2.Tenant(name=unique("never"))), metadata=md
        ),
        lambda md: tenants_stub.GetTenant(tenant_service_pb2.GetTenantRequest(id=tid), metadata=md),
        lambda md: tenants_stub.ListTenants(tenant_service_pb2.ListTenantsRequest(), metadata=md),
        lambda md: tenants_stub.CreateApiKey(
            tenant_service_pb2.CreateApiKeyRequest(tenant_id=tid, api_key=tenant_pb2.ApiKey(role=ADMIN)), metadata=md
        ),
        lambda md: tenants_stub.ListApiKeys(tenant_service_pb2.ListApiKeysRequest(tenant_id=tid), metadata=md),
        lambda md: tenants_stub.RevokeApiKey(
            tenant_service_pb2.RevokeApiKeyRequest(tenant_id=tid, id=tenant.writer_key_id), metadata=md
        ),
    ]
    bad_metadata = [
        None,
        (("authorization", ""),),
        (("authorization", PLATFORM_TOKEN),),  # no scheme
        bearer("wrong-token"),
        bearer(PLATFORM_TOKEN + "x"),
        bearer(PLATFORM_TOKEN[:-1]),
        # Tenant API keys are not accepted here, whatever their role.
        tenant.md("admin"),
        tenant.md("writer"),
        tenant.md("reader"),
    ]
    for call in calls:
        for md in bad_metadata:
            await expect_error(call(md), S.UNAUTHENTICATED, "PLATFORM_TOKEN_INVALID")
    # Nothing was revoked by the rejected calls.
    keys = await list_keys(tenants_stub, tid)
    assert all(not k.HasField("revoke_time") for k in keys)
    assert len(keys) == 3


# --- API keys -----------------------------------------------------------------------------------


async def test_create_api_key_returns_secret_once(tenants_stub, agents_stub, tenant: TenantKeys) -> None:
    tid = tenant.tenant.id
    response = await create_key(tenants_stub, tid, WRITER, display_name="ci runner")
    key, secret = response.api_key, response.secret
    assert secret.startswith("ask_")
    assert key.secret_prefix and secret.startswith(key.secret_prefix)
    assert len(key.secret_prefix) < len(secret)
    assert str(uuid.UUID(key.id)) == key.id
    assert key.tenant_id == tid
    assert (key.role, key.display_name) == (WRITER, "ci runner")
    assert key.HasField("create_time")
    assert not key.HasField("revoke_time") and not key.HasField("expire_time")

    listed = await list_keys(tenants_stub, tid)
    assert key in listed
    secret_tail = secret[len(key.secret_prefix) :]
    for k in listed:
        raw = k.SerializeToString()
        assert secret.encode() not in raw and secret_tail.encode() not in raw
        assert secret_tail not in str(k)
    # The secret works.
    created = await create_agent(agents_stub, bearer(secret))
    got = await agents_stub.GetAgent(agent_service_pb2.GetAgentRequest(id=created.id), metadata=bearer(secret))
    assert got == created


async def test_each_key_gets_its_own_secret(tenants_stub, tenant: TenantKeys) -> None:
    responses = [await create_key(tenants_stub, tenant.tenant.id, READER) for _ in range(3)]
    assert len({r.secret for r in responses}) == 3
    assert len({r.api_key.id for r in responses}) == 3


async def test_list_api_keys_newest_first_and_paged(tenants_stub, new_tenant) -> None:
    fresh = await new_tenant("keys")
    extra = [await create_key(tenants_stub, fresh.tenant.id, READER, display_name=f"k{i}") for i in range(4)]
    listed = await list_keys(tenants_stub, fresh.tenant.id)
    assert len(listed) == 7
    assert all(k.tenant_id == fresh.tenant.id for k in listed)
    # Newest first: create_time descending (ties broken by id).
    times = [k.create_time.ToDatetime() for k in listed]
    assert times == sorted(times, reverse=True)
    assert [k.display_name for k in listed[:4]] == ["k3", "k2", "k1", "k0"]
    assert [k.id for k in listed[:4]] == [r.api_key.id for r in reversed(extra)]
    paged = await list_keys(tenants_stub, fresh.tenant.id, page_size=2)
    assert paged == listed
    paged = await list_keys(tenants_stub, fresh.tenant.id, page_size=1)
    assert paged == listed


async def test_list_api_keys_of_another_tenant_are_not_mixed(tenants_stub, new_tenant) -> None:
    a, b = await new_tenant("mix-a"), await new_tenant("mix-b")
    keys_a = await list_keys(tenants_stub, a.tenant.id)
    keys_b = await list_keys(tenants_stub, b.tenant.id)
    assert {k.tenant_id for k in keys_a} == {a.tenant.id}
    assert {k.tenant_id for k in keys_b} == {b.tenant.id}
    assert not {k.id for k in keys_a} & {k.id for k in keys_b}


async def test_revoke_api_key_is_idempotent(tenants_stub, agents_stub, tenant: TenantKeys) -> None:
    tid = tenant.tenant.id
    response = await create_key(tenants_stub, tid, WRITER)
    revoked = await tenants_stub.RevokeApiKey(
        tenant_service_pb2.RevokeApiKeyRequest(tenant_id=tid, id=response.api_key.id), metadata=PLATFORM
    )
    assert revoked.HasField("revoke_time")
    assert revoked.id == response.api_key.id and revoked.create_time == response.api_key.create_time
    again = await tenants_stub.RevokeApiKey(
        tenant_service_pb2.RevokeApiKeyRequest(tenant_id=tid, id=response.api_key.id), metadata=PLATFORM
    )
    assert again == revoked
    listed = {k.id: k for k in await list_keys(tenants_stub, tid)}
    assert listed[response.api_key.id] == revoked
    # Revoked and listed, but no longer usable; the tenant's other keys still are.
    await expect_error(
        agents_stub.ListAgents(agent_service_pb2.ListAgentsRequest(), metadata=bearer(response.secret)),
        S.UNAUTHENTICATED,
        "API_KEY_REVOKED",
    )
    await agents_stub.ListAgents(agent_service_pb2.ListAgentsRequest(), metadata=tenant.md())


async def test_revoke_unknown_api_key(tenants_stub, new_tenant, tenant: TenantKeys) -> None:
    await expect_error(
        tenants_stub.RevokeApiKey(
            tenant_service_pb2.RevokeApiKeyRequest(tenant_id=tenant.tenant.id, id=str(uuid.uuid4())),
            metadata=PLATFORM,
        ),
        S.NOT_FOUND,
        "API_KEY_NOT_FOUND",
    )
    # A real key id, but under another tenant.
    other = await new_tenant("other")
    await expect_error(
        tenants_stub.RevokeApiKey(
            tenant_service_pb2.RevokeApiKeyRequest(tenant_id=other.tenant.id, id=tenant.writer_key_id),
            metadata=PLATFORM,
        ),
        S.NOT_FOUND,
        "API_KEY_NOT_FOUND",
    )
    keys = {k.id: k for k in await list_keys(tenants_stub, tenant.tenant.id)}
    assert not keys[tenant.writer_key_id].HasField("revoke_time")
    await expect_error(
        tenants_stub.RevokeApiKey(
            tenant_service_pb2.RevokeApiKeyRequest(tenant_id=tenant.tenant.id, id="nope"), metadata=PLATFORM
        ),
        S.INVALID_ARGUMENT,
        "INVALID_ID",
        field="id",
    )


async def test_create_api_key_invalid_arguments(tenants_stub, tenant: TenantKeys) -> None:
    tid = tenant.tenant.id
    await expect_error(
        create_key(tenants_stub, tid, tenant_pb2.API_KEY_ROLE_UNSPECIFIED),
        S.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="api_key.role",
    )
    await expect_error(create_key(tenants_stub, tid, 42), S.INVALID_ARGUMENT, "INVALID_FIELD", field="api_key.role")
    await expect_error(
        create_key(tenants_stub, tid, WRITER, expire_time=datetime.now(UTC) - timedelta(minutes=5)),
        S.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="api_key.expire_time",
    )
    await expect_error(
        create_key(tenants_stub, tid, WRITER, display_name="d" * 129),
        S.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="api_key.display_name",
    )
    await expect_error(create_key(tenants_stub, "nope", WRITER), S.INVALID_ARGUMENT, "INVALID_ID", field="tenant_id")
    await expect_error(
        tenants_stub.ListApiKeys(tenant_service_pb2.ListApiKeysRequest(tenant_id="nope"), metadata=PLATFORM),
        S.INVALID_ARGUMENT,
        "INVALID_ID",
        field="tenant_id",
    )
    # None of the rejected requests created a key.
    assert len(await list_keys(tenants_stub, tid)) == 3


async def test_create_api_key_for_unknown_tenant(tenants_stub) -> None:
    await expect_error(create_key(tenants_stub, str(uuid.uuid4()), WRITER), S.NOT_FOUND, "TENANT_NOT_FOUND")


async def test_expired_key_is_rejected(tenants_stub, agents_stub, tenant: TenantKeys) -> None:
    expire = datetime.now(UTC) + timedelta(seconds=2)
    response = await create_key(tenants_stub, tenant.tenant.id, WRITER, expire_time=expire)
    assert response.api_key.expire_time.ToDatetime(tzinfo=UTC) == expire
    md = bearer(response.secret)
    # Use it while it is valid, so the server has it cached.
    created = await create_agent(agents_stub, md)
    # Wait (on the wall clock) until the expire time has passed.
    await asyncio.sleep((expire - datetime.now(UTC)).total_seconds() + 0.2)
    assert datetime.now(UTC) > expire
    await expect_error(
        agents_stub.GetAgent(agent_service_pb2.GetAgentRequest(id=created.id), metadata=md),
        S.UNAUTHENTICATED,
        "API_KEY_EXPIRED",
    )
    await expect_error(create_agent(agents_stub, md), S.UNAUTHENTICATED, "API_KEY_EXPIRED")
    # Listed, with its expire time.
    listed = {k.id: k for k in await list_keys(tenants_stub, tenant.tenant.id)}
    assert listed[response.api_key.id].HasField("expire_time")
