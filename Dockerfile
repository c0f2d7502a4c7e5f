# syntax=docker/dockerfile:1
#
# agentstore container image.
#
#   docker build -t agentstore .
#   docker run --rm -e AGENTSTORE_DATABASE_URL=... -e AGENTSTORE_REDIS_URL=... -p 50051:50051 agentstore
#   docker run --rm -e AGENTSTORE_MIGRATIONS_DATABASE_URL=... agentstore migrate apply
#
# Stage 1 builds the project and its runtime dependencies (no dev extras) into a virtualenv;
# stage 2 copies only that virtualenv and the SQL migrations onto a clean slim image.

ARG PYTHON_IMAGE=python:3.12-slim

############################################################################
# builder
############################################################################
FROM ${PYTHON_IMAGE} AS builder

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Every runtime dependency (grpcio, asyncpg, uvloop, psycopg2-binary, ...) ships manylinux
# wheels for CPython 3.12 on amd64 and arm64, so no compiler is needed even here. If you build
# for a platform without wheels, install build-essential in THIS stage only.
RUN python -m venv "$VIRTUAL_ENV"

WORKDIR /src
# README.md* : the glob keeps the build working before README.md exists (pyproject names it).
COPY pyproject.toml README.md* ./
COPY src ./src
# The server depends on agentstore-client (the stubs), which lives in this repo, not on PyPI yet.
COPY clients/python ./clients/python
# pip precompiles .pyc at install time; they are kept, since the runtime user cannot write
# them (and PYTHONDONTWRITEBYTECODE stops it trying) on a read-only root filesystem.
RUN pip install --no-cache-dir ./clients/python .

############################################################################
# runtime
############################################################################
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="agentstore" \
      org.opencontainers.image.description="asyncio gRPC data-access service over PostgreSQL and Redis" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    AGENTSTORE_MIGRATIONS_DIR=/app/migrations

# Fixed, non-root uid/gid so Kubernetes' runAsNonRoot can verify it numerically.
RUN groupadd --system --gid 10001 agentstore \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
            --shell /usr/sbin/nologin agentstore

WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
COPY migrations /app/migrations

USER 10001:10001

EXPOSE 50051

# gRPC health check (grpc.health.v1, service "readiness") via the grpcio-health-checking
# runtime dependency; follows the port of AGENTSTORE_LISTEN_ADDRESS. Exit 0 only when SERVING.
# docker-compose.yml uses the identical command (tests/unit/test_containers.py checks that).
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os,sys,grpc;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;p=os.environ.get('AGENTSTORE_LISTEN_ADDRESS','0.0.0.0:50051').rsplit(':',1)[1];r=g.HealthStub(grpc.insecure_channel('127.0.0.1:'+p)).Check(h.HealthCheckRequest(service='readiness'),timeout=3);sys.exit(r.status!=h.HealthCheckResponse.SERVING)"]

ENTRYPOINT ["agentstore"]
CMD ["serve"]
