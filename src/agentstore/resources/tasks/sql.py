"""The task SQL: the CRUD statements and the queue's. Every write statement writes its audit row in
the same statement (with_audit; the JSON is agentstore_task_json, migration 0006).

Lock order, to keep deadlocks out: a claim locks its agent, then skips locked tasks; everything
else locks tasks first, then agents (agents.lock_agents, in id order).
"""

from __future__ import annotations

from agentstore.resources.audit import with_audit

ENTITY = "task"

# `{a}` is a table alias with its dot ("t."), or "" (COLUMNS).
COLUMNS_OF = """{a}id, {a}title, {a}description, {a}status, {a}priority, {a}payload::text AS payload,
       {a}result::text AS result, {a}error, {a}required_capabilities, {a}assigned_agent_id, {a}attempts,
       {a}max_attempts, {a}lease_token, {a}lease_expire_time, {a}create_time, {a}update_time, {a}start_time,
       {a}complete_time, {a}version"""
COLUMNS = COLUMNS_OF.format(a="")
T_COLUMNS = COLUMNS_OF.format(a="t.")
# RETURNING of a write that audits its row: the columns and the row's audit JSON.
_WRITTEN = f"{T_COLUMNS}, agentstore_task_json(t) AS audit_after"

# The queue's lock on a task: the row, whether its lease is live (PostgreSQL's clock, not ours),
# and its audit JSON as it is now (the `before` of the write that follows).
LOCK_TASK = f"""
SELECT {T_COLUMNS}, (t.lease_expire_time > now()) AS lease_live, agentstore_task_json(t) AS audit_before
FROM tasks AS t WHERE t.tenant_id = $1 AND t.id = $2 FOR UPDATE
"""

# One statement for up to 1000 tasks and their `task.create` audit rows. Capability lists travel
# as JSON arrays because PostgreSQL arrays must be rectangular and cannot be unnested one row at a
# time. The audit rows keep the order of the request. Only the columns PostgreSQL generates come
# back: the response is built from the validated request (created_tasks), not decoded from 1,000
# rows.
INSERT_TASKS = with_audit(
    """input AS (
    SELECT * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::int[])
                  WITH ORDINALITY AS u(id, title, description, priority, payload, caps, max_attempts, n)
), written AS (
    INSERT INTO tasks (tenant_id, id, title, description, priority, payload, required_capabilities, max_attempts)
    SELECT $1, u.id, u.title, u.description, u.priority, u.payload::jsonb,
           ARRAY(SELECT jsonb_array_elements_text(u.caps::jsonb)), u.max_attempts
    FROM input AS u
    ORDER BY u.n
    RETURNING id, status, attempts, create_time, update_time, version, agentstore_task_json(tasks) AS audit_after
)""",
    action="task.create",
    entity_type=ENTITY,
    returning="id, status, attempts, create_time, update_time, version",
    first_param=9,
    join="JOIN input AS u ON u.id = w.id ORDER BY u.n",
)

CLAIM_REQUEST_IDS = """
INSERT INTO create_requests (tenant_id, request_id, resource_type, resource_id)
SELECT $1, u.request_id, 'task', u.resource_id FROM unnest($2::uuid[], $3::uuid[]) AS u(request_id, resource_id)
ON CONFLICT (tenant_id, request_id) DO NOTHING
RETURNING request_id
"""

EARLIER_REQUESTS = f"""
SELECT r.request_id, r.resource_type, {T_COLUMNS}
FROM create_requests r LEFT JOIN tasks t ON t.tenant_id = r.tenant_id AND t.id = r.resource_id
WHERE r.tenant_id = $1 AND r.request_id = ANY($2::uuid[])
"""

# The highest-priority, oldest PENDING task the agent can do; locked rows are skipped, so
# concurrent claimers each get a different task without waiting.
CLAIM_TASK = with_audit(
    f"""candidate AS (
    SELECT id FROM tasks
    WHERE tenant_id = $1 AND status = 'PENDING' AND required_capabilities <@ $3::text[]
    ORDER BY priority DESC, create_time, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), written AS (
    UPDATE tasks t
    SET status = 'RUNNING', assigned_agent_id = $2, attempts = t.attempts + 1, lease_token = t.lease_token + 1,
        lease_expire_time = now() + $4::interval, start_time = coalesce(t.start_time, now()),
        update_time = now(), version = t.version + 1
    FROM candidate
    WHERE t.tenant_id = $1 AND t.id = candidate.id
    RETURNING {_WRITTEN}
)""",
    action="task.claim",
    entity_type=ENTITY,
    returning=COLUMNS,
    first_param=5,
)

# Overdue leases of one tenant: back to PENDING, or FAILED once every attempt was used.
EXPIRE_LEASES = with_audit(
    f"""overdue AS (
    SELECT id FROM tasks
    WHERE tenant_id = $1 AND status = 'RUNNING' AND lease_expire_time <= now()
    ORDER BY lease_expire_time
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), written AS (
    UPDATE tasks t
    SET status = CASE WHEN t.attempts >= t.max_attempts THEN 'FAILED' ELSE 'PENDING' END,
        error = 'lease expired', lease_expire_time = NULL,
        complete_time = CASE WHEN t.attempts >= t.max_attempts THEN now() END,
        version = t.version + 1, update_time = now()
    FROM overdue
    WHERE t.tenant_id = $1 AND t.id = overdue.id
    RETURNING {_WRITTEN}
)""",
    action="task.lease_expired",
    entity_type=ENTITY,
    returning=COLUMNS,
    first_param=3,
)
