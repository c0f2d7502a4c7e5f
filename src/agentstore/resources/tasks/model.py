"""Tasks as data: row → proto, validation, the filters and search of List and Search, the spec."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message

from agentstore.db import Record
from agentstore.errors import ApiError, invalid_field, not_found
from agentstore.query import FieldKind, FieldSpec, SortKey
from agentstore.query.listing import ID_KEY, ListSpec, filter_fields, json_field, sort_keys, tags_field
from agentstore.resources.fields import check_text, etag_of, json_to_struct, struct_to_json, to_timestamp
from agentstore.resources.spec import ResourceSpec
from agentstore.resources.tasks.sql import COLUMNS, COLUMNS_OF, ENTITY
from agentstore.v1 import task_pb2, task_service_pb2

STATUS_TO_DB: dict[int, str] = {
    task_pb2.TASK_STATUS_PENDING: "PENDING",
    task_pb2.TASK_STATUS_RUNNING: "RUNNING",
    task_pb2.TASK_STATUS_SUCCEEDED: "SUCCEEDED",
    task_pb2.TASK_STATUS_FAILED: "FAILED",
    task_pb2.TASK_STATUS_CANCELLED: "CANCELLED",
}
STATUS_FROM_DB: dict[str, int] = {v: k for k, v in STATUS_TO_DB.items()}
FINISHED = ("SUCCEEDED", "FAILED", "CANCELLED")

_STATUS_LITERALS = {**{f"TASK_STATUS_{v}": v for v in STATUS_TO_DB.values()}, **{v: v for v in STATUS_TO_DB.values()}}
FILTER_FIELDS = filter_fields(
    title=FieldKind.STRING,
    status=FieldSpec("status", FieldKind.ENUM, _STATUS_LITERALS),
    assigned_agent_id=FieldKind.UUID,
    priority=FieldKind.INTEGER,
    attempts=FieldKind.INTEGER,
    max_attempts=FieldKind.INTEGER,
    required_capabilities=tags_field("required_capabilities"),
    payload=json_field("payload"),
    create_time=FieldKind.TIMESTAMP,
    update_time=FieldKind.TIMESTAMP,
    start_time=FieldKind.TIMESTAMP,
    complete_time=FieldKind.TIMESTAMP,
    lease_expire_time=FieldKind.TIMESTAMP,
)
LIST_SPEC = ListSpec(
    resource="tasks",
    select=f"SELECT {COLUMNS} FROM tasks WHERE tenant_id = $1",
    fields=FILTER_FIELDS,
    sort_keys=sort_keys(priority=FieldKind.INTEGER, create_time=FieldKind.TIMESTAMP, update_time=FieldKind.TIMESTAMP),
    default_order="create_time",
    tie_breaker=ID_KEY,
)

# Search: $2 is the query. The rank is an integer so that it can key a page token: a title equal
# to the query adds 10^9, above any ts_rank (normalization 32 keeps it below 1, scaled to 10^9).
_TSQUERY = "websearch_to_tsquery('english', $2)"
SEARCH_SPEC = ListSpec(
    resource="tasks:search",
    select=f"""
SELECT * FROM (
    SELECT tenant_id, {COLUMNS},
           (CASE WHEN lower(title) = lower($2) THEN 1000000000 ELSE 0 END
            + (ts_rank(search, {_TSQUERY}, 32) * 1000000000)::bigint) AS rank
    FROM tasks
    WHERE tenant_id = $1
      AND agentstore_scoped_search(tenant_id, search) @@ agentstore_scoped_query($1, {_TSQUERY})
) AS ranked WHERE true""",
    fields=FILTER_FIELDS,
    sort_keys={"rank": SortKey("rank", "rank", FieldKind.INTEGER)},
    default_order="rank desc",
    tie_breaker=ID_KEY,
    base_params=2,
)

UPDATABLE = ("title", "description", "priority", "payload", "required_capabilities", "max_attempts", "status")
# What a create writes: every updatable field but status, which only an update sets (to cancel).
WRITABLE = tuple(path for path in UPDATABLE if path != "status")
OUTPUT_ONLY = (
    "id",
    "result",
    "assigned_agent_id",
    "attempts",
    "lease_expire_time",
    "create_time",
    "update_time",
    "start_time",
    "complete_time",
    "etag",
    "error",
)

MAX_TITLE = 512
MAX_DESCRIPTION = 65536
MAX_LABEL = 128
MAX_CAPABILITIES = 100
MAX_ERROR = 4096
MAX_QUERY = 1000
MAX_BATCH = 1000
DEFAULT_MAX_ATTEMPTS = 3
MIN_LEASE = timedelta(seconds=1)
MAX_LEASE = timedelta(hours=1)


def task_from_row(row: Record) -> task_pb2.Task:
    task = task_pb2.Task(
        id=str(row["id"]),
        title=row["title"],
        description=row["description"],
        status=STATUS_FROM_DB[row["status"]],  # type: ignore[arg-type]
        priority=row["priority"],
        required_capabilities=row["required_capabilities"],
        assigned_agent_id=str(row["assigned_agent_id"]) if row["assigned_agent_id"] is not None else "",
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        etag=etag_of(row["version"]),
        error=row["error"],
    )
    json_to_struct(row["payload"], task.payload)
    json_to_struct(row["result"], task.result)
    to_timestamp(row["lease_expire_time"], task.lease_expire_time)
    to_timestamp(row["create_time"], task.create_time)
    to_timestamp(row["update_time"], task.update_time)
    to_timestamp(row["start_time"], task.start_time)
    to_timestamp(row["complete_time"], task.complete_time)
    return task


def created_tasks(
    creates: Sequence[task_service_pb2.CreateTaskRequest],
    columns: Sequence[Sequence[Any]],
    indexes: Sequence[int],
    rows: Sequence[Record],
) -> dict[uuid.UUID, task_pb2.Task]:
    """The tasks BatchCreateTasks inserted, as task_from_row would read them back, built from the
    validated creates (`columns`: id, then column_values, by create) and the columns PostgreSQL
    generated (INSERT_TASKS). Copying the request's payload Struct and sharing one Timestamp per
    distinct time costs a fraction of decoding 1,000 rows (JSON payloads, datetimes).
    test_audit_json checks the result against the stored rows."""
    stamps: dict[Any, timestamp_pb2.Timestamp] = {}

    def stamp(value: Any) -> timestamp_pb2.Timestamp:
        ts = stamps.get(value)
        if ts is None:
            ts = stamps[value] = timestamp_pb2.Timestamp()
            ts.FromDatetime(value)
        return ts

    by_id = {row["id"]: row for row in rows}
    tasks: dict[uuid.UUID, task_pb2.Task] = {}
    for i in indexes:
        task_id = columns[0][i]
        row = by_id[task_id]
        task = creates[i].task
        tasks[task_id] = task_pb2.Task(
            id=str(task_id),
            title=task.title,
            description=task.description,
            status=STATUS_FROM_DB[row["status"]],  # type: ignore[arg-type]
            priority=task.priority,
            payload=task.payload if task.payload.fields else None,
            required_capabilities=task.required_capabilities,
            attempts=row["attempts"],
            max_attempts=columns[6][i],
            create_time=stamp(row["create_time"]),
            update_time=stamp(row["update_time"]),
            etag=etag_of(row["version"]),
        )
    if len(tasks) != len(indexes):
        raise RuntimeError(f"BatchCreateTasks inserted {len(rows)} rows for {len(indexes)} tasks")
    return tasks


def task_not_found(task_id: uuid.UUID | str) -> ApiError:
    return not_found("TASK_NOT_FOUND", f"no task {task_id}")


def lease_lost(task_id: uuid.UUID) -> ApiError:
    return ApiError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_LOST",
        f"the lease on task {task_id} is not held with this token: it expired, was claimed again, or the task ended",
    )


def validate(task: task_pb2.Task, paths: Sequence[str] = WRITABLE, prefix: str = "task") -> None:
    """Check the fields named in `paths` (every writable one for a create): before any transaction."""
    if "title" in paths:
        check_text(task.title, f"{prefix}.title", max_len=MAX_TITLE, required=True)
    if "description" in paths:
        check_text(task.description, f"{prefix}.description", max_len=MAX_DESCRIPTION)
    if "required_capabilities" in paths:
        if len(task.required_capabilities) > MAX_CAPABILITIES:
            raise invalid_field(f"{prefix}.required_capabilities", f"at most {MAX_CAPABILITIES} capabilities")
        for i, capability in enumerate(task.required_capabilities):
            check_text(capability, f"{prefix}.required_capabilities[{i}]", max_len=MAX_LABEL, required=True)
    if "max_attempts" in paths and not 1 <= (task.max_attempts or DEFAULT_MAX_ATTEMPTS) <= 100:
        raise invalid_field(f"{prefix}.max_attempts", "must be between 1 and 100")
    if "payload" in paths:
        struct_to_json(task.payload, f"{prefix}.payload")
    if "status" in paths and task.status != task_pb2.TASK_STATUS_CANCELLED:
        raise invalid_field(f"{prefix}.status", "may only be set to TASK_STATUS_CANCELLED")


def column_values(task: task_pb2.Task, prefix: str = "task") -> list[Any]:
    """The stored form of the writable fields (validated already), in INSERT/UPDATE order."""
    max_attempts = task.max_attempts or DEFAULT_MAX_ATTEMPTS
    return [
        task.title,
        task.description,
        task.priority,
        struct_to_json(task.payload, f"{prefix}.payload"),
        list(task.required_capabilities),
        max_attempts,
    ]


def lease_of(duration: duration_pb2.Duration, field: str, present: bool) -> timedelta:
    if not present:
        raise invalid_field(field, "is required")
    try:
        value = duration.ToTimedelta()
    except (ValueError, OverflowError):
        raise invalid_field(field, "out of range") from None
    if not MIN_LEASE <= value <= MAX_LEASE:
        raise invalid_field(field, "must be between 1 second and 1 hour")
    return value


def merge_for_update(stored: Message, patch: Message, paths: Sequence[str]) -> Message:
    """FieldMask merge of every path but `status`, which only ever cancels (UpdateTask does that)."""
    merged = type(stored)()
    merged.CopyFrom(stored)
    fields = [path for path in paths if path != "status"]
    if fields:
        field_mask_pb2.FieldMask(paths=fields).MergeMessage(patch, merged, True, True)
    return merged


# The writable columns in column_values order ($3 on).
WRITE_SET = """title = $3, description = $4, priority = $5, payload = $6::jsonb, required_capabilities = $7,
        max_attempts = $8"""

TASK = ResourceSpec(
    entity=ENTITY,
    table="tasks",
    columns_of=COLUMNS_OF,
    from_row=task_from_row,
    not_found=task_not_found,
    read_function="agentstore_read_tasks",
    json_function="agentstore_task_json",
    validate=lambda task, paths, creating: validate(task, paths),
    insert_columns="title, description, priority, payload, required_capabilities, max_attempts",
    insert_values="$3, $4, $5, $6::jsonb, $7, $8",
    create_values=column_values,
    update_set=WRITE_SET,
    update_values=column_values,
    creatable=WRITABLE,
    updatable=UPDATABLE,
    output_only=OUTPUT_ONLY,
    merge=merge_for_update,
)
