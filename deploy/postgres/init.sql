-- Roles for agentstore, run once by the postgres image on first start
-- (/docker-entrypoint-initdb.d, as the POSTGRES_USER superuser, in POSTGRES_DB).
--
--   agentstore_app     NOLOGIN group role; the migrations grant it the table privileges.
--   agentstore_server  LOGIN role the server connects as: member of agentstore_app, owns no
--                      table, not superuser, no BYPASSRLS (the server refuses to start otherwise).
--
-- Tables are created by `agentstore migrate apply`, connected as the owner (POSTGRES_USER here).
-- The password below is for the local docker-compose stack only; it must match the
-- AGENTSTORE_DATABASE_URL of the agentstore service in docker-compose.yml.
-- Safe to re-run: existing roles are altered back to the required attributes.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'agentstore_app') THEN
        CREATE ROLE agentstore_app NOLOGIN;
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'agentstore_server') THEN
        CREATE ROLE agentstore_server LOGIN PASSWORD 'agentstore-server-dev' IN ROLE agentstore_app;
    END IF;
END
$$;

ALTER ROLE agentstore_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
ALTER ROLE agentstore_server LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
GRANT agentstore_app TO agentstore_server;

-- Connect to the current database (POSTGRES_DB); schema privileges come from the migrations.
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO agentstore_app', current_database());
END
$$;
