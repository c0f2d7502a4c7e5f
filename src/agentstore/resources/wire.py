"""Wire bytes built by hand: a response assembled from already-serialized (cached) messages."""

from __future__ import annotations

from collections.abc import Iterable


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def repeated_message_bytes(field_number: int, payloads: Iterable[bytes]) -> bytes:
    """Wire bytes of a message whose only field is `repeated <Message> = field_number`, built from
    already-serialized elements (cached bytes are answered without decoding and re-encoding)."""
    tag = _varint((field_number << 3) | 2)
    return b"".join(tag + _varint(len(p)) + p for p in payloads)


def message_field(field_number: int, payload: bytes) -> bytes:
    """Wire bytes of one (non-repeated) message field whose value is already serialized."""
    return _varint((field_number << 3) | 2) + _varint(len(payload)) + payload


def varint_field(field_number: int, value: int) -> bytes:
    """Wire bytes of one non-negative integer field (int32, int64, uint, bool, enum); proto3 omits 0."""
    if value < 0:
        raise ValueError("negative varints are ten bytes long; not needed so far")
    return _varint(field_number << 3) + _varint(value) if value else b""
