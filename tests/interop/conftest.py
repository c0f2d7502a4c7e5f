"""The interop tests use the integration tier's live in-process server and tenants."""

from pathlib import Path

import pytest

from tests.integration.conftest import agents_stub, app, channel, new_tenant, tenant, tenants_stub  # noqa: F401
from tests.interop.test_generated import compile_typescript


@pytest.fixture(scope="session")
def typescript_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/typescript/tsconfig.json compiled once (tsc --strict), runnable by node."""
    return compile_typescript(tmp_path_factory.mktemp("typescript") / "js")
