-- Undoes 0006_audit_json.
DROP FUNCTION IF EXISTS agentstore_agent_json(agents);
DROP FUNCTION IF EXISTS agentstore_task_json(tasks);
DROP FUNCTION IF EXISTS agentstore_proto_time(timestamptz);
