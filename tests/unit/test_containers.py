"""Consistency checks for the container and deployment files.

Dockerfile, docker-compose.yml, deploy/, .env.example and agentstore.config.Settings must agree:
every AGENTSTORE_* variable set anywhere is a real Settings field, .env.example documents every
field with its default, and the images/probes/roles are wired the way the server expects.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from agentstore.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = ROOT / "deploy" / "kubernetes" / "agentstore.yaml"
INIT_SQL = ROOT / "deploy" / "postgres" / "init.sql"

PREFIX = "AGENTSTORE_"
SETTINGS_VARS = {PREFIX + name.upper() for name in Settings.model_fields}
VAR_RE = re.compile(r"\b(AGENTSTORE_[A-Z0-9_]+)")
INTERPOLATION_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+]([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


# --------------------------------------------------------------------------------------------
# helpers


def unknown_vars(names: Iterable[str]) -> list[str]:
    return sorted({n for n in names if n.startswith(PREFIX)} - SETTINGS_VARS)


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def service_environment(service: Mapping[str, Any]) -> dict[str, str | None]:
    """A service's `environment`, given as a mapping or as a list of "K=V" / "K" strings."""
    env = service.get("environment")
    if env is None:
        return {}
    if isinstance(env, Mapping):
        return {str(k): None if v is None else str(v) for k, v in env.items()}
    assert isinstance(env, list), f"environment must be a mapping or a list, got {type(env).__name__}"
    out: dict[str, str | None] = {}
    for item in env:
        key, sep, value = str(item).partition("=")
        out[key] = value if sep else None
    return out


def compose_agentstore_vars(data: Mapping[str, Any]) -> dict[str, set[str]]:
    """{service: AGENTSTORE_* keys it sets}, from every service's environment."""
    return {
        name: {k for k in service_environment(svc or {}) if k.startswith(PREFIX)}
        for name, svc in data["services"].items()
    }


def interpolate(value: str) -> str:
    """Resolve ${VAR:-default} / ${VAR-default} / ${VAR} / $VAR as compose would in a bare shell."""

    def sub(m: re.Match[str]) -> str:
        return m.group(2) or ""

    return INTERPOLATION_RE.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    """{dependency: condition}; depends_on may be a list or a mapping."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {str(d): "service_started" for d in deps}
    assert isinstance(deps, Mapping)
    return {str(k): str((v or {}).get("condition", "service_started")) for k, v in deps.items()}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)], with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and buf):
            continue  # comments (also inside continuations) and blank continuation lines
        if not line:
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per build stage (the ARGs before the first FROM are dropped)."""
    stages: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions(DOCKERFILE.read_text()):
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def stage_name(stage: list[tuple[str, str]]) -> str | None:
    parts = stage[0][1].split()
    return parts[-1] if len(parts) >= 3 and parts[-2].upper() == "AS" else None


def json_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_instruction_keys(args: str) -> list[str]:
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:
        return [tokens[0]]  # legacy `ENV KEY value`
    return [t.partition("=")[0] for t in tokens]


def dockerfile_healthcheck() -> list[str]:
    final = dockerfile_stages()[-1]
    checks = [args for kw, args in final if kw == "HEALTHCHECK"]
    assert len(checks) == 1, "the final stage needs exactly one HEALTHCHECK"
    cmd = checks[0].split("CMD", 1)
    assert len(cmd) == 2, "HEALTHCHECK must use CMD"
    return json_form(cmd[1].strip())


def env_example() -> list[tuple[str, str, int]]:
    """[(KEY, VALUE, line index)] of .env.example."""
    out = []
    for i, raw in enumerate(ENV_EXAMPLE.read_text().splitlines()):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example line {i + 1} is not KEY=VALUE: {raw!r}"
        out.append((key.strip(), value.strip(), i))
    return out


def k8s_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d is not None]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        spec = doc.get("spec", {})
        if doc.get("kind") in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
            yield doc["kind"], spec["template"]["spec"]
        elif doc.get("kind") == "CronJob":
            yield doc["kind"], spec["jobTemplate"]["spec"]["template"]["spec"]


def isolated_env(monkeypatch: pytest.MonkeyPatch, values: Mapping[str, str]) -> None:
    for key in list(os.environ):
        if key.startswith(PREFIX):
            monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)


# --------------------------------------------------------------------------------------------
# (a) docker-compose.yml only sets real Settings fields


def test_compose_agentstore_variables_are_settings_fields() -> None:
    per_service = compose_agentstore_vars(compose())
    found = set().union(*per_service.values())
    assert found, "expected AGENTSTORE_* variables in docker-compose.yml"
    bad = {svc: unknown_vars(keys) for svc, keys in per_service.items() if unknown_vars(keys)}
    assert not bad, f"not fields of agentstore.config.Settings: {bad}"


def test_compose_interpolated_agentstore_variables_are_settings_fields() -> None:
    # ${AGENTSTORE_PLATFORM_ADMIN_TOKEN:-...} is read from the host shell/.env: same name space.
    names = {m.group(1) or m.group(3) for m in INTERPOLATION_RE.finditer(COMPOSE.read_text())}
    assert unknown_vars(names) == []


@pytest.mark.parametrize("form", ["mapping", "list"])
def test_unknown_compose_variable_is_detected(form: str) -> None:
    """The check above must catch a typo whichever way `environment` is written."""
    env: Any = {"AGENTSTORE_REDIS_URL": "redis://x", "AGENTSTORE_DATABSE_URL": "postgresql://x"}
    if form == "list":
        env = [f"{k}={v}" for k, v in env.items()] + ["AGENTSTORE_NOT_A_SETTING"]
    keys = compose_agentstore_vars({"services": {"agentstore": {"environment": env}}})["agentstore"]
    expected = ["AGENTSTORE_DATABSE_URL"] + (["AGENTSTORE_NOT_A_SETTING"] if form == "list" else [])
    assert unknown_vars(keys) == expected


def test_compose_environment_values_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each service's AGENTSTORE_* values (defaults interpolated) load into Settings."""
    checked = 0
    for svc in compose()["services"].values():
        env = {k: interpolate(v) for k, v in service_environment(svc).items() if k.startswith(PREFIX) and v is not None}
        if env:
            isolated_env(monkeypatch, env)
            Settings()  # raises ValidationError on a bad value
            monkeypatch.undo()
            checked += 1
    assert checked >= 2


def test_compose_server_and_migrate_services() -> None:
    services = compose()["services"]
    server, migrate = services["agentstore"], services["migrate"]
    server_env = service_environment(server)
    for required in ("AGENTSTORE_DATABASE_URL", "AGENTSTORE_REDIS_URL"):
        assert server_env.get(required), f"`agentstore serve` needs {required}"
    assert (server_env.get("AGENTSTORE_PLATFORM_ADMIN_TOKEN") or "").startswith("${AGENTSTORE_PLATFORM_ADMIN_TOKEN"), (
        "the admin token must be overridable from the host environment"
    )
    assert interpolate(str(server_env.get("AGENTSTORE_METRICS_PORT"))) == "9090"
    assert server.get("command") in (["serve"], "serve")
    ports = {str(p).split(":")[-1] for p in server.get("ports", [])}
    assert {"50051", "9090"} <= ports
    assert server.get("stop_grace_period")
    assert depends_on(server).get("migrate") == "service_completed_successfully"
    assert depends_on(server).get("redis") == "service_healthy"

    assert migrate.get("command") == ["migrate", "apply"]
    assert migrate.get("restart") == "no", "quote it: unquoted `no` is YAML false"
    assert service_environment(migrate).get("AGENTSTORE_MIGRATIONS_DATABASE_URL")
    assert depends_on(migrate).get("postgres") == "service_healthy"
    for svc in (server, migrate):
        build = svc.get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        assert context and (ROOT / context / "Dockerfile").is_file()


def test_compose_server_role_matches_init_sql() -> None:
    """The server logs in as the LOGIN role init.sql creates, with the password it sets."""
    server_env = service_environment(compose()["services"]["agentstore"])
    url = urlsplit(interpolate(str(server_env["AGENTSTORE_DATABASE_URL"])))
    assert url.scheme.startswith("postgres")
    sql = INIT_SQL.read_text()
    assert url.username == "agentstore_server" and url.password
    assert re.search(r"CREATE ROLE agentstore_app\s+NOLOGIN", sql)
    assert re.search(
        r"CREATE ROLE agentstore_server\s+LOGIN\s+PASSWORD\s+"
        rf"'{re.escape(url.password)}'\s+IN ROLE agentstore_app",
        sql,
    )
    assert "NOBYPASSRLS" in sql and "NOSUPERUSER" in sql
    assert "IF NOT EXISTS" in sql, "role creation should be idempotent"


def test_compose_healthchecks_and_mounts() -> None:
    services = compose()["services"]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert "--appendonly" in services["redis"]["command"]
    mounts = [str(v) for v in services["postgres"].get("volumes", [])]
    init = [m for m in mounts if "/docker-entrypoint-initdb.d" in m]
    assert init, "init.sql must be mounted into /docker-entrypoint-initdb.d"
    assert (ROOT / init[0].split(":")[0]).resolve() == INIT_SQL
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = str(vol).split(":")[0]
            if src.startswith((".", "/")):
                assert (ROOT / src).exists(), f"bind mount source {src} does not exist"
    test = services["agentstore"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert test[1:] == dockerfile_healthcheck(), "compose and Dockerfile health probes differ"


# --------------------------------------------------------------------------------------------
# (b) .env.example documents exactly the Settings fields, with their defaults


def test_env_example_names_every_field_and_nothing_else() -> None:
    keys = [k for k, _, _ in env_example()]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicates, f"duplicated in .env.example: {duplicates}"
    assert sorted(SETTINGS_VARS - set(keys)) == [], "Settings fields missing from .env.example"
    assert sorted(set(keys) - SETTINGS_VARS) == [], ".env.example names unknown variables"


def test_env_example_entries_are_commented() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    for key, _, i in env_example():
        assert i > 0 and lines[i - 1].lstrip().startswith("#") and lines[i - 1].strip("# "), (
            f"{key} needs a one-line # comment directly above it"
        )


def test_env_example_values_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = {k: v for k, v, _ in env_example()}
    for key, value in entries.items():
        field = Settings.model_fields[key.removeprefix(PREFIX).lower()]
        if field.default is None:
            assert value == "", f"{key} defaults to None: leave it empty in .env.example"
        else:
            assert value != "", f"{key} has a default; write it in .env.example"
    isolated_env(monkeypatch, {k: v for k, v in entries.items() if v != ""})
    loaded = Settings()
    for name, field in Settings.model_fields.items():
        assert getattr(loaded, name) == field.get_default(call_default_factory=True), (
            f"{PREFIX}{name.upper()} in .env.example is not the default"
        )


# --------------------------------------------------------------------------------------------
# (c) Dockerfile


def test_dockerfile_is_multi_stage() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    for stage in stages:
        image = stage[0][1].split()[0]
        assert "python:3.12-slim" in image or image.startswith("${"), image
    builder_runs = " ".join(a for s in stages[:-1] for k, a in s if k == "RUN")
    assert re.search(r"pip install[^&;]*\s\.(\s|$)", builder_runs), "builder must `pip install .`"
    assert "[dev]" not in builder_runs and "--no-cache-dir" in builder_runs


def test_dockerfile_final_stage_runs_as_non_root() -> None:
    final = dockerfile_stages()[-1]
    users = [a for k, a in final if k == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0", ""}
    assert user.isdigit(), "use a numeric uid so runAsNonRoot can verify it"
    uid = int(user)
    for _, spec in pod_specs(k8s_docs()):
        assert spec["securityContext"]["runAsUser"] == uid


def test_dockerfile_final_stage_has_no_compilers() -> None:
    final = dockerfile_stages()[-1]
    compilers = re.compile(
        r"(?<![\w.-])(build-essential|gcc(-\d+)?|g\+\+(-\d+)?|clang|cpp|make|libc6?-dev|python3?-dev|"
        r"libpq-dev|cython)(?![\w.-])"
    )
    for kw, args in final:
        if kw == "RUN":
            assert not compilers.search(args), f"compiler in the runtime stage: RUN {args}"


def test_dockerfile_final_stage_copies_only_venv_and_migrations() -> None:
    stages = dockerfile_stages()
    earlier = {stage_name(s) for s in stages[:-1]} | {str(i) for i in range(len(stages) - 1)}
    final = stages[-1]
    assert not [a for k, a in final if k == "ADD"]
    copies = [a.split() for k, a in final if k == "COPY"]
    assert copies
    for parts in copies:
        flags = [p for p in parts if p.startswith("--")]
        sources = [p for p in parts if not p.startswith("--")][:-1]
        from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        if from_stage is not None:
            assert from_stage in earlier
            assert all("venv" in s for s in sources), f"copy only the venv from {from_stage}: {parts}"
        else:
            assert sources == ["migrations"], f"only migrations/ comes from the context: {parts}"


def test_dockerfile_entrypoint_cmd_env_expose() -> None:
    final = dockerfile_stages()[-1]
    entry = [a for k, a in final if k == "ENTRYPOINT"]
    assert entry and json_form(entry[-1]) == ["agentstore"]
    cmd = [a for k, a in final if k == "CMD"]
    assert cmd and json_form(cmd[-1]) == ["serve"]
    env_keys = [key for k, a in final if k == "ENV" for key in env_instruction_keys(a)]
    assert {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "AGENTSTORE_MIGRATIONS_DIR"} <= set(env_keys)
    all_env = [key for stage in dockerfile_stages() for k, a in stage if k == "ENV" for key in env_instruction_keys(a)]
    assert unknown_vars(all_env) == []
    assert any(k == "EXPOSE" and "50051" in a.split() for k, a in final)


def test_dockerignore_excludes_local_state() -> None:
    lines = [p.strip() for p in DOCKERIGNORE.read_text().splitlines()]
    patterns = {p for p in lines if p and not p.startswith("#")}
    for required in (".venv", ".git", ".agentstore", "bench/results"):
        assert required in patterns
    assert any("__pycache__" in p for p in patterns)
    assert any(".pytest_cache" in p for p in patterns)


def test_healthcheck_probe_compiles() -> None:
    cmd = dockerfile_healthcheck()
    assert cmd[:2] == ["python", "-c"]
    compile(cmd[2], "<healthcheck>", "exec")
    assert "grpc_health.v1" in cmd[2] and "readiness" in cmd[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_healthcheck_probe_against_a_health_server() -> None:
    """The probe exits 0 only when 'readiness' is SERVING, and follows AGENTSTORE_LISTEN_ADDRESS."""
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    code = dockerfile_healthcheck()[2]
    port = _free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    env = {**os.environ, "AGENTSTORE_LISTEN_ADDRESS": f"0.0.0.0:{port}"}

    def probe() -> int:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30).returncode

    try:
        servicer.set("readiness", health_pb2.HealthCheckResponse.SERVING)
        assert probe() == 0
        servicer.set("readiness", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe() != 0
    finally:
        server.stop(None)
    assert probe() != 0  # nothing listening


# --------------------------------------------------------------------------------------------
# (d) Kubernetes


def test_k8s_manifests_parse_and_use_grpc_probes() -> None:
    docs = k8s_docs()
    kinds = [d.get("kind") for d in docs]
    assert {"Deployment", "Service", "Job"} <= set(kinds)
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    assert deploy["spec"]["replicas"] == 2
    pod = deploy["spec"]["template"]["spec"]
    assert pod.get("terminationGracePeriodSeconds")
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness"}
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "readiness"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container.get("args") == ["serve"]


def test_k8s_env_uses_settings_fields_and_secrets() -> None:
    docs = k8s_docs()
    for kind, spec in pod_specs(docs):
        for container in spec["containers"]:
            names = [e["name"] for e in container.get("env", [])]
            assert unknown_vars(names) == [], f"{kind}/{container['name']}"
            for e in container.get("env", []):
                if e["name"].endswith(("_URL", "_TOKEN", "_SECRET")):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{e['name']} must come from a Secret"
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    deploy_env = {e["name"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"AGENTSTORE_DATABASE_URL", "AGENTSTORE_REDIS_URL"} <= deploy_env


def test_k8s_service_and_migration_job() -> None:
    docs = k8s_docs()
    service = next(d for d in docs if d["kind"] == "Service")
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == 50051 and grpc_port["appProtocol"] == "grpc"
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    job = next(d for d in docs if d["kind"] == "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert [*container.get("command", []), *container.get("args", [])][-2:] == ["migrate", "apply"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}


# --------------------------------------------------------------------------------------------
# (e) compose depends_on


def test_compose_depends_on_existing_services() -> None:
    services = compose()["services"]
    allowed = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in services.items():
        for dep, condition in depends_on(svc).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert dep != name
            assert condition in allowed, f"{name} -> {dep}: bad condition {condition}"
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), f"{dep} has no healthcheck for {name}"


def test_compose_depends_on_has_no_cycle() -> None:
    services = compose()["services"]
    state: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert state.get(name) != 1, f"depends_on cycle: {' -> '.join((*path, name))}"
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in depends_on(services[name]):
            if dep in services:
                visit(dep, (*path, name))
        state[name] = 2

    for name in services:
        visit(name, ())
