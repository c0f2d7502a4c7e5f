"""The packaging tests call the integration tier's live in-process server."""

from tests.integration.conftest import agents_stub, app, channel, new_tenant, tenant, tenants_stub  # noqa: F401
