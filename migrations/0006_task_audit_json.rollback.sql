-- Undoes 0006_task_audit_json.
DROP FUNCTION IF EXISTS agentstore_task_json(tasks);
DROP FUNCTION IF EXISTS agentstore_proto_time(timestamptz);
