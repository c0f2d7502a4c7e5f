-- Undoes 0005_point_reads.
DROP FUNCTION IF EXISTS agentstore_read_api_key(uuid, uuid);
DROP FUNCTION IF EXISTS agentstore_read_tasks(uuid, uuid[]);
DROP FUNCTION IF EXISTS agentstore_read_agents(uuid, uuid[]);
