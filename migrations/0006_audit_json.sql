-- Audit JSON built inside PostgreSQL, so a write and its audit row go in one statement: the row
-- RETURNING agentstore_<kind>_json(<table>) feeds an INSERT INTO audit_logs in the same WITH. That
-- saves a round trip per write, and BatchCreateTasks no longer encodes 1,000 tasks in Python.
-- Each result equals the server's own encoding of the message (protobuf JSON with the proto field
-- names, default values omitted); tests/integration/test_audit_json.py compares the two over rows
-- in every state.
-- depends: 0005_point_reads

-- A timestamp as protobuf JSON writes it: UTC, "Z", and 0, 3 or 6 fractional digits.
-- STABLE, not IMMUTABLE, because to_char is; plain SQL so that the planner inlines it.
CREATE FUNCTION agentstore_proto_time(t timestamptz) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE
               WHEN extract(microseconds FROM t)::bigint % 1000000 = 0 THEN ''
               WHEN extract(microseconds FROM t)::bigint % 1000 = 0
                   THEN to_char(t AT TIME ZONE 'UTC', '.MS')
               ELSE to_char(t AT TIME ZONE 'UTC', '.US')
           END
        || 'Z'
    $$;

-- jsonb_strip_nulls would also strip nulls inside payload and result, so those two are added
-- after it (and only when not empty, as an empty Struct is an unset field).
CREATE FUNCTION agentstore_task_json(t tasks) RETURNS jsonb
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
               'id', t.id::text,
               'title', nullif(t.title, ''),
               'description', nullif(t.description, ''),
               'status', 'TASK_STATUS_' || t.status,
               'priority', nullif(t.priority, 0),
               'required_capabilities', nullif(to_jsonb(t.required_capabilities), '[]'::jsonb),
               'assigned_agent_id', t.assigned_agent_id::text,
               'attempts', nullif(t.attempts, 0),
               'max_attempts', nullif(t.max_attempts, 0),
               'lease_expire_time', agentstore_proto_time(t.lease_expire_time),
               'create_time', agentstore_proto_time(t.create_time),
               'update_time', agentstore_proto_time(t.update_time),
               'start_time', agentstore_proto_time(t.start_time),
               'complete_time', agentstore_proto_time(t.complete_time),
               'etag', '"' || t.version || '"',
               'error', nullif(t.error, '')))
        || CASE WHEN t.payload = '{}'::jsonb THEN '{}'::jsonb ELSE jsonb_build_object('payload', t.payload) END
        || CASE WHEN t.result = '{}'::jsonb THEN '{}'::jsonb ELSE jsonb_build_object('result', t.result) END
    $$;

CREATE FUNCTION agentstore_agent_json(a agents) RETURNS jsonb
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
               'id', a.id::text,
               'name', nullif(a.name, ''),
               'role', nullif(a.role, ''),
               'kind', nullif(a.kind, ''),
               'status', 'AGENT_STATUS_' || a.status,
               'capabilities', nullif(to_jsonb(a.capabilities), '[]'::jsonb),
               'last_heartbeat_time', agentstore_proto_time(a.last_heartbeat_time),
               'create_time', agentstore_proto_time(a.create_time),
               'update_time', agentstore_proto_time(a.update_time),
               'etag', '"' || a.version || '"'))
        || CASE WHEN a.metadata = '{}'::jsonb THEN '{}'::jsonb ELSE jsonb_build_object('metadata', a.metadata) END
    $$;
