-- Undoes 0007_sessions_like_the_rest.
DROP FUNCTION IF EXISTS agentstore_read_sessions(uuid, uuid[]);
DROP FUNCTION IF EXISTS agentstore_session_json(sessions);
DROP FUNCTION IF EXISTS agentstore_proto_duration(interval);
