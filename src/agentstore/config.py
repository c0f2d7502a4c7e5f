"""One Settings object, read from AGENTSTORE_* environment variables and validated at start."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal, NoReturn

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

PositiveFloat = Annotated[float, Field(gt=0)]


class Settings(BaseSettings):
    """Every knob of the server. Documented, with defaults, in .env.example and README.md."""

    model_config = SettingsConfigDict(env_prefix="AGENTSTORE_", extra="ignore", frozen=True, env_ignore_empty=True)

    # Connections. The server connects as an application role that owns no table and has no
    # BYPASSRLS; migrations connect as the owner (MIGRATIONS_DATABASE_URL, else DATABASE_URL).
    database_url: str | None = None
    migrations_database_url: str | None = None
    redis_url: str | None = None
    redis_key_prefix: str = "agentstore:"

    # gRPC server.
    listen_address: str = "0.0.0.0:50051"
    reflection_enabled: bool = True
    max_receive_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # The largest request of any RPC but the batches (which take up to max_receive_message_bytes):
    # bigger ones are refused before they are parsed (RESOURCE_EXHAUSTED, REQUEST_TOO_LARGE).
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_send_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    health_probe_interval_seconds: PositiveFloat = 2.0
    # How often expired task leases go back to the queue (0 disables the sweeper).
    lease_sweep_interval_seconds: float = Field(default=1.0, ge=0)

    # Database access.
    db_pool_min_size: int = Field(default=2, ge=0)
    db_pool_max_size: int = Field(default=10, ge=1)
    db_pool_acquire_timeout_seconds: PositiveFloat = 2.0
    db_statement_timeout_seconds: PositiveFloat = 5.0
    # 0 disables asyncpg's prepared-statement cache (needed behind PgBouncer in transaction
    # mode before PgBouncer 1.21).
    db_statement_cache_size: int = Field(default=1024, ge=0)
    db_max_retries: int = Field(default=3, ge=0)

    # Auth.
    platform_admin_token: SecretStr | None = None
    auth_cache_ttl_seconds: float = Field(default=5.0, ge=0)
    # Signs page tokens. Set the same value on every replica; when unset, a random
    # per-process secret is used and page tokens do not survive a restart.
    page_token_secret: SecretStr | None = None

    # Read cache. L1 is per process (0 entries disables it); L2 is Redis (TTL 0 disables it).
    cache_l1_max_entries: int = Field(default=10_000, ge=0)
    cache_l1_ttl_seconds: float = Field(default=60.0, ge=0)
    cache_l2_ttl_seconds: float = Field(default=600.0, ge=0)
    # A process trusts its cache tiers only for this long after proving it missed no invalidation;
    # a write whose invalidation Redis did not confirm waits this long before it answers.
    cache_lease_seconds: PositiveFloat = 1.0
    # How often each process reads the pending cache repairs from PostgreSQL (well under the lease).
    cache_repair_poll_seconds: PositiveFloat = 0.1
    # Every Redis command gives up after this long; the RPC then goes to PostgreSQL.
    redis_timeout_seconds: PositiveFloat = 0.05
    # Seconds between runs of the job deleting expired sessions (invisible from expire_time on); 0: off.
    session_purge_interval_seconds: float = Field(default=60.0, ge=0)

    # Observability.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = True
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # Host /metrics listens on; unset: the host of AGENTSTORE_LISTEN_ADDRESS.
    metrics_host: str | None = None

    # Files.
    migrations_dir: Path | None = None
    dev_data_dir: Path = Path(".agentstore")


def load_settings(**overrides: object) -> Settings:
    """Read the settings, or print one line naming the bad variable and exit 2."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        fail_config(exc)


def fail_config(exc: ValidationError) -> NoReturn:
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else "?"
    name = "AGENTSTORE_" + field.upper()
    print(f"agentstore: invalid {name}: {err['msg']}", file=sys.stderr)
    raise SystemExit(2)
