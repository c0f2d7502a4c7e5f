"""API keys → Principal, and the platform admin token for TenantService.

A key reads `ask_<base64url(key id | tenant id | 256-bit secret)>`. Carrying the ids lets the
server find the key by primary key inside the key's own tenant (row-level security stays on for
the lookup), and only SHA-256 of the secret is stored. The secret is 256 random bits, so a slow
password hash would add latency without adding safety.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from agentstore.cache.lru import TtlLru
from agentstore.config import Settings
from agentstore.context import Principal, Role
from agentstore.db import Database, Record
from agentstore.errors import permission_denied, unauthenticated
from agentstore.redis.bus import ProcessBus, Subscriber

KEY_PREFIX = "ask_"
_SECRET_BYTES = 32
_RAW_LEN = 16 + 16 + _SECRET_BYTES
# The displayable start of a key: the prefix and the first characters of its key id.
DISPLAY_PREFIX_LEN = len(KEY_PREFIX) + 8

ROLE_NAMES: dict[str, Role] = {"reader": Role.READER, "writer": Role.WRITER, "admin": Role.ADMIN}
ROLE_DB_NAMES: dict[Role, str] = {v: k for k, v in ROLE_NAMES.items()}

# RPC name prefixes that only read; every other RPC needs a writer key (deny by default).
_READ_VERBS = ("Get", "List", "BatchGet", "Search", "Watch")

# All tenant-scoped reads of the platform admin pseudo-principal use the nil tenant.
PLATFORM_PRINCIPAL = Principal(tenant_id=uuid.UUID(int=0), key_id=None, role=Role.ADMIN, platform_admin=True)

_BUS_KIND = "api_key"

# One round trip: the function sets the key's tenant for its statement, then selects (migration 0005).
GET_API_KEY = "SELECT role, secret_hash, expire_time, revoke_time FROM agentstore_read_api_key($1, $2)"


@dataclass(frozen=True)
class NewApiKey:
    key_id: uuid.UUID
    secret: str
    secret_hash: bytes
    secret_prefix: str


@dataclass(frozen=True)
class ParsedKey:
    key_id: uuid.UUID
    tenant_id: uuid.UUID
    secret_hash: bytes


def new_api_key(tenant_id: uuid.UUID) -> NewApiKey:
    key_id = uuid.uuid4()
    raw_secret = secrets.token_bytes(_SECRET_BYTES)
    token = KEY_PREFIX + base64.urlsafe_b64encode(key_id.bytes + tenant_id.bytes + raw_secret).decode().rstrip("=")
    return NewApiKey(key_id, token, hashlib.sha256(raw_secret).digest(), token[:DISPLAY_PREFIX_LEN])


def parse_api_key(token: str) -> ParsedKey | None:
    if not token.startswith(KEY_PREFIX) or len(token) > 200:
        return None
    body = token[len(KEY_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        return None
    # Exactly one spelling per key: base64 decoding also takes junk characters, padding and other
    # final characters, and every such spelling would miss the key cache (a database lookup each).
    if len(raw) != _RAW_LEN or base64.urlsafe_b64encode(raw).decode().rstrip("=") != body:
        return None
    return ParsedKey(uuid.UUID(bytes=raw[:16]), uuid.UUID(bytes=raw[16:32]), hashlib.sha256(raw[32:]).digest())


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def required_role(rpc_name: str) -> Role:
    return Role.READER if rpc_name.startswith(_READ_VERBS) else Role.WRITER


def check_role(principal: Principal, rpc_name: str, needed: Role | None = None) -> None:
    """PERMISSION_DENIED unless the principal's role suffices; `needed`: required_role(rpc_name),
    if the caller computed it ahead (the interceptor does, once per method)."""
    if needed is None:
        needed = required_role(rpc_name)
    if principal.role < needed:
        raise permission_denied(
            "ROLE_FORBIDDEN",
            f"{rpc_name} needs a {ROLE_DB_NAMES[needed]} key; this key is a {ROLE_DB_NAMES[principal.role]} key",
        )


class Authenticator:
    """Resolves API keys to principals, with a short in-process cache.

    Cache entries live `auth_cache_ttl_seconds` (default 5 s): a key revoked through another
    server process stops working there within that time; in this process at once.
    """

    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        token = settings.platform_admin_token
        self._platform_token = token.get_secret_value().encode() if token else None
        self._bus: ProcessBus | None = None
        ttl = settings.auth_cache_ttl_seconds
        # Keyed by the SHA-256 of the whole key: nothing guessable, nothing secret in memory twice.
        self._cache: TtlLru[bytes, tuple[Principal, datetime | None]] | None = (
            TtlLru(maxsize=10_000, ttl=ttl) if ttl > 0 else None
        )

    def cached(self, authorization: str | None) -> Principal | None:
        """The principal of a key found in the cache (and not expired), else None.

        A plain function, so that a cache hit (nearly every RPC) costs no coroutine; on None
        the caller awaits `authenticate`, which also reports what is wrong with the key.
        """
        token = bearer_token(authorization)
        return self._lookup(token) if token is not None else None

    def _lookup(self, token: str) -> Principal | None:
        if self._cache is None:
            return None
        cached = self._cache.get(hashlib.sha256(token.encode()).digest())
        if cached is not None:
            principal, expire_time = cached
            if expire_time is None or expire_time > datetime.now(UTC):
                return principal
        return None

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if token is None:
            raise unauthenticated("API_KEY_MISSING", "send `authorization: Bearer <api key>` metadata")
        principal = self._lookup(token)
        if principal is not None:
            return principal
        parsed = parse_api_key(token)
        if parsed is None:
            raise unauthenticated("API_KEY_INVALID", "the API key is not valid")

        rows = await self._db.read(GET_API_KEY, parsed.tenant_id, parsed.key_id)
        row = rows[0] if rows else None
        principal, expire_time = _principal_from_row(parsed, row)
        if self._cache is not None:
            self._cache[hashlib.sha256(token.encode()).digest()] = (principal, expire_time)
        return principal

    def attach_bus(self, bus: ProcessBus) -> None:
        """Revocations then reach every server process, not only this one."""
        self._bus = bus
        bus.subscribe(_BUS_KIND, Subscriber(on_message=self._forget_key_text, on_resync=self.clear))

    async def revoked(self, key_id: uuid.UUID) -> None:
        self.forget_key(key_id)
        if self._bus is not None:
            await self._bus.publish(_BUS_KIND, str(key_id))

    def forget_key(self, key_id: uuid.UUID) -> None:
        """Drop cached principals of a key, e.g. right after it was revoked."""
        if self._cache is None:
            return
        for k, (principal, _) in self._cache.items():
            if principal.key_id == key_id:
                self._cache.pop(k)

    def _forget_key_text(self, key: str) -> None:
        try:
            self.forget_key(uuid.UUID(key))
        except ValueError:
            pass

    def clear(self) -> None:
        if self._cache is not None:
            self._cache.clear()

    def authenticate_platform(self, authorization: str | None) -> Principal:
        if self._platform_token is None:
            raise permission_denied(
                "PLATFORM_ADMIN_DISABLED", "tenant administration is off: AGENTSTORE_PLATFORM_ADMIN_TOKEN is unset"
            )
        token = bearer_token(authorization)
        if token is None or not hmac.compare_digest(token.encode(), self._platform_token):
            raise unauthenticated("PLATFORM_TOKEN_INVALID", "send `authorization: Bearer <platform admin token>`")
        return PLATFORM_PRINCIPAL


def _principal_from_row(parsed: ParsedKey, row: Record | None) -> tuple[Principal, datetime | None]:
    if row is None or not hmac.compare_digest(bytes(row["secret_hash"]), parsed.secret_hash):
        raise unauthenticated("API_KEY_INVALID", "the API key is not valid")
    if row["revoke_time"] is not None:
        raise unauthenticated("API_KEY_REVOKED", "the API key was revoked")
    expire_time: datetime | None = row["expire_time"]
    if expire_time is not None and expire_time <= datetime.now(UTC):
        raise unauthenticated("API_KEY_EXPIRED", "the API key has expired")
    principal = Principal(tenant_id=parsed.tenant_id, key_id=parsed.key_id, role=ROLE_NAMES[row["role"]])
    return principal, expire_time


__all__ = ["Authenticator", "NewApiKey", "check_role", "new_api_key", "parse_api_key"]
