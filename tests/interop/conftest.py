"""The interop tests use the integration tier's live in-process server and tenants."""

from tests.integration.conftest import agents_stub, app, channel, new_tenant, tenant, tenants_stub  # noqa: F401
