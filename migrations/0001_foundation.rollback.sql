-- Undoes 0001_foundation. The agentstore_app role is left in place: roles are cluster-wide and
-- other databases of the cluster may still grant it privileges.
DROP TABLE IF EXISTS audit_logs;
DROP TABLE IF EXISTS create_requests;
DROP TABLE IF EXISTS agents;
DROP TABLE IF EXISTS api_keys;
DROP TABLE IF EXISTS tenants;
DROP FUNCTION IF EXISTS agentstore_scoped_json(uuid, jsonb);
DROP FUNCTION IF EXISTS agentstore_scoped_tags(uuid, text[]);
DROP FUNCTION IF EXISTS agentstore_current_tenant();
