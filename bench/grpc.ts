// gRPC in the bench: one unary method of a generic service, its app (`node dist/bench/grpc.js 0`,
// pinned to the proxies' core like app.ts, prints {"port":N} once it listens) and the client side
// the load generator drives (load.ts imports this file only for a gRPC run). Messages are raw
// bytes, no protobuf: what differs between the paths is then the proxies and HTTP/2 alone, as with
// app.ts's fixed answer. A request "xfcc" is answered with the x-forwarded-client-cert metadata the
// app received, which lets the harness check that a call really came through an mTLS pair.
import { pathToFileURL } from "node:url";
import * as grpc from "@grpc/grpc-js";
import type { Sender, Target } from "./load.js";

export const UNARY = "/ashmesh.bench.v1.Echo/Unary";
const ANSWER = Buffer.from('{"ok":true,"service":"search","items":[1,2,3]}');
const REQUEST = Buffer.from("ping");
export const XFCC_REQUEST = Buffer.from("xfcc");

const bytes = (b: Buffer) => b;
const SERVICE = {
  Unary: {
    path: UNARY,
    requestStream: false,
    responseStream: false,
    requestSerialize: bytes,
    requestDeserialize: bytes,
    responseSerialize: bytes,
    responseDeserialize: bytes,
  },
} as grpc.ServiceDefinition;

/** The message's status as the load generator counts errors: GRPC_UNAVAILABLE, GRPC_DEADLINE_EXCEEDED, ... */
function statusError(err: grpc.ServiceError): Error {
  const name = grpc.status[err.code] ?? String(err.code);
  return Object.assign(new Error(err.details || name), { code: `GRPC_${name}` });
}

/**
 * One channel to `target.origin` (http://host:port, cleartext HTTP/2 with prior knowledge): a
 * gRPC client multiplexes its calls over one connection, so the load generator's `connections`
 * does not apply. A local subchannel pool keeps each run's channel its own.
 */
export function grpcSender(target: Target, timeoutMs: number): Sender {
  const client = new grpc.Client(new URL(target.origin).host, grpc.credentials.createInsecure(), {
    "grpc.use_local_subchannel_pool": 1,
  });
  return {
    send: (done) =>
      client.makeUnaryRequest(
        target.path,
        bytes,
        bytes,
        REQUEST,
        { deadline: Date.now() + timeoutMs },
        (err: grpc.ServiceError | null) => (err ? done(0, statusError(err)) : done(200, null)),
      ),
    close: async () => client.close(),
  };
}

/** One call, its answer as text: the harness's check that a path works before any load. */
export function callOnce(address: string, message: Buffer, timeoutMs = 5_000): Promise<string> {
  const client = new grpc.Client(address, grpc.credentials.createInsecure());
  return new Promise<string>((resolve, reject) => {
    client.makeUnaryRequest(UNARY, bytes, bytes, message, { deadline: Date.now() + timeoutMs }, (err, answer) =>
      err ? reject(statusError(err)) : resolve((answer as Buffer).toString("utf8")),
    );
  }).finally(() => client.close());
}

async function main(): Promise<void> {
  const server = new grpc.Server();
  server.addService(SERVICE, {
    Unary: (call: grpc.ServerUnaryCall<Buffer, Buffer>, answer: grpc.sendUnaryData<Buffer>) => {
      if (call.request.equals(XFCC_REQUEST)) {
        answer(null, Buffer.from(String(call.metadata.get("x-forwarded-client-cert")[0] ?? "")));
      } else answer(null, ANSWER);
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync(`127.0.0.1:${Number(process.argv[2] ?? 0)}`, grpc.ServerCredentials.createInsecure(), (err, p) =>
      err ? reject(err) : resolve(p),
    ),
  );
  process.stdout.write(`${JSON.stringify({ port })}\n`);
  // The proxies keep their channels open: waiting for them to close would only delay the teardown.
  const stop = () => {
    server.forceShutdown();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exitCode = 1;
  });
}
