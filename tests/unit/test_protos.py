"""The .proto files, the checked-in stubs and the API documentation stay in step.

* Regenerating the stubs the way `make protos` does (its pinned protoc, in .venv/protoc) gives
  byte-identical files: stale generated code fails here, and so does code from another protoc,
  whose gencode would move the protobuf floor.
* The .proto copies that the client wheel carries equal protos/.
* `buf lint` passes.
* Every rpc documents, in its leading comment, the error statuses it answers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
PROTO_DIR = PROTO_ROOT / "agentstore" / "v1"
STUB_DIR = REPO / "clients" / "python" / "src" / "agentstore" / "v1"
BIN = Path(sys.executable).parent
# `make venv` builds protoc's own venv inside the dev venv (Makefile PROTOC_ENV).
PROTOC_PYTHON = BIN.parent / "protoc" / "bin" / "python"

STATUS_WORDS = (
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)

# `rpc Name(` preceded by a block of `//` comment lines (blank comment lines included).
_RPC = re.compile(r"((?:[ \t]*//[^\n]*\n)*)[ \t]*rpc\s+(\w+)\s*\(")


def _protos() -> list[Path]:
    found = sorted(PROTO_DIR.glob("*.proto"))
    assert found, f"no .proto files in {PROTO_DIR}"
    return found


def _generated_name(path: Path) -> bool:
    return re.fullmatch(r".+_pb2(_grpc)?\.pyi?", path.name) is not None


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    assert PROTOC_PYTHON.exists(), f"no protoc venv at {PROTOC_PYTHON.parent.parent}: run `make venv`"
    # protoc-gen-mypy and protoc-gen-mypy_grpc come from the dev venv.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [
        str(PROTOC_PYTHON),
        "-m",
        "grpc_tools.protoc",
        "-I",
        "protos",
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        f"--mypy_out={tmp_path}",
        f"--mypy_grpc_out={tmp_path}",
        *(str(p.relative_to(REPO)) for p in _protos()),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}\n{result.stderr}"

    out_dir = tmp_path / "agentstore" / "v1"
    fresh = {p.name: p for p in out_dir.iterdir() if _generated_name(p)}
    checked_in = {p.name: p for p in STUB_DIR.iterdir() if _generated_name(p)}
    # Four outputs per .proto: _pb2.py, _pb2.pyi, _pb2_grpc.py, _pb2_grpc.pyi.
    assert len(fresh) == 4 * len(_protos())
    assert sorted(checked_in) == sorted(fresh), (
        f"the set of generated files differs from {STUB_DIR.relative_to(REPO)}; run `make protos` "
        "(and delete stubs of removed .proto files)"
    )
    stale = [name for name in sorted(fresh) if fresh[name].read_bytes() != checked_in[name].read_bytes()]
    assert not stale, f"stale generated code, run `make protos`: {stale}"


def test_client_package_carries_the_protos() -> None:
    copies = {p.name: p.read_bytes() for p in STUB_DIR.glob("*.proto")}
    sources = {p.name: p.read_bytes() for p in _protos()}
    assert copies == sources, "the .proto copies beside the stubs differ from protos/; run `make protos`"


def test_buf_lint_passes(tmp_path: Path) -> None:
    buf = BIN / "buf"
    if not buf.exists():  # pragma: no cover - the dev extra installs it
        pytest.fail(f"buf is not installed next to {sys.executable}")
    env = {**os.environ, "BUF_CACHE_DIR": str(tmp_path / "buf-cache")}
    result = subprocess.run([str(buf), "lint"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"buf lint failed:\n{result.stdout}\n{result.stderr}"


def _rpcs_with_comments(text: str) -> list[tuple[str, str]]:
    return [(m.group(2), m.group(1)) for m in _RPC.finditer(text)]


def test_comment_parser_sees_leading_comments() -> None:
    sample = (
        "service S {\n"
        "  // Does a.\n"
        "  //\n"
        "  // Returns NOT_FOUND.\n"
        "  rpc A(R) returns (R);\n"
        "\n"
        "  rpc B(R) returns (R);\n"
        "}\n"
    )
    found = dict(_rpcs_with_comments(sample))
    assert set(found) == {"A", "B"}
    assert "NOT_FOUND" in found["A"]
    assert found["B"].strip() == ""


SERVICE_PROTOS = sorted(PROTO_DIR.glob("*_service.proto"))


def test_there_are_service_protos() -> None:
    assert [p.name for p in SERVICE_PROTOS] == [
        "achievement_service.proto",
        "agent_service.proto",
        "audit_log_service.proto",
        "session_service.proto",
        "task_service.proto",
        "tenant_service.proto",
    ]


@pytest.mark.parametrize("proto", SERVICE_PROTOS, ids=lambda p: p.name)
def test_every_rpc_documents_its_error_statuses(proto: Path) -> None:
    text = proto.read_text()
    rpcs = _rpcs_with_comments(text)
    declared = re.findall(r"^\s*rpc\s+(\w+)", text, flags=re.MULTILINE)
    assert declared, f"{proto.name} declares no rpc"
    # The parser found every rpc, so none escapes the check below.
    assert [name for name, _ in rpcs] == declared
    undocumented = [
        name for name, comment in rpcs if not any(re.search(rf"\b{word}\b", comment) for word in STATUS_WORDS)
    ]
    assert not undocumented, f"{proto.name}: rpcs whose comment names no status code: {undocumented}"
