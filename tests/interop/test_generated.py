"""`make clients` output is committed and current, and compiles: TypeScript with tsc --strict, Go
with Debian's toolchain and gofmt. Go builds in GOPATH mode against Debian's grpc 1.33 and
golang/protobuf 1.5, since no Go module proxy is reachable here.

The Go checks need `make go-tools` (CI runs it); without protoc-gen-go they are skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.interop.tools import (
    NODE_BIN,
    NODE_MODULES,
    REPO,
    generate,
    go_plugins_installed,
    require_node_modules,
    run,
    tree,
)

TS_GEN = REPO / "clients" / "typescript" / "src" / "gen"
GO_GEN = REPO / "clients" / "go" / "agentstore"
GO_IMPORT_PATH = "github.com/agentstore/agentstore/gen/go"
DEBIAN_GOPATH = Path("/usr/share/gocode")

needs_go = pytest.mark.skipif(
    not (go_plugins_installed() and shutil.which("go")), reason="no Go toolchain / protoc-gen-go: `make go-tools`"
)


def compile_typescript(out_dir: Path) -> Path:
    """tsc --strict over clients/typescript/tsconfig.json into out_dir, runnable by node from there."""
    require_node_modules()
    run([str(NODE_BIN / "tsc"), "-p", "clients/typescript/tsconfig.json", "--outDir", str(out_dir)])
    (out_dir / "package.json").write_text('{"type": "module"}\n')
    (out_dir / "node_modules").symlink_to(NODE_MODULES, target_is_directory=True)
    return out_dir


def test_typescript_is_regenerated_unchanged(tmp_path: Path) -> None:
    require_node_modules()
    out = generate(tmp_path, ("protoc-gen-es",))
    fresh = tree(out / "clients" / "typescript" / "src" / "gen")
    assert fresh, "protoc-gen-es generated nothing"
    assert fresh == tree(TS_GEN), "clients/typescript/src/gen is stale: run `make clients`"


def test_typescript_compiles_with_tsc_strict(typescript_build: Path) -> None:
    out = typescript_build
    assert (out / "clients" / "typescript" / "src" / "gen" / "agentstore" / "v1" / "agent_service_pb.js").exists()


@needs_go
def test_go_is_regenerated_unchanged(tmp_path: Path) -> None:
    out = generate(tmp_path, ("protoc-gen-go", "protoc-gen-go-grpc"))
    fresh = tree(out / "clients" / "go" / "agentstore")
    assert fresh, "protoc-gen-go generated nothing"
    assert fresh == tree(GO_GEN), "clients/go is stale: run `make clients`"


def gopath_with_stubs(tmp: Path) -> dict[str, str]:
    """A GOPATH holding the committed stubs at their import path, then Debian's Go libraries."""
    package = tmp / "gopath" / "src" / GO_IMPORT_PATH / "agentstore"
    shutil.copytree(GO_GEN, package)
    return {
        **os.environ,
        "GOPATH": f"{tmp / 'gopath'}{os.pathsep}{DEBIAN_GOPATH}",
        "GO111MODULE": "off",
        "GOFLAGS": "",
        "GOCACHE": os.environ.get("GOCACHE", str(Path.home() / ".cache" / "go-build")),
    }


@needs_go
def test_go_stubs_build_and_are_gofmt_clean(tmp_path: Path) -> None:
    assert not run(["gofmt", "-l", str(GO_GEN)]).strip(), "gofmt would change the generated Go"
    env = gopath_with_stubs(tmp_path)
    run(["go", "build", f"{GO_IMPORT_PATH}/agentstore/v1"], cwd=tmp_path, env=env, timeout=600)
