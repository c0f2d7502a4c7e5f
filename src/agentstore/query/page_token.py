"""Opaque, tamper-evident page tokens.

A token is the unpadded URL-safe base64 of ``payload_json || mac`` where ``mac`` is the
first 16 bytes of HMAC-SHA256 over the length-prefixed binding followed by the payload.
The binding ties a token to the query that issued it (see ``binding_for``), so a token
replayed against another filter or order_by fails the MAC check like any forgery.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Final

__all__ = ["MAX_PAGE_TOKEN_LENGTH", "PageTokenCodec", "PageTokenError", "binding_for"]

MAX_PAGE_TOKEN_LENGTH: Final = 2048

_MAC_BYTES: Final = 16
_BASE64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*", re.ASCII)


class PageTokenError(ValueError):
    """A page token that is malformed, forged, or was issued for a different query."""


def _encode_text(text: str) -> bytes:
    # surrogatepass keeps this total: any str maps to some bytes, and distinct strs to distinct bytes.
    return text.encode("utf-8", "surrogatepass")


def binding_for(*parts: str) -> str:
    """Hash ``parts`` unambiguously: ("ab", "c") and ("a", "bc") bind differently."""
    digest = hashlib.sha256()
    for part in parts:
        data = _encode_text(part)
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


class PageTokenCodec:
    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("page token secret must not be empty")
        self._secret = bytes(secret)

    def encode(self, payload: Mapping[str, object], binding: str) -> str:
        """Seal ``payload`` (JSON-serializable) for the query identified by ``binding``.

        Raises ValueError if the payload is not JSON-serializable or the token would be
        longer than ``decode`` accepts.
        """
        try:
            data = json.dumps(
                dict(payload), separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False
            ).encode("utf-8")
        except (TypeError, UnicodeEncodeError) as exc:
            raise ValueError(f"page token payload is not JSON-serializable: {exc}") from exc
        return self._seal(data, binding)

    def decode(self, token: str, binding: str) -> dict[str, object]:
        """Verify and open ``token``; raises PageTokenError and nothing else."""
        if not isinstance(token, str):
            raise PageTokenError("page token is not a string")
        if not token:
            raise PageTokenError("page token is empty")
        if len(token) > MAX_PAGE_TOKEN_LENGTH:
            raise PageTokenError("page token is too long")
        if not _BASE64URL_RE.fullmatch(token) or len(token) % 4 == 1:
            raise PageTokenError("page token is not valid base64url")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise PageTokenError("page token is not valid base64url") from None
        # The last character may carry unused bits; requiring the canonical spelling makes every
        # character of the token significant, so no edit slips past the MAC.
        if _b64(raw) != token:
            raise PageTokenError("page token is not canonical base64url")
        if len(raw) <= _MAC_BYTES:
            raise PageTokenError("page token is truncated")
        data, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(data, binding)):
            raise PageTokenError("page token is invalid or was issued for a different query")
        try:
            payload = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise PageTokenError("page token payload is not valid JSON") from None
        if not isinstance(payload, dict):
            raise PageTokenError("page token payload is not an object")
        return payload

    def _seal(self, data: bytes, binding: str) -> str:
        token = _b64(data + self._mac(data, binding))
        if len(token) > MAX_PAGE_TOKEN_LENGTH:
            raise ValueError(f"page token would be {len(token)} characters, over {MAX_PAGE_TOKEN_LENGTH}")
        return token

    def _mac(self, data: bytes, binding: str) -> bytes:
        bound = _encode_text(binding)
        message = len(bound).to_bytes(8, "big") + bound + data
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:_MAC_BYTES]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
