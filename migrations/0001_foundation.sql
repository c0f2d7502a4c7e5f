-- Foundation: tenants, their API keys, agents, the audit log and create-request idempotency.
-- Runs as the table owner. The server connects as a LOGIN role that is a member of the NOLOGIN
-- group role agentstore_app below: it owns no table and every tenant table forces row-level
-- security, so a query that forgot its tenant sees nothing.
-- depends:

DO $$
BEGIN
    CREATE ROLE agentstore_app NOLOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL;  -- roles are cluster-wide: another database of this cluster created it already
END
$$;

-- The tenant of the current transaction, set by the server with set_config(..., true).
-- NULL when unset, so every policy below compares against NULL and matches no row.
CREATE FUNCTION agentstore_current_tenant() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(current_setting('agentstore.tenant_id', true), '')::uuid $$;

-- GIN cannot index uuid without the btree_gin extension, so the GIN indexes key every entry by
-- tenant instead: a capability "python" of tenant T is indexed as "T:python", and metadata as
-- {"T": metadata}. The index then only ever matches entries of the querying tenant.
CREATE FUNCTION agentstore_scoped_tags(tenant uuid, tags text[]) RETURNS text[]
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT coalesce(array_agg(tenant::text || ':' || t), '{}') FROM unnest(tags) AS t $$;

CREATE FUNCTION agentstore_scoped_json(tenant uuid, doc jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT jsonb_build_object(tenant::text, doc) $$;

CREATE TABLE tenants (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 128),
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    version     integer     NOT NULL DEFAULT 1,
    CONSTRAINT tenants_name_key UNIQUE (name)
);

CREATE TABLE api_keys (
    tenant_id     uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id            uuid        NOT NULL,
    display_name  text        NOT NULL DEFAULT '' CHECK (char_length(display_name) <= 128),
    role          text        NOT NULL CHECK (role IN ('reader', 'writer', 'admin')),
    -- SHA-256 of a 256-bit random secret: the secret itself is never stored.
    secret_hash   bytea       NOT NULL CHECK (octet_length(secret_hash) = 32),
    secret_prefix text        NOT NULL,
    expire_time   timestamptz,
    revoke_time   timestamptz,
    create_time   timestamptz NOT NULL DEFAULT now(),
    update_time   timestamptz NOT NULL DEFAULT now(),
    version       integer     NOT NULL DEFAULT 1,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX api_keys_by_create_time ON api_keys (tenant_id, create_time DESC, id);

CREATE TABLE agents (
    tenant_id           uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id                  uuid        NOT NULL,
    name                text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 256),
    role                text        NOT NULL DEFAULT '',
    kind                text        NOT NULL DEFAULT '',
    status              text        NOT NULL DEFAULT 'IDLE'
                                    CHECK (status IN ('IDLE', 'BUSY', 'OFFLINE', 'ERROR')),
    capabilities        text[]      NOT NULL DEFAULT '{}',
    metadata            jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    last_heartbeat_time timestamptz,
    create_time         timestamptz NOT NULL DEFAULT now(),
    update_time         timestamptz NOT NULL DEFAULT now(),
    version             integer     NOT NULL DEFAULT 1,
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT agents_name_key UNIQUE (tenant_id, name)
);
CREATE INDEX agents_by_create_time ON agents (tenant_id, create_time, id);
CREATE INDEX agents_by_update_time ON agents (tenant_id, update_time, id);
CREATE INDEX agents_by_status ON agents (tenant_id, status);
CREATE INDEX agents_capabilities ON agents USING gin (agentstore_scoped_tags(tenant_id, capabilities));
CREATE INDEX agents_metadata ON agents USING gin (agentstore_scoped_json(tenant_id, metadata) jsonb_path_ops);

-- AIP-155: a create retried with the same request_id finds the resource the first one made.
CREATE TABLE create_requests (
    tenant_id     uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    request_id    uuid        NOT NULL,
    resource_type text        NOT NULL,
    resource_id   uuid        NOT NULL,
    create_time   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, request_id)
);

-- One row per mutation, written in the mutation's transaction. `revision` orders rows for
-- readers; `txid` lets a change stream skip rows whose transaction is still in flight, because
-- identity values commit out of order.
CREATE TABLE audit_logs (
    tenant_id    uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id           uuid        NOT NULL DEFAULT gen_random_uuid(),
    revision     bigint      GENERATED ALWAYS AS IDENTITY,
    txid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    actor        text        NOT NULL,
    actor_key_id uuid,
    action       text        NOT NULL,
    entity_type  text        NOT NULL,
    entity_id    text        NOT NULL,
    before       jsonb,
    after        jsonb,
    request_id   text        NOT NULL DEFAULT '',
    create_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX audit_logs_by_revision ON audit_logs (tenant_id, revision);
CREATE INDEX audit_logs_by_entity ON audit_logs (tenant_id, entity_type, entity_id, create_time DESC);
CREATE INDEX audit_logs_by_time ON audit_logs (tenant_id, create_time DESC, id);

-- Row-level security, forced so that not even the owner escapes it by accident.
ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenants FORCE ROW LEVEL SECURITY;
-- The platform administration scope (TenantService) may list tenants; nothing else honours it.
CREATE POLICY tenant_isolation ON tenants
    USING (id = agentstore_current_tenant()
           OR current_setting('agentstore.platform_scope', true) = 'on')
    WITH CHECK (id = agentstore_current_tenant());

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_keys
    USING (tenant_id = agentstore_current_tenant()) WITH CHECK (tenant_id = agentstore_current_tenant());

ALTER TABLE agents ENABLE ROW LEVEL SECURITY;
ALTER TABLE agents FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON agents
    USING (tenant_id = agentstore_current_tenant()) WITH CHECK (tenant_id = agentstore_current_tenant());

ALTER TABLE create_requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE create_requests FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON create_requests
    USING (tenant_id = agentstore_current_tenant()) WITH CHECK (tenant_id = agentstore_current_tenant());

ALTER TABLE audit_logs ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_logs FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_logs
    USING (tenant_id = agentstore_current_tenant()) WITH CHECK (tenant_id = agentstore_current_tenant());

-- The application role: data privileges only. The audit log is append-only for it.
GRANT SELECT, INSERT, UPDATE ON tenants TO agentstore_app;
GRANT SELECT, INSERT, UPDATE ON api_keys TO agentstore_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON agents TO agentstore_app;
GRANT SELECT, INSERT, DELETE ON create_requests TO agentstore_app;
GRANT SELECT, INSERT ON audit_logs TO agentstore_app;
GRANT EXECUTE ON FUNCTION agentstore_current_tenant(), agentstore_scoped_tags(uuid, text[]),
    agentstore_scoped_json(uuid, jsonb) TO agentstore_app;
