"""Paths and runners shared by the interop tests: buf, npm packages, Node, Go."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUF = BIN / "buf"
NODE_MODULES = REPO / "node_modules"
NODE_BIN = NODE_MODULES / ".bin"
TEMPLATES = (REPO / "buf.gen.yaml", REPO / "clients" / "third_party" / "buf.gen.yaml")
GO_PLUGINS = ("protoc-gen-go", "protoc-gen-go-grpc")


def tool_env(tmp: Path) -> dict[str, str]:
    """PATH with the npm binaries first; buf's cache in `tmp`."""
    return {
        **os.environ,
        "PATH": f"{NODE_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "BUF_CACHE_DIR": str(tmp / "buf-cache"),
    }


def run(argv: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def require_node_modules() -> None:
    assert (NODE_BIN / "protoc-gen-es").exists(), f"no npm packages in {NODE_MODULES}: run `make node` (npm ci)"


def generate(tmp: Path, plugins: tuple[str, ...]) -> Path:
    """Run the repo's buf.gen.yaml templates, keeping only `plugins`, with outputs under tmp/out."""
    out = tmp / "out"
    for template_path in TEMPLATES:
        template = yaml.safe_load(template_path.read_text())
        template["plugins"] = [p for p in template["plugins"] if p["local"] in plugins]
        if template["plugins"]:
            run([str(BUF), "generate", "--template", json.dumps(template), "-o", str(out)], env=tool_env(tmp))
    return out


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def go_plugins_installed() -> bool:
    return all(shutil.which(p) for p in GO_PLUGINS)
