// agentstore from Node.js with @grpc/grpc-js and @grpc/proto-loader (docs/clients/node.md).
//
//   npm install @grpc/grpc-js @grpc/proto-loader protobufjs
//   AGENTSTORE_API_KEY=$(cat .agentstore/demo-api-key) node docs/clients/node/quickstart.mjs
//
// Loads the .proto files at run time (no code generation). Creates agents, gets one, lists them with
// a filter in pages, updates one with its etag and a field mask, claims and completes a task, decodes
// a typed error, checks health, and prints what it saw as one JSON object.

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const REPO = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const PROTOS = join(REPO, "protos"); // agentstore/v1/*.proto
const THIRD_PARTY = join(REPO, "clients", "third_party"); // google/rpc/*.proto, grpc/health/v1/health.proto
// The published service config: retry UNAVAILABLE with backoff (grpc-js honours retryPolicy).
export const SERVICE_CONFIG = readFileSync(
  join(REPO, "clients", "python", "src", "agentstore", "client", "service_config.json"),
  "utf8",
);

// The loader options that avoid proto-loader's silent surprises:
export const LOADER_OPTIONS = {
  keepCase: true, // field names exactly as in the .proto (snake_case), like grpcurl and every other client;
  //                 with the default (false) a snake_case key in a request is silently ignored.
  longs: String, // int64 (lease_token, Duration.seconds) as decimal strings, not Long objects
  enums: String, // enum values as names ("TASK_STATUS_SUCCEEDED"), not numbers
  defaults: true, // absent fields come back as their zero values, not undefined
  oneofs: true, // a virtual property names the member set in each oneof (google.protobuf.Value's kind)
  includeDirs: [PROTOS, THIRD_PARTY],
};

// --- helpers for the well-known types, which proto-loader does not convert ---------------------

// google.protobuf.Struct: a plain object given as a Struct field is silently dropped; wrap it.
// The well-known types come from protobufjs's bundled definitions, whose field names are camelCase
// (stringValue, not string_value) even with keepCase: true; a snake_case key here is dropped too.
function toValue(v) {
  if (v === null || v === undefined) return { nullValue: "NULL_VALUE" };
  if (typeof v === "number") return { numberValue: v };
  if (typeof v === "string") return { stringValue: v };
  if (typeof v === "boolean") return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}
export function toStruct(object) {
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, toValue(v)])) };
}
function fromValue(value) {
  switch (value.kind) { // set by oneofs: true
    case "structValue": return fromStruct(value.structValue);
    case "listValue": return value.listValue.values.map(fromValue);
    case "nullValue": return null;
    default: return value[value.kind];
  }
}
export function fromStruct(struct) {
  return Object.fromEntries(Object.entries(struct?.fields ?? {}).map(([k, v]) => [k, fromValue(v)]));
}
// google.protobuf.Duration: "60s" is the JSON form only; over gRPC it is {seconds, nanos}.
export function duration(seconds) {
  return { seconds: String(Math.trunc(seconds)), nanos: Math.round((seconds % 1) * 1e9) };
}
// google.protobuf.Timestamp → Date (seconds arrive as a string because of longs: String).
export function toDate(timestamp) {
  return new Date(Number(timestamp.seconds) * 1000 + Math.floor(timestamp.nanos / 1e6));
}

// --- the rich error model: google.rpc.Status in the grpc-status-details-bin trailer ---------------

const errorTypes = new protobuf.Root();
errorTypes.resolvePath = (_origin, target) => join(THIRD_PARTY, target);
errorTypes.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
const Status = errorTypes.lookupType("google.rpc.Status");

// {code, message, reason, domain, metadata, fieldViolations, retryDelaySeconds} of a failed call.
export function errorDetails(error) {
  const decoded = { code: grpc.status[error.code], message: error.details, reason: null, fieldViolations: [] };
  const [raw] = error.metadata?.get("grpc-status-details-bin") ?? [];
  if (!raw) return decoded;
  for (const any of Status.decode(raw).details) {
    const type = errorTypes.lookupType(any.type_url.slice(any.type_url.lastIndexOf("/") + 1));
    const detail = type.toObject(type.decode(any.value), { longs: String, defaults: true });
    if (type.fullName === ".google.rpc.ErrorInfo") Object.assign(decoded, { reason: detail.reason, domain: detail.domain, metadata: detail.metadata });
    if (type.fullName === ".google.rpc.BadRequest") decoded.fieldViolations.push(...detail.field_violations);
    if (type.fullName === ".google.rpc.RetryInfo") decoded.retryDelaySeconds = Number(detail.retry_delay.seconds) + detail.retry_delay.nanos / 1e9;
  }
  return decoded;
}

// --- a client: every call carries the API key and a fresh x-request-id ---------------------------

export function withKey(apiKey) {
  return (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        if (apiKey) metadata.set("authorization", `Bearer ${apiKey}`);
        if (metadata.get("x-request-id").length === 0) metadata.set("x-request-id", randomUUID());
        next(metadata, listener);
      },
    });
}

export function connect(address, apiKey) {
  const definition = protoLoader.loadSync(
    ["agentstore/v1/agent_service.proto", "agentstore/v1/task_service.proto", "grpc/health/v1/health.proto"],
    LOADER_OPTIONS,
  );
  const loaded = grpc.loadPackageDefinition(definition);
  const options = { interceptors: [withKey(apiKey)], "grpc.service_config": SERVICE_CONFIG };
  const credentials = grpc.credentials.createInsecure();
  const v1 = loaded.agentstore.v1;
  return {
    agents: new v1.AgentService(address, credentials, options),
    tasks: new v1.TaskService(address, credentials, options),
    health: new loaded.grpc.health.v1.Health(address, credentials, options),
  };
}

// Promise form of a unary call: grpc-js clients take callbacks.
export function call(client, method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, { deadline: Date.now() + 10_000 }, (error, response) => (error ? reject(error) : resolve(response))),
  );
}

async function main() {
  const address = process.env.AGENTSTORE_ADDRESS ?? "127.0.0.1:50051";
  const { agents, tasks, health } = connect(address, process.env.AGENTSTORE_API_KEY);
  const run = randomUUID().slice(0, 8);
  const skill = `node-${run}`;
  const seen = {};

  // Create (request_id makes a retried create return the first result).
  const created = await call(agents, "CreateAgent", {
    agent: { name: `planner-${run}`, role: "planner", capabilities: [skill], metadata: toStruct({ region: "eu" }) },
    request_id: randomUUID(),
  });
  for (const i of [0, 1]) {
    await call(agents, "CreateAgent", { agent: { name: `worker-${run}-${i}`, capabilities: [skill], metadata: toStruct({ region: "eu" }) } });
  }
  seen.created = created.name;
  seen.metadata = fromStruct(created.metadata);
  seen.created_at = toDate(created.create_time).toISOString();

  // Get
  const got = await call(agents, "GetAgent", { id: created.id });
  seen.got_same_etag = got.etag === created.etag;

  // List with a filter, two per page, following next_page_token.
  seen.listed = [];
  seen.pages = 0;
  let page_token = "";
  do {
    const page = await call(agents, "ListAgents", {
      filter: `capabilities:"${skill}" AND metadata.region = "eu"`, order_by: "name", page_size: 2, page_token,
    });
    seen.pages += 1;
    seen.listed.push(...page.agents.map((a) => a.name));
    page_token = page.next_page_token;
  } while (page_token);

  // Update one field by mask, guarded by the etag; the same stale etag again is a typed error.
  const patch = { agent: { id: got.id, role: "lead", etag: got.etag }, update_mask: { paths: ["role"] } };
  seen.updated_role = (await call(agents, "UpdateAgent", patch)).role;
  try {
    await call(agents, "UpdateAgent", patch);
  } catch (error) {
    const stale = errorDetails(error);
    seen.stale_update = { code: stale.code, reason: stale.reason };
  }

  // Claim a task (lease as a Duration message) and complete it with its int64 lease token.
  await call(tasks, "CreateTask", { task: { title: "index the docs", priority: 5, required_capabilities: [skill] } });
  const claimed = await call(tasks, "ClaimTask", { agent_id: created.id, lease_duration: duration(60) });
  seen.claimed_lease_token = claimed.lease_token;
  const done = await call(tasks, "CompleteTask", {
    task_id: claimed.task.id, lease_token: claimed.lease_token, result: toStruct({ pages: 12 }),
  });
  seen.completed_status = done.status;

  // A typed error: ErrorInfo.reason to switch on, BadRequest naming the field.
  try {
    await call(agents, "GetAgent", { id: "not-a-uuid" });
  } catch (error) {
    const details = errorDetails(error);
    seen.error = { code: details.code, reason: details.reason, fields: details.fieldViolations.map((v) => v.field) };
  }

  // Health (no key needed; "" is the whole server).
  seen.health = (await call(health, "Check", { service: "" })).status;

  for (const client of [agents, tasks, health]) client.close();
  console.log(JSON.stringify(seen));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  await main();
}
