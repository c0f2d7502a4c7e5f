"""API key parsing: exactly one spelling per key (pure logic)."""

from __future__ import annotations

import base64
import uuid

import pytest

from agentstore.auth import KEY_PREFIX, new_api_key, parse_api_key

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def other_spellings(token: str) -> list[str]:
    """Spellings base64 decoding maps to the same bytes: another final character (its unused low
    bits), junk inside, padding."""
    body = token[len(KEY_PREFIX) :]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    same_bytes = []
    for char in ALPHABET:
        candidate = body[:-1] + char
        if candidate != body and base64.urlsafe_b64decode(candidate + "=" * (-len(candidate) % 4)) == raw:
            same_bytes.append(KEY_PREFIX + candidate)
    junk = [KEY_PREFIX + body[:10] + j + body[10:] for j in ("!", ".", "*", "\\n", "~")]
    padded = [token + "=", token + "==", token + "==="]
    return same_bytes + junk + padded


def test_a_key_parses_in_its_one_spelling_only() -> None:
    tenant = uuid.uuid4()
    key = new_api_key(tenant)
    parsed = parse_api_key(key.secret)
    assert parsed is not None and parsed.key_id == key.key_id and parsed.tenant_id == tenant
    variants = other_spellings(key.secret)
    assert len(variants) >= 15  # the final character alone has 15 alternatives here
    accepted = [v for v in variants if parse_api_key(v) is not None]
    assert accepted == []


@pytest.mark.parametrize("token", ["", KEY_PREFIX, "ask", KEY_PREFIX + "A" * 85, KEY_PREFIX + "=" * 10, "Bearer x"])
def test_malformed_keys_do_not_parse(token: str) -> None:
    assert parse_api_key(token) is None
