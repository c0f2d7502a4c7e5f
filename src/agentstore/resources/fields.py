"""Request fields shared by every resource: ids, etags, text, timestamps and Structs, validated."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from agentstore.errors import invalid_argument, invalid_field

MAX_BATCH_IDS = 1000
MAX_STRUCT_BYTES = 64 * 1024
# A Struct's wire form is at most 3 times its JSON (the worst case: empty keys with numbers, 15
# wire bytes for the 5 of `"":1,`): one over this many wire bytes cannot fit in MAX_STRUCT_BYTES.
_MAX_STRUCT_WIRE_BYTES = 4 * MAX_STRUCT_BYTES


def parse_id(value: str, field: str = "id") -> uuid.UUID:
    """A client-supplied UUID, or INVALID_ARGUMENT (INVALID_ID) naming the field."""
    try:
        if len(value) > 64:
            raise ValueError
        return uuid.UUID(value)
    except ValueError:
        raise invalid_argument("INVALID_ID", f"{field} must be a UUID", [(field, "must be a UUID")]) from None


def etag_of(version: int) -> str:
    return f'"{version}"'


def etag_matches(etag: str, version: int) -> bool:
    """An empty etag means unconditional; anything else must equal the stored version's."""
    return not etag or etag == etag_of(version)


def to_timestamp(value: datetime | None, target: timestamp_pb2.Timestamp) -> None:
    if value is not None:
        target.FromDatetime(value)


def from_timestamp(ts: timestamp_pb2.Timestamp, field: str) -> datetime:
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise invalid_field(field, "timestamp out of range") from None


def check_text(value: str, field: str, *, max_len: int, required: bool = False) -> None:
    if required and not value:
        raise invalid_field(field, "is required")
    if len(value) > max_len:
        raise invalid_field(field, f"must be at most {max_len} characters")
    if "\x00" in value:
        raise invalid_field(field, "must not contain NUL characters")


def struct_to_json(value: struct_pb2.Struct, field: str) -> str:
    """Struct → JSON text for a jsonb column, rejecting what PostgreSQL would refuse.

    A Struct far over the limit is refused by its wire size first (computed in C), before the
    conversion, which runs in Python and costs about a microsecond per key.
    """
    if value.ByteSize() > _MAX_STRUCT_WIRE_BYTES:
        raise invalid_field(field, f"must be at most {MAX_STRUCT_BYTES} bytes as JSON")
    try:
        text = json.dumps(json_format.MessageToDict(value), allow_nan=False, separators=(",", ":"))
    except ValueError:
        raise invalid_field(field, "numbers must be finite") from None
    if len(text) > MAX_STRUCT_BYTES:
        raise invalid_field(field, f"must be at most {MAX_STRUCT_BYTES} bytes as JSON")
    if "\\u0000" in text:
        raise invalid_field(field, "must not contain NUL characters")
    return text


def json_to_struct(text: str | None, target: struct_pb2.Struct) -> None:
    if text:
        target.update(json.loads(text))


def message_json(message: Message) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), separators=(",", ":"))
