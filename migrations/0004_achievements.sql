-- Achievements: global achievement rules, per-tenant awards, and audit log indexes for filtering.
-- depends: 0003_sessions

-- The rules are data shared by every tenant (no tenant_id, no RLS): the server may only read them.
-- `completed_tasks` is the completed-task count of an agent that earns the rule; NULL means the
-- rule is only awarded explicitly (AwardAchievement).
CREATE TABLE achievement_rules (
    code            text    PRIMARY KEY CHECK (char_length(code) BETWEEN 1 AND 64),
    title           text    NOT NULL CHECK (char_length(title) BETWEEN 1 AND 256),
    description     text    NOT NULL DEFAULT '',
    points          integer NOT NULL CHECK (points >= 0),
    completed_tasks integer CHECK (completed_tasks > 0)
);
CREATE INDEX achievement_rules_by_completed_tasks ON achievement_rules (completed_tasks)
    WHERE completed_tasks IS NOT NULL;

INSERT INTO achievement_rules (code, title, description, points, completed_tasks) VALUES
    ('first_task', 'First task', 'Completed a first task.', 10, 1),
    ('ten_tasks', 'Ten tasks', 'Completed ten tasks.', 50, 10),
    ('hundred_tasks', 'Hundred tasks', 'Completed a hundred tasks.', 200, 100);

-- One row per award. `points` is the rule's at award time, so a later change to a rule does not
-- rewrite history. NULLS NOT DISTINCT: an award without a task is made at most once per code.
CREATE TABLE achievements (
    tenant_id  uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         uuid        NOT NULL,
    agent_id   uuid        NOT NULL,
    code       text        NOT NULL REFERENCES achievement_rules (code),
    task_id    uuid,
    points     integer     NOT NULL,
    award_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, agent_id) REFERENCES agents (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT achievements_award_key UNIQUE NULLS NOT DISTINCT (tenant_id, agent_id, code, task_id)
);
-- ListAchievements (newest first) and the leaderboard's per-agent sums.
CREATE INDEX achievements_by_award_time ON achievements (tenant_id, award_time DESC, id DESC);
CREATE INDEX achievements_by_agent ON achievements (tenant_id, agent_id, award_time DESC, id DESC)
    INCLUDE (points);

ALTER TABLE achievements ENABLE ROW LEVEL SECURITY;
ALTER TABLE achievements FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON achievements
    USING (tenant_id = agentstore_current_tenant()) WITH CHECK (tenant_id = agentstore_current_tenant());

GRANT SELECT ON achievement_rules TO agentstore_app;
-- Append-only for the server; deleting an agent still cascades to its awards (referential
-- actions run with the table owner's rights).
GRANT SELECT, INSERT ON achievements TO agentstore_app;

-- ListAuditLogs filters by actor and by action, newest first.
CREATE INDEX audit_logs_by_actor ON audit_logs (tenant_id, actor, create_time DESC);
CREATE INDEX audit_logs_by_action ON audit_logs (tenant_id, action, create_time DESC);
