// The interop workflow through the generated TypeScript (protobuf-es + connect-es over gRPC): the
// same steps and the same JSON as tests/interop/node/workflow.mjs, checked by tests/interop/test_typescript.py.
// Reads AGENTSTORE_ADDRESS, AGENTSTORE_WRITER_KEY, AGENTSTORE_ADMIN_KEY.

import { randomUUID } from "node:crypto";

import { create } from "@bufbuild/protobuf";
import { DurationSchema, timestampDate } from "@bufbuild/protobuf/wkt";
import { createClient, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { errorDetails, retryUnavailable, withKey } from "../../../docs/clients/typescript/quickstart.mjs";
import { AchievementService } from "../../../clients/typescript/src/gen/agentstore/v1/achievement_service_pb.js";
import { AgentStatusSchema } from "../../../clients/typescript/src/gen/agentstore/v1/agent_pb.js";
import { AgentService } from "../../../clients/typescript/src/gen/agentstore/v1/agent_service_pb.js";
import { AuditLogService } from "../../../clients/typescript/src/gen/agentstore/v1/audit_log_service_pb.js";
import { SessionService } from "../../../clients/typescript/src/gen/agentstore/v1/session_service_pb.js";
import { TaskStatusSchema } from "../../../clients/typescript/src/gen/agentstore/v1/task_pb.js";
import { TaskService } from "../../../clients/typescript/src/gen/agentstore/v1/task_service_pb.js";
import {
  Health, HealthCheckResponse_ServingStatusSchema, type HealthCheckResponse_ServingStatus,
} from "../../../clients/typescript/src/gen/grpc/health/v1/health_pb.js";

const address = process.env.AGENTSTORE_ADDRESS ?? "127.0.0.1:50051";
function transport(key: string | undefined): Transport {
  return createGrpcTransport({ baseUrl: `http://${address}`, interceptors: [withKey(key), retryUnavailable] });
}
const writer = transport(process.env.AGENTSTORE_WRITER_KEY);
const agents = createClient(AgentService, writer);
const tasks = createClient(TaskService, writer);
const sessions = createClient(SessionService, writer);
const achievements = createClient(AchievementService, writer);
const audit = createClient(AuditLogService, transport(process.env.AGENTSTORE_ADMIN_KEY));
const anonymous = createClient(AgentService, transport(undefined));
const health = createClient(Health, transport(undefined));

interface Failure { code: string; reason?: string | null; domain?: string | null; fields?: string[] }
async function failure(promise: Promise<unknown>): Promise<Failure> {
  try {
    await promise;
  } catch (error) {
    const d = errorDetails(error);
    return { code: d.code, reason: d.reason ?? null, domain: d.domain ?? null, fields: d.fields };
  }
  return { code: "OK" };
}
const seconds = (n: number) => create(DurationSchema, { seconds: BigInt(n) });
const servingName = (status: HealthCheckResponse_ServingStatus) => HealthCheckResponse_ServingStatusSchema.value[status]?.name;

const run = randomUUID().slice(0, 8);
const skill = `ts-${run}`;
const seen: Record<string, unknown> = { run };

// Agents: create, get, list with a filter, update with etag and mask, delete with etag.
const created = await agents.createAgent({
  agent: { name: `agent-${run}`, role: "planner", capabilities: [skill], metadata: { region: "eu", n: 2 } },
  requestId: randomUUID(),
});
const doomed = await agents.createAgent({ agent: { name: `doomed-${run}`, capabilities: [skill], metadata: { region: "eu" } } });
const got = await agents.getAgent({ id: created.id });
const listed = await agents.listAgents({ filter: `capabilities:"${skill}" AND metadata.region = "eu"`, orderBy: "name" });
const patch = { agent: { id: created.id, role: "lead", etag: created.etag }, updateMask: { paths: ["role"] } };
const updated = await agents.updateAgent(patch);
seen.agent = {
  metadata: created.metadata,
  status: AgentStatusSchema.value[created.status]?.name,
  created_recently: created.createTime !== undefined && Math.abs(Date.now() - timestampDate(created.createTime).getTime()) < 600_000,
  got: got.etag === created.etag,
  listed: listed.agents.map((a) => a.name),
  updated_role: updated.role,
  stale: await failure(agents.updateAgent(patch)),
  delete_stale: await failure(agents.deleteAgent({ id: doomed.id, etag: '"999"' })),
};
await agents.deleteAgent({ id: doomed.id, etag: doomed.etag });
Object.assign(seen.agent as object, { after_delete: await failure(agents.getAgent({ id: doomed.id })) });

// Tasks: claim (a Duration) and complete (a bigint lease token, a JSON result).
const task = await tasks.createTask({ task: { title: `ts task ${run}`, priority: 7, requiredCapabilities: [skill] } });
const claimed = await tasks.claimTask({ agentId: created.id, leaseDuration: seconds(30) });
const done = await tasks.completeTask({ taskId: task.id, leaseToken: claimed.leaseToken, result: { pages: 12 } });
seen.task = {
  claimed_same: claimed.task?.id === task.id,
  lease_token: claimed.leaseToken.toString(),
  status: TaskStatusSchema.value[done.status]?.name,
  result: done.result,
  complete_again: await failure(tasks.completeTask({ taskId: task.id, leaseToken: claimed.leaseToken })),
};

// Sessions: create with a ttl and state, update one state key by mask, list, delete.
const session = await sessions.createSession({
  session: { agentId: created.id, userId: `user-${run}`, state: { step: 1, notes: "start" }, ttl: seconds(300) },
});
const updatedSession = await sessions.updateSession({
  session: { id: session.id, etag: session.etag, state: { step: 2 } }, updateMask: { paths: ["state.step"] },
});
const sessionList = await sessions.listSessions({ agentId: created.id });
await sessions.deleteSession({ id: session.id, etag: updatedSession.etag });
seen.session = {
  got_state: updatedSession.state,
  expires_later: session.expireTime !== undefined && timestampDate(session.expireTime).getTime() > Date.now(),
  listed: sessionList.sessions.some((s) => s.id === session.id),
  after_delete: await failure(sessions.getSession({ id: session.id })),
};

// Achievements and the leaderboard.
seen.achievements = (await achievements.listAchievements({ agentId: created.id })).achievements.map((a) => a.code);
const board = await achievements.getLeaderboard({ topN: 10, aroundAgentId: created.id });
seen.leaderboard = board.entries.filter((e) => e.agentId === created.id).map((e) => ({ score: e.score.toString(), rank: e.rank }));

// Audit logs (admin key), newest first.
seen.audit = (await audit.listAuditLogs({ filter: `entity_id = "${created.id}"` })).auditLogs.map((l) => l.action);

// Rich error details and auth.
seen.errors = {
  invalid_field: await failure(agents.createAgent({ agent: { name: "" } })),
  bad_filter: await failure(agents.listAgents({ filter: "nonsense ===" })),
  unauthenticated: await failure(anonymous.getAgent({ id: created.id })),
};

// Health: Check, and the first message of a Watch stream (leaving the loop cancels the stream).
const check = await health.check({ service: "" });
let watched: string | undefined;
for await (const message of health.watch({ service: "agentstore.v1.AgentService" })) {
  watched = servingName(message.status);
  break;
}
seen.health = { check: servingName(check.status), watch: watched };

console.log(JSON.stringify(seen));
