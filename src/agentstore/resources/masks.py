"""AIP-134 update masks: which fields an Update writes."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from agentstore.errors import invalid_argument


def _bad_mask(message: str) -> Exception:
    return invalid_argument("INVALID_UPDATE_MASK", message, [("update_mask", message)])


def update_mask_paths(
    resource: Message,
    mask: field_mask_pb2.FieldMask | None,
    updatable: Sequence[str],
    output_only: Sequence[str],
    *,
    immutable: Sequence[str] = (),
    key_prefixes: Sequence[str] = (),
) -> list[str]:
    """AIP-134 update paths: the mask's (checked), `*` alone for every updatable field, or, with
    no mask, every updatable field set in `resource`. `key_prefixes` (e.g. "state.") admit
    sub-key paths of a map-like field."""
    if mask is None or not mask.paths:
        return [f.name for f, _ in resource.ListFields() if f.name in updatable]
    if "*" in mask.paths:
        if len(mask.paths) > 1:
            raise _bad_mask("`*` must be the only path")
        return list(updatable)
    paths: list[str] = []
    for path in mask.paths:
        if path in output_only:
            raise _bad_mask(f"{path} is output only")
        if path in immutable:
            raise _bad_mask(f"{path} cannot be changed")
        prefix = next((p for p in key_prefixes if path.startswith(p)), None)
        if prefix is not None:
            if path == prefix:
                raise _bad_mask(f"{prefix} needs a key after the dot")
        elif path not in updatable:
            raise _bad_mask(f"unknown field {path!r}")
        if path not in paths:
            paths.append(path)
    return paths
