from __future__ import annotations

import base64
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentstore.query import PageTokenCodec, PageTokenError, binding_for
from agentstore.query.page_token import MAX_PAGE_TOKEN_LENGTH

SECRET = b"0123456789abcdef0123456789abcdef"
BINDING = binding_for("tenants/t1/agents", "status = IDLE", "name desc")
PAYLOAD: dict[str, object] = {"c": ["zoë", "2026-01-01T00:00:00.000001+00:00", 7, None, True]}
ALPHABET = string.ascii_letters + string.digits + "-_"


@pytest.fixture
def codec() -> PageTokenCodec:
    return PageTokenCodec(SECRET)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unb64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def test_round_trip(codec: PageTokenCodec) -> None:
    token = codec.encode(PAYLOAD, BINDING)
    assert codec.decode(token, BINDING) == PAYLOAD


def test_token_is_urlsafe_unpadded_and_deterministic(codec: PageTokenCodec) -> None:
    token = codec.encode(PAYLOAD, BINDING)
    assert set(token) <= set(ALPHABET)
    assert token == codec.encode(dict(reversed(list(PAYLOAD.items()))), BINDING)


def test_empty_payload_round_trips(codec: PageTokenCodec) -> None:
    assert codec.decode(codec.encode({}, BINDING), BINDING) == {}


def test_wrong_binding_is_rejected(codec: PageTokenCodec) -> None:
    token = codec.encode(PAYLOAD, BINDING)
    other = binding_for("tenants/t1/agents", "status = BUSY", "name desc")
    with pytest.raises(PageTokenError):
        codec.decode(token, other)
    with pytest.raises(PageTokenError):
        codec.decode(token, "")


def test_other_secret_is_rejected(codec: PageTokenCodec) -> None:
    token = codec.encode(PAYLOAD, BINDING)
    with pytest.raises(PageTokenError):
        PageTokenCodec(b"another secret").decode(token, BINDING)


def test_every_character_substitution_is_rejected(codec: PageTokenCodec) -> None:
    token = codec.encode(PAYLOAD, BINDING)
    for i, ch in enumerate(token):
        for replacement in ALPHABET:
            if replacement == ch:
                continue
            tampered = token[:i] + replacement + token[i + 1 :]
            with pytest.raises(PageTokenError):
                codec.decode(tampered, BINDING)


def test_every_bit_flip_is_rejected(codec: PageTokenCodec) -> None:
    raw = unb64(codec.encode(PAYLOAD, BINDING))
    for i in range(len(raw)):
        for bit in range(8):
            flipped = raw[:i] + bytes([raw[i] ^ (1 << bit)]) + raw[i + 1 :]
            with pytest.raises(PageTokenError):
                codec.decode(b64(flipped), BINDING)


def test_truncation_and_extension_are_rejected(codec: PageTokenCodec) -> None:
    token = codec.encode(PAYLOAD, BINDING)
    for cut in range(len(token)):
        with pytest.raises(PageTokenError):
            codec.decode(token[:cut], BINDING)
    for extra in ["A", "AA", "AAAA", "=", "==", " ", "\n"]:
        with pytest.raises(PageTokenError):
            codec.decode(token + extra, BINDING)
        with pytest.raises(PageTokenError):
            codec.decode(extra + token, BINDING)


def test_standard_base64_alphabet_is_rejected(codec: PageTokenCodec) -> None:
    token = codec.encode({"c": ["\xff\xfe" * 40]}, BINDING)
    assert "-" in token or "_" in token
    with pytest.raises(PageTokenError):
        codec.decode(token.replace("-", "+").replace("_", "/"), BINDING)


@pytest.mark.parametrize("garbage", ["", "!", "not a token", "====", "A", "AAAA", "ä", "\x00", "a" * 5000])
def test_garbage_is_rejected(codec: PageTokenCodec, garbage: str) -> None:
    with pytest.raises(PageTokenError):
        codec.decode(garbage, BINDING)


def test_non_string_token_is_rejected(codec: PageTokenCodec) -> None:
    with pytest.raises(PageTokenError):
        codec.decode(b"abc", BINDING)  # type: ignore[arg-type]


def test_overlong_token_is_rejected_before_any_work(codec: PageTokenCodec) -> None:
    with pytest.raises(PageTokenError, match="too long"):
        codec.decode("A" * (MAX_PAGE_TOKEN_LENGTH + 1), BINDING)


@pytest.mark.parametrize("data", [b"[1, 2]", b'"s"', b"null", b"{", b"\xff\xfe", b"", b"{}x"])
def test_authentic_but_malformed_payloads_are_rejected(codec: PageTokenCodec, data: bytes) -> None:
    # Only reachable with the secret, but decode must still fail cleanly.
    token = codec._seal(data, BINDING)
    with pytest.raises(PageTokenError):
        codec.decode(token, BINDING)


def test_encode_rejects_unserializable_payloads(codec: PageTokenCodec) -> None:
    with pytest.raises(ValueError):
        codec.encode({"c": object()}, BINDING)
    with pytest.raises(ValueError):
        codec.encode({"c": float("nan")}, BINDING)


def test_encode_refuses_tokens_decode_would_reject(codec: PageTokenCodec) -> None:
    with pytest.raises(ValueError):
        codec.encode({"c": "x" * MAX_PAGE_TOKEN_LENGTH}, BINDING)


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        PageTokenCodec(b"")


def test_page_token_error_is_a_value_error() -> None:
    assert issubclass(PageTokenError, ValueError)


def test_binding_for_is_length_prefixed() -> None:
    assert binding_for("ab", "c") != binding_for("a", "bc")
    assert binding_for("a", "") != binding_for("a")
    assert binding_for("") != binding_for()
    assert binding_for("a", "b") == binding_for("a", "b")
    assert len(binding_for("x")) == 64
    assert set(binding_for("x")) <= set("0123456789abcdef")
    # Total on any str, including ones UTF-8 cannot encode.
    assert binding_for("\ud800") != binding_for("\udc00")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300), st.text(max_size=50))
def test_decode_of_any_text_raises_only_page_token_error(token: str, binding: str) -> None:
    codec = PageTokenCodec(SECRET)
    with pytest.raises(PageTokenError):
        codec.decode(token, binding)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_decode_of_any_base64_raises_only_page_token_error(raw: bytes) -> None:
    with pytest.raises(PageTokenError):
        PageTokenCodec(SECRET).decode(b64(raw), BINDING)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _JSON, max_size=4), st.text(max_size=40))
def test_round_trip_any_json_object(payload: dict[str, object], binding: str) -> None:
    codec = PageTokenCodec(SECRET)
    try:
        token = codec.encode(payload, binding)
    except ValueError:
        return  # too large for a token
    assert codec.decode(token, binding) == payload
