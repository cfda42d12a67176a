// What the two examples share: flags, the channel and token, the request, and the output lines
// of clients/README.md.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { credentials, Metadata, status, type ServiceError } from "@grpc/grpc-js";
import {
  type BatchResult,
  CanvasGatewayServiceClient,
  CanvasTrigger,
  Outcome,
  outcomeToJSON,
  Recipient,
  SendOptions,
  type SendSummary,
} from "../gen/canvas_gateway/v1/canvas_gateway";
import { codeToJSON } from "../gen/google/rpc/code";
import { BadRequest } from "../gen/google/rpc/error_details";
import { errorDetail } from "../status";

export const EXIT_SENT = 0;
export const EXIT_NOT_SENT = 1;
export const EXIT_USAGE = 2;
export const EXIT_RPC_FAILED = 3;

export type Program = "send-stream" | "send";

export interface Options {
  target: string;
  tls: boolean;
  caCert: Buffer | undefined; // the --ca-file PEM
  canvasId: string;
  recipients: number;
  chunkSize: number;
  badEmail: boolean;
  idempotencyKey: string; // SendOptions.idempotency_key; "" sends without one
  contextKeys: number; // more keys key-0 ... key-<N-1> in the top-level context and each recipient's
  token: string;
}

/** UsageError is a bad flag or a missing token: the program prints it and exits 2. */
export class UsageError extends Error {}

const USAGE: Record<Program, string> = {
  "send-stream":
    "usage: send-stream [--target HOST:PORT] [--tls] [--ca-file PEM] [--canvas-id ID] [--recipients N] [--chunk-size N] [--idempotency-key KEY] [--context-keys N]",
  send: "usage: send [--target HOST:PORT] [--tls] [--ca-file PEM] [--canvas-id ID] [--recipients N] [--bad-email] [--idempotency-key KEY] [--context-keys N]",
};

function integer(flag: string, value: string | undefined, fallback: number, min: number): number {
  if (value === undefined) return fallback;
  if (!/^\d+$/.test(value) || Number(value) < min) {
    throw new UsageError(`--${flag} must be an integer >= ${min}, not ${JSON.stringify(value)}`);
  }
  return Number(value);
}

/** parseOptions reads the flags of clients/README.md and the token from CANVAS_GATEWAY_TOKEN. */
export function parseOptions(program: Program, args: string[]): Options {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      strict: true,
      allowPositionals: false,
      options: {
        target: { type: "string", default: "127.0.0.1:50051" },
        tls: { type: "boolean", default: false },
        "ca-file": { type: "string" },
        "canvas-id": { type: "string", default: "canvas-gateway-demo" },
        recipients: { type: "string" },
        "chunk-size": { type: "string" },
        "bad-email": { type: "boolean", default: false },
        "idempotency-key": { type: "string", default: "" },
        "context-keys": { type: "string" },
      },
    }));
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
  if (program === "send" && values["chunk-size"] !== undefined) {
    throw new UsageError("--chunk-size is a send-stream flag");
  }
  if (program === "send-stream" && values["bad-email"]) {
    throw new UsageError("--bad-email is a send flag");
  }
  let caCert: Buffer | undefined;
  if (values["ca-file"] !== undefined) {
    try {
      caCert = readFileSync(values["ca-file"]);
    } catch (error) {
      throw new UsageError(`--ca-file: ${(error as Error).message}`);
    }
  }
  const token = process.env.CANVAS_GATEWAY_TOKEN;
  if (!token) {
    throw new UsageError("set CANVAS_GATEWAY_TOKEN to the gateway's bearer token");
  }
  return {
    target: values.target,
    tls: values.tls || caCert !== undefined,
    caCert,
    canvasId: values["canvas-id"],
    recipients: integer("recipients", values.recipients, program === "send" ? 120 : 1000, 0),
    chunkSize: integer("chunk-size", values["chunk-size"], 500, 1),
    badEmail: values["bad-email"],
    idempotencyKey: values["idempotency-key"],
    contextKeys: integer("context-keys", values["context-keys"], 0, 0),
    token,
  };
}

/** dial opens a channel: plaintext, or TLS trusting the system's roots or the CA file. */
export function dial(options: Options): CanvasGatewayServiceClient {
  const channelCredentials = options.tls
    ? credentials.createSsl(options.caCert ?? null)
    : credentials.createInsecure();
  return new CanvasGatewayServiceClient(options.target, channelCredentials);
}

/** authorization is the call metadata carrying the bearer token. */
export function authorization(token: string): Metadata {
  const metadata = new Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  return metadata;
}

/** recipients returns `count` recipients user-<i> from i = `from`, each with the context {"index": i}
 * and `keys` more keys (--context-keys). */
export function recipients(count: number, from = 0, keys = 0): Recipient[] {
  return Array.from({ length: count }, (_, k) => {
    const i = from + k;
    return Recipient.create({
      identifier: { $case: "externalUserId", value: `user-${i}` },
      context: contextOf("index", i, keys),
    });
  });
}

/** trigger is the Canvas, the top-level context (with `keys` more keys) and the recipients given. */
export function trigger(canvasId: string, people: Recipient[] = [], keys = 0): CanvasTrigger {
  return CanvasTrigger.create({ canvasId, context: contextOf("campaign", "example", keys), recipients: people });
}

/** contextOf is {name: value} and `keys` more keys key-<j>: j, inserted in a random order: ts-proto
 * writes a Struct's entries in insertion order, and a repeat is the same request in another order
 * (as grpc-go writes maps). */
function contextOf(name: string, value: unknown, keys: number): Record<string, unknown> {
  const entries: [string, unknown][] = [[name, value]];
  for (let j = 0; j < keys; j++) {
    entries.push([`key-${j}`, j]);
  }
  for (let i = entries.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [entries[i], entries[j]] = [entries[j], entries[i]];
  }
  return Object.fromEntries(entries);
}

/** sendOptions is the request's SendOptions: the idempotency key, if any. */
export function sendOptions(options: Options): SendOptions | undefined {
  return options.idempotencyKey ? SendOptions.create({ idempotencyKey: options.idempotencyKey }) : undefined;
}

/** resultLine ends with ` replayed=true` when the result was kept from an earlier call under the
 * same idempotency key. */
export function resultLine(result: BatchResult): string {
  const fields = [
    "result",
    `batch=${result.batchIndex}`,
    `outcome=${outcomeToJSON(result.outcome)}`,
    `code=${codeToJSON(result.code)}`,
    `recipients=${result.positions.length}`,
    `first=${result.positions[0] ?? "-"}`,
    `dispatch_id=${result.braze?.dispatchId || "-"}`,
  ];
  if (result.replayed) {
    fields.push("replayed=true");
  }
  return fields.join(" ");
}

export function summaryLine(summary: SendSummary): string {
  return [
    "summary",
    `recipients=${summary.recipients}`,
    `batches=${summary.batches}`,
    `sent=${summary.recipientsSent}`,
    `request_id=${summary.requestId || "-"}`,
  ].join(" ");
}

/** exitStatus is 0 when every result is SENT, else 1. */
export function exitStatus(results: BatchResult[]): number {
  return results.every((r) => r.outcome === Outcome.OUTCOME_SENT) ? EXIT_SENT : EXIT_NOT_SENT;
}

/** reportError prints a failed RPC and its BadRequest field violations to stderr; returns 3. */
export function reportError(error: ServiceError): number {
  const message = error.details.replace(/\s*[\r\n]+\s*/g, " ").trim(); // one line, whatever grpc-js says
  console.error(`error code=${status[error.code] ?? error.code} message=${message}`);
  const badRequest = errorDetail(error, "google.rpc.BadRequest", BadRequest);
  for (const violation of badRequest?.fieldViolations ?? []) {
    console.error(`violation field=${violation.field} description=${violation.description}`);
  }
  return EXIT_RPC_FAILED;
}

/** main runs an example: a usage error exits 2, anything else exits with what `run` returns. */
export function main(program: Program, run: (options: Options) => Promise<number>): void {
  let options: Options;
  try {
    options = parseOptions(program, process.argv.slice(2));
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`${program}: ${error.message}\n${USAGE[program]}`);
    process.exitCode = EXIT_USAGE;
    return;
  }
  run(options).then(
    (code) => {
      process.exitCode = code;
    },
    (error: unknown) => {
      console.error(`${program}: ${error instanceof Error ? error.message : String(error)}`);
      process.exitCode = EXIT_RPC_FAILED;
    },
  );
}
