-- Sessions read and audited like agents and tasks: a one-round-trip point read (as 0005 does for
-- the others) and their audit JSON built in PostgreSQL (as 0006 does for the others), so that
-- every resource of the generic write path writes its change and its audit row in one statement
-- and the JSON of an entity is produced in one place.
-- depends: 0006_audit_json

-- A Duration as protobuf JSON writes it: seconds, "s", and 0, 3 or 6 fractional digits (the
-- column holds microseconds; the 9-digit form never arises). Only for non-negative intervals.
CREATE FUNCTION agentstore_proto_duration(d interval) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT CASE
               WHEN us % 1000000 = 0 THEN (us / 1000000)::text || 's'
               WHEN us % 1000 = 0 THEN (us / 1000000)::text || '.' || lpad(((us % 1000000) / 1000)::text, 3, '0') || 's'
               ELSE (us / 1000000)::text || '.' || lpad((us % 1000000)::text, 6, '0') || 's'
           END
    FROM (SELECT (extract(epoch FROM d) * 1000000)::bigint AS us) AS x
    $$;

CREATE FUNCTION agentstore_session_json(s sessions) RETURNS jsonb
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
               'id', s.id::text,
               'agent_id', s.agent_id::text,
               'user_id', nullif(s.user_id, ''),
               'ttl', agentstore_proto_duration(s.ttl),
               'expire_time', agentstore_proto_time(s.expire_time),
               'create_time', agentstore_proto_time(s.create_time),
               'update_time', agentstore_proto_time(s.update_time),
               'etag', '"' || s.version || '"'))
        || CASE WHEN s.state = '{}'::jsonb THEN '{}'::jsonb ELSE jsonb_build_object('state', s.state) END
    $$;

-- Only live sessions, as every other statement on sessions.
CREATE FUNCTION agentstore_read_sessions(tenant uuid, ids uuid[]) RETURNS SETOF sessions
    LANGUAGE plpgsql VOLATILE
    AS $$
BEGIN
    PERFORM set_config('agentstore.tenant_id', tenant::text, true);
    RETURN QUERY SELECT * FROM sessions WHERE tenant_id = tenant AND id = ANY (ids) AND expire_time > now();
END
$$;

GRANT EXECUTE ON FUNCTION agentstore_read_sessions(uuid, uuid[]) TO agentstore_app;
