-- Undoes 0002_tasks.
DROP TABLE IF EXISTS tasks;
DROP FUNCTION IF EXISTS agentstore_scoped_query(uuid, tsquery);
DROP FUNCTION IF EXISTS agentstore_scoped_search(uuid, tsvector);
ALTER TABLE agents DROP COLUMN IF EXISTS completed_task_count;
