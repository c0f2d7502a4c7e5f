-- Cache repairs: what a writer could not put into Redis after its commit (Redis frozen, down or
-- out of reach). The writer records the repair here, in PostgreSQL, before it answers, so the
-- repair outlives the writer: every server process reads the pending ones (a small query every
-- fraction of a second), drops what its own L1 holds of them, stops trusting L2 until they are
-- done, and whichever process reaches Redis first does them. No tenant data: ids and versions.
-- depends: 0007_sessions_like_the_rest

CREATE TABLE cache_repairs (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The Redis key prefix of the deployment the repair is for (deployments may share a database).
    keyspace    text        NOT NULL,
    -- An entity kind (agent, task, session): L2 must not hold a version below `version`;
    -- or 'leaderboard': the tenant's board must be rebuilt.
    kind        text        NOT NULL,
    tenant_id   uuid        NOT NULL,
    entity_id   uuid,
    version     integer,
    create_time timestamptz NOT NULL DEFAULT now(),
    -- When Redis took the repair; pending until then.
    repair_time timestamptz
);
CREATE INDEX cache_repairs_pending ON cache_repairs (keyspace, id) WHERE repair_time IS NULL;
CREATE INDEX cache_repairs_done ON cache_repairs (keyspace, repair_time);

GRANT SELECT, INSERT, UPDATE, DELETE ON cache_repairs TO agentstore_app;
