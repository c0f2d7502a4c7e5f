// The Node interop workflow: every service through @grpc/grpc-js + @grpc/proto-loader, with the
// quickstart's loader options and helpers. Driven by tests/interop/test_node.py, which checks the
// JSON object this prints. Reads AGENTSTORE_ADDRESS, AGENTSTORE_WRITER_KEY, AGENTSTORE_ADMIN_KEY.

import { randomUUID } from "node:crypto";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

import {
  LOADER_OPTIONS, SERVICE_CONFIG, call, duration, errorDetails, fromStruct, toDate, toStruct, withKey,
} from "../../../docs/clients/node/quickstart.mjs";

const address = process.env.AGENTSTORE_ADDRESS;
const definition = protoLoader.loadSync(
  [
    "agentstore/v1/agent_service.proto", "agentstore/v1/task_service.proto", "agentstore/v1/session_service.proto",
    "agentstore/v1/achievement_service.proto", "agentstore/v1/audit_log_service.proto", "grpc/health/v1/health.proto",
  ],
  LOADER_OPTIONS,
);
const loaded = grpc.loadPackageDefinition(definition);
const v1 = loaded.agentstore.v1;
const credentials = grpc.credentials.createInsecure();
const options = (key) => ({ interceptors: [withKey(key)], "grpc.service_config": SERVICE_CONFIG });
const writer = options(process.env.AGENTSTORE_WRITER_KEY);
const agents = new v1.AgentService(address, credentials, writer);
const tasks = new v1.TaskService(address, credentials, writer);
const sessions = new v1.SessionService(address, credentials, writer);
const achievements = new v1.AchievementService(address, credentials, writer);
const audit = new v1.AuditLogService(address, credentials, options(process.env.AGENTSTORE_ADMIN_KEY));
const anonymous = new v1.AgentService(address, credentials, options(undefined));
const health = new loaded.grpc.health.v1.Health(address, credentials, options(undefined));

async function failure(promise) {
  try {
    await promise;
  } catch (error) {
    const d = errorDetails(error);
    return { code: d.code, reason: d.reason, domain: d.domain ?? null, fields: d.fieldViolations.map((v) => v.field) };
  }
  return { code: "OK" };
}

const run = randomUUID().slice(0, 8);
const skill = `node-${run}`;
const seen = { run };

// Agents: create, get, list with a filter, update with etag and mask, delete with etag.
const created = await call(agents, "CreateAgent", {
  agent: { name: `agent-${run}`, role: "planner", capabilities: [skill], metadata: toStruct({ region: "eu", n: 2 }) },
  request_id: randomUUID(),
});
const doomed = await call(agents, "CreateAgent", {
  agent: { name: `doomed-${run}`, capabilities: [skill], metadata: toStruct({ region: "eu" }) },
});
seen.agent = {
  metadata: fromStruct(created.metadata),
  status: created.status,
  created_recently: Math.abs(Date.now() - toDate(created.create_time).getTime()) < 600_000,
  got: (await call(agents, "GetAgent", { id: created.id })).etag === created.etag,
};
const listed = await call(agents, "ListAgents", { filter: `capabilities:"${skill}" AND metadata.region = "eu"`, order_by: "name" });
seen.agent.listed = listed.agents.map((a) => a.name);
const patch = { agent: { id: created.id, role: "lead", etag: created.etag }, update_mask: { paths: ["role"] } };
seen.agent.updated_role = (await call(agents, "UpdateAgent", patch)).role;
seen.agent.stale = await failure(call(agents, "UpdateAgent", patch));
seen.agent.delete_stale = await failure(call(agents, "DeleteAgent", { id: doomed.id, etag: '"999"' }));
await call(agents, "DeleteAgent", { id: doomed.id, etag: doomed.etag });
seen.agent.after_delete = await failure(call(agents, "GetAgent", { id: doomed.id }));

// Tasks: claim (Duration message) and complete (int64 token as a string, Struct result).
const task = await call(tasks, "CreateTask", { task: { title: `node task ${run}`, priority: 7, required_capabilities: [skill] } });
const claimed = await call(tasks, "ClaimTask", { agent_id: created.id, lease_duration: duration(30) });
const done = await call(tasks, "CompleteTask", { task_id: task.id, lease_token: claimed.lease_token, result: toStruct({ pages: 12 }) });
seen.task = {
  claimed_same: claimed.task.id === task.id,
  lease_token: claimed.lease_token,
  status: done.status,
  result: fromStruct(done.result),
  complete_again: await failure(call(tasks, "CompleteTask", { task_id: task.id, lease_token: claimed.lease_token })),
};

// Sessions: create with a ttl and state, get, update one state key by mask, list, delete.
const session = await call(sessions, "CreateSession", {
  session: { agent_id: created.id, user_id: `user-${run}`, state: toStruct({ step: 1, notes: "start" }), ttl: duration(300) },
});
const updatedSession = await call(sessions, "UpdateSession", {
  session: { id: session.id, etag: session.etag, state: toStruct({ step: 2 }) }, update_mask: { paths: ["state.step"] },
});
const sessionList = await call(sessions, "ListSessions", { agent_id: created.id });
await call(sessions, "DeleteSession", { id: session.id, etag: updatedSession.etag });
seen.session = {
  got_state: fromStruct((await Promise.resolve(updatedSession)).state),
  expires_later: toDate(session.expire_time).getTime() > Date.now(),
  listed: sessionList.sessions.map((s) => s.id).includes(session.id),
  after_delete: await failure(call(sessions, "GetSession", { id: session.id })),
};

// Achievements and the leaderboard: the completion above earned the first-task achievement.
const earned = await call(achievements, "ListAchievements", { agent_id: created.id });
const board = await call(achievements, "GetLeaderboard", { top_n: 10, around_agent_id: created.id });
seen.achievements = earned.achievements.map((a) => a.code);
seen.leaderboard = board.entries.filter((e) => e.agent_id === created.id).map((e) => ({ score: e.score, rank: e.rank }));

// Audit logs (admin key), newest first, filtered to this agent.
const logs = await call(audit, "ListAuditLogs", { filter: `entity_id = "${created.id}"` });
seen.audit = logs.audit_logs.map((l) => l.action);

// Rich error details and auth.
seen.errors = {
  invalid_field: await failure(call(agents, "CreateAgent", { agent: { name: "" } })),
  bad_filter: await failure(call(agents, "ListAgents", { filter: "nonsense ===" })),
  unauthenticated: await failure(call(anonymous, "GetAgent", { id: created.id })),
};

// Health: Check, and the first message of a Watch stream.
seen.health = { check: (await call(health, "Check", { service: "" })).status };
seen.health.watch = await new Promise((resolve, reject) => {
  const stream = health.Watch({ service: "agentstore.v1.AgentService" });
  stream.on("data", (message) => { resolve(message.status); stream.cancel(); });
  stream.on("error", (error) => { if (error.code !== grpc.status.CANCELLED) reject(error); });
});

for (const client of [agents, tasks, sessions, achievements, audit, anonymous, health]) client.close();
console.log(JSON.stringify(seen));
