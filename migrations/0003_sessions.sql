-- Sessions: agent state with a time to live. A session is gone for every reader from the instant
-- expire_time passes (each query checks it); a background job deletes the rows later, in batches.
-- depends: 0002_tasks

CREATE TABLE sessions (
    tenant_id   uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          uuid        NOT NULL,
    agent_id    uuid        NOT NULL,
    user_id     text        NOT NULL DEFAULT '' CHECK (char_length(user_id) <= 256),
    state       jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(state) = 'object'),
    -- How long the session lives after its create and after each update.
    ttl         interval    NOT NULL CHECK (ttl BETWEEN interval '1 second' AND interval '30 days'),
    expire_time timestamptz NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    version     integer     NOT NULL DEFAULT 1,
    PRIMARY KEY (tenant_id, id),
    -- Deleting an agent deletes its sessions.
    CONSTRAINT sessions_agent_fkey FOREIGN KEY (tenant_id, agent_id)
        REFERENCES agents (tenant_id, id) ON DELETE CASCADE
);
-- ListSessions of one agent (and the cascade from agents) walk this.
CREATE INDEX sessions_by_agent ON sessions (tenant_id, agent_id, create_time, id);
CREATE INDEX sessions_by_create_time ON sessions (tenant_id, create_time, id);
CREATE INDEX sessions_by_update_time ON sessions (tenant_id, update_time, id);
-- The purge finds expired rows here; ListSessions ordered by expire_time uses it too.
CREATE INDEX sessions_by_expire_time ON sessions (tenant_id, expire_time, id);

ALTER TABLE sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE sessions FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON sessions
    USING (tenant_id = agentstore_current_tenant()) WITH CHECK (tenant_id = agentstore_current_tenant());

GRANT SELECT, INSERT, UPDATE, DELETE ON sessions TO agentstore_app;
