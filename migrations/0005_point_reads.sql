-- Point reads in one round trip: each function sets the tenant for the current transaction and
-- then selects, so row-level security applies exactly as in a BEGIN … COMMIT block. Called as a
-- single statement (an implicit transaction), the tenant setting ends with the statement.
-- SECURITY INVOKER (the default): the caller's privileges and policies apply unchanged.
-- depends: 0004_achievements

CREATE FUNCTION agentstore_read_agents(tenant uuid, ids uuid[]) RETURNS SETOF agents
    LANGUAGE plpgsql VOLATILE
    AS $$
BEGIN
    PERFORM set_config('agentstore.tenant_id', tenant::text, true);
    RETURN QUERY SELECT * FROM agents WHERE tenant_id = tenant AND id = ANY (ids);
END
$$;

CREATE FUNCTION agentstore_read_tasks(tenant uuid, ids uuid[]) RETURNS SETOF tasks
    LANGUAGE plpgsql VOLATILE
    AS $$
BEGIN
    PERFORM set_config('agentstore.tenant_id', tenant::text, true);
    RETURN QUERY SELECT * FROM tasks WHERE tenant_id = tenant AND id = ANY (ids);
END
$$;

CREATE FUNCTION agentstore_read_api_key(tenant uuid, key_id uuid) RETURNS SETOF api_keys
    LANGUAGE plpgsql VOLATILE
    AS $$
BEGIN
    PERFORM set_config('agentstore.tenant_id', tenant::text, true);
    RETURN QUERY SELECT * FROM api_keys WHERE tenant_id = tenant AND id = key_id;
END
$$;

GRANT EXECUTE ON FUNCTION agentstore_read_agents(uuid, uuid[]), agentstore_read_tasks(uuid, uuid[]),
    agentstore_read_api_key(uuid, uuid) TO agentstore_app;
