"""The interop workflow through the generated TypeScript client (connect-es over gRPC), compiled
with tsc --strict together with the generated code, against a live server."""

from __future__ import annotations

from pathlib import Path

from agentstore.server import App
from tests.integration.conftest import TenantKeys
from tests.interop.test_node import check_workflow, run_workflow


async def test_typescript_workflow(app: App, tenant: TenantKeys, typescript_build: Path) -> None:
    workflow = typescript_build / "tests" / "interop" / "typescript" / "workflow.mjs"
    check_workflow(await run_workflow(app, tenant, "node", str(workflow)))
