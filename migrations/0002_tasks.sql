-- Tasks: a lease-based work queue with fencing tokens, full-text search and bulk creation.
-- depends: 0001_foundation

-- How many tasks an agent has completed: the achievement rules count on it. Not part of the
-- Agent message, so changing it does not bump the agent's version (its etag).
ALTER TABLE agents ADD COLUMN completed_task_count integer NOT NULL DEFAULT 0;

CREATE TABLE tasks (
    tenant_id             uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id                    uuid        NOT NULL,
    title                 text        NOT NULL CHECK (char_length(title) BETWEEN 1 AND 512),
    description           text        NOT NULL DEFAULT '' CHECK (char_length(description) <= 65536),
    status                text        NOT NULL DEFAULT 'PENDING'
                                      CHECK (status IN ('PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    priority              integer     NOT NULL DEFAULT 0,
    payload               jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(payload) = 'object'),
    result                jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(result) = 'object'),
    error                 text        NOT NULL DEFAULT '',
    required_capabilities text[]      NOT NULL DEFAULT '{}',
    assigned_agent_id     uuid,
    attempts              integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts          integer     NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 100),
    -- The fencing token: it only ever grows, by one on every claim of the task.
    lease_token           bigint      NOT NULL DEFAULT 0,
    lease_expire_time     timestamptz,
    create_time           timestamptz NOT NULL DEFAULT now(),
    update_time           timestamptz NOT NULL DEFAULT now(),
    start_time            timestamptz,
    complete_time         timestamptz,
    version               integer     NOT NULL DEFAULT 1,
    search                tsvector    GENERATED ALWAYS AS (
                              setweight(to_tsvector('english', title), 'A')
                              || setweight(to_tsvector('english', description), 'B')
                          ) STORED,
    PRIMARY KEY (tenant_id, id),
    -- No foreign key to agents on purpose: the task keeps naming the agent that last held it
    -- (history), and a cascade would change cached task rows without bumping their version.
    -- A deleted agent's running task runs until its lease expires, then goes back to the queue.
    CHECK (status <> 'RUNNING' OR lease_expire_time IS NOT NULL)
);
-- ClaimTask walks this in order: highest priority, then oldest.
CREATE INDEX tasks_claim_order ON tasks (tenant_id, priority DESC, create_time, id) WHERE status = 'PENDING';
-- The lease sweeper finds overdue leases here.
CREATE INDEX tasks_leases ON tasks (tenant_id, lease_expire_time) WHERE status = 'RUNNING';
CREATE INDEX tasks_by_create_time ON tasks (tenant_id, create_time, id);
CREATE INDEX tasks_by_update_time ON tasks (tenant_id, update_time, id);
CREATE INDEX tasks_by_priority ON tasks (tenant_id, priority, id);
CREATE INDEX tasks_by_agent ON tasks (tenant_id, assigned_agent_id, status);
CREATE INDEX tasks_capabilities ON tasks USING gin (agentstore_scoped_tags(tenant_id, required_capabilities));
CREATE INDEX tasks_payload ON tasks USING gin (agentstore_scoped_json(tenant_id, payload) jsonb_path_ops);
-- Full-text search, keyed by tenant like the other GIN indexes: the tenant's uuid is a lexeme
-- of every entry, ANDed into every query, so the index only matches the caller's rows.
-- plpgsql, not sql: a SQL function would be inlined into the query and no longer match the index.
CREATE FUNCTION agentstore_scoped_search(tenant uuid, doc tsvector) RETURNS tsvector
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ BEGIN RETURN doc || (replace(tenant::text, '-', '') || ':1')::tsvector; END $$;
CREATE FUNCTION agentstore_scoped_query(tenant uuid, q tsquery) RETURNS tsquery
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ BEGIN RETURN q && replace(tenant::text, '-', '')::tsquery; END $$;
CREATE INDEX tasks_search ON tasks USING gin (agentstore_scoped_search(tenant_id, search));

ALTER TABLE tasks ENABLE ROW LEVEL SECURITY;
ALTER TABLE tasks FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tasks
    USING (tenant_id = agentstore_current_tenant()) WITH CHECK (tenant_id = agentstore_current_tenant());

GRANT SELECT, INSERT, UPDATE, DELETE ON tasks TO agentstore_app;
GRANT EXECUTE ON FUNCTION agentstore_scoped_search(uuid, tsvector), agentstore_scoped_query(uuid, tsquery)
    TO agentstore_app;
