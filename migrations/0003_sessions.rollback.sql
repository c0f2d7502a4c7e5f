-- Undoes 0003_sessions.
DROP TABLE IF EXISTS sessions;
