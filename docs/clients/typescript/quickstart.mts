// agentstore from TypeScript with connect-es over gRPC (docs/clients/typescript.md).
//
//   npm install @connectrpc/connect @connectrpc/connect-node @bufbuild/protobuf
//   make clients   # or use the committed clients/typescript/src/gen
//   npx tsc -p clients/typescript/tsconfig.json && node build/typescript/docs/clients/typescript/quickstart.mjs
//
// Creates agents, gets one, lists them with a filter in pages, updates one with its etag and a
// field mask, claims and completes a task, decodes a typed error, checks health, and prints what it
// saw as one JSON object. Reads AGENTSTORE_ADDRESS (127.0.0.1:50051) and AGENTSTORE_API_KEY.

import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";

import { create } from "@bufbuild/protobuf";
import { DurationSchema, FieldMaskSchema, timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { AgentService } from "../../../clients/typescript/src/gen/agentstore/v1/agent_service_pb.js";
import { TaskService } from "../../../clients/typescript/src/gen/agentstore/v1/task_service_pb.js";
import { TaskStatusSchema } from "../../../clients/typescript/src/gen/agentstore/v1/task_pb.js";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "../../../clients/typescript/src/gen/google/rpc/error_details_pb.js";
import { Health, HealthCheckResponse_ServingStatusSchema } from "../../../clients/typescript/src/gen/grpc/health/v1/health_pb.js";

// Every call carries the API key and an x-request-id (the server echoes it and logs it).
export function withKey(apiKey: string | undefined): Interceptor {
  return (next) => async (request) => {
    if (apiKey) request.header.set("authorization", `Bearer ${apiKey}`);
    if (!request.header.has("x-request-id")) request.header.set("x-request-id", randomUUID());
    return next(request);
  };
}

// connect-es does not read gRPC service configs; this interceptor applies the published policy
// (clients/python/src/agentstore/client/service_config.json) to unary calls: UNAVAILABLE is retried
// up to 5 attempts, backing off from 0.1 s, doubling, at most 5 s, with jitter.
export const retryUnavailable: Interceptor = (next) => async (request) => {
  for (let attempt = 1, backoff = 0.1; ; attempt++, backoff = Math.min(backoff * 2, 5)) {
    try {
      return await next(request);
    } catch (error) {
      if (request.stream || attempt >= 5 || ConnectError.from(error).code !== Code.Unavailable) throw error;
      await new Promise((resolve) => setTimeout(resolve, Math.random() * backoff * 1000));
    }
  }
};

export interface Clients {
  agents: Client<typeof AgentService>;
  tasks: Client<typeof TaskService>;
  health: Client<typeof Health>;
}

export function connect(address: string, apiKey: string | undefined): Clients {
  const transport = createGrpcTransport({
    baseUrl: `http://${address}`,
    interceptors: [withKey(apiKey), retryUnavailable],
  });
  return {
    agents: createClient(AgentService, transport),
    tasks: createClient(TaskService, transport),
    health: createClient(Health, transport),
  };
}

export interface ErrorDetails {
  code: string;
  message: string;
  reason: string | undefined;
  domain: string | undefined;
  fields: string[];
  retryDelaySeconds: number | undefined;
}

// The gRPC transport decodes grpc-status-details-bin; findDetails picks the typed details out.
export function errorDetails(error: unknown): ErrorDetails {
  const connectError = ConnectError.from(error);
  const [info] = connectError.findDetails(ErrorInfoSchema);
  const [retry] = connectError.findDetails(RetryInfoSchema);
  return {
    code: Code[connectError.code],
    message: connectError.rawMessage,
    reason: info?.reason,
    domain: info?.domain,
    fields: connectError.findDetails(BadRequestSchema).flatMap((b) => b.fieldViolations.map((v) => v.field)),
    retryDelaySeconds: retry?.retryDelay ? Number(retry.retryDelay.seconds) + retry.retryDelay.nanos / 1e9 : undefined,
  };
}

async function main(): Promise<void> {
  const { agents, tasks, health } = connect(process.env.AGENTSTORE_ADDRESS ?? "127.0.0.1:50051", process.env.AGENTSTORE_API_KEY);
  const run = randomUUID().slice(0, 8);
  const skill = `ts-${run}`;
  const seen: Record<string, unknown> = {};

  // Create (google.protobuf.Struct fields are plain JSON objects in protobuf-es).
  const created = await agents.createAgent({
    agent: { name: `planner-${run}`, role: "planner", capabilities: [skill], metadata: { region: "eu" } },
    requestId: randomUUID(),
  });
  for (const i of [0, 1]) {
    await agents.createAgent({ agent: { name: `worker-${run}-${i}`, capabilities: [skill], metadata: { region: "eu" } } });
  }
  seen.created = created.name;
  seen.metadata = created.metadata;
  seen.created_at = created.createTime ? timestampDate(created.createTime).toISOString() : null;

  // Get
  const got = await agents.getAgent({ id: created.id });
  seen.got_same_etag = got.etag === created.etag;

  // List with a filter, two per page, following nextPageToken.
  const listed: string[] = [];
  let pages = 0;
  let pageToken = "";
  do {
    const page = await agents.listAgents({
      filter: `capabilities:"${skill}" AND metadata.region = "eu"`, orderBy: "name", pageSize: 2, pageToken,
    });
    pages += 1;
    listed.push(...page.agents.map((a) => a.name));
    pageToken = page.nextPageToken;
  } while (pageToken);
  Object.assign(seen, { listed, pages });

  // Update one field by mask, guarded by the etag; the same stale etag again is a typed error.
  const patch = {
    agent: { id: got.id, role: "lead", etag: got.etag },
    updateMask: create(FieldMaskSchema, { paths: ["role"] }),
  };
  seen.updated_role = (await agents.updateAgent(patch)).role;
  try {
    await agents.updateAgent(patch);
  } catch (error) {
    const stale = errorDetails(error);
    seen.stale_update = { code: stale.code, reason: stale.reason };
  }

  // Claim a task (a 60 s lease) and complete it with its int64 (bigint) lease token.
  await tasks.createTask({ task: { title: "index the docs", priority: 5, requiredCapabilities: [skill] } });
  const claimed = await tasks.claimTask({ agentId: created.id, leaseDuration: create(DurationSchema, { seconds: 60n }) });
  seen.claimed_lease_token = claimed.leaseToken.toString();
  const done = await tasks.completeTask({ taskId: claimed.task?.id ?? "", leaseToken: claimed.leaseToken, result: { pages: 12 } });
  seen.completed_status = TaskStatusSchema.value[done.status]?.name;

  // A typed error: ErrorInfo.reason to switch on, BadRequest naming the field.
  try {
    await agents.getAgent({ id: "not-a-uuid" });
  } catch (error) {
    const details = errorDetails(error);
    seen.error = { code: details.code, reason: details.reason, fields: details.fields };
  }

  // Health (no key needed; "" is the whole server).
  const status = (await health.check({ service: "" })).status;
  seen.health = HealthCheckResponse_ServingStatusSchema.value[status]?.name;

  console.log(JSON.stringify(seen));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  await main();
}
