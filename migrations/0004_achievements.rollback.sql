-- Undoes 0004_achievements.
DROP INDEX IF EXISTS audit_logs_by_action;
DROP INDEX IF EXISTS audit_logs_by_actor;
DROP TABLE IF EXISTS achievements;
DROP TABLE IF EXISTS achievement_rules;
