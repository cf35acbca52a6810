// A stand-in for one Ashchan service (a PHP Hyperf app in the real mesh): plain HTTP only, no
// TLS code at all. It calls its peers at http://<name>.ashchan.local/... through HTTP_PROXY, as any
// app does once it is moved onto the mesh, and its peers' gRPC methods on the local port its
// sidecar maps to each of them; it answers with what it saw: the caller identity from
// x-forwarded-client-cert and the answers of the calls it made (the post flow of seed 003).
//
// A service with appProtocol: h2c (search) is one cleartext HTTP/2 server for its HTTP routes and
// its gRPC methods alike, as a sidecar has one app behind it. gRPC is spoken with node:http2 and
// nothing else (the image carries no gRPC library): length-prefixed messages, here JSON bytes,
// content-type application/grpc, the status in the trailers grpc-status and grpc-message.
import http from "node:http";
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { loadMesh, type Mesh, type MeshCall, type MeshService, service } from "../config/mesh.js";

export interface HopCall {
  to: string;
  method: string;
  path: string;
  protocol: "http" | "grpc";
  /** The HTTP status (200 for any gRPC answer); 0 when none came. */
  status: number;
  /** gRPC calls: the grpc-status of the answer; null when none came. */
  grpc_status?: number | null;
  error?: string;
  answer?: HopReport;
}

export interface HopReport {
  service: string;
  served_by: string;
  /** The caller's identity, read from x-forwarded-client-cert (DNS=...); null without one. */
  caller: string | null;
  xfcc: string | null;
  calls: HopCall[];
}

/** The DNS identities in an XFCC value (Envoy format: ...;DNS=a;DNS=b). */
export function xfccDns(value: string | undefined): string[] {
  if (!value) return [];
  return [...value.matchAll(/(?:^|;)DNS=("(?:[^"\\]|\\.)*"|[^;,]*)/g)].map((m) => (m[1] ?? "").replace(/^"|"$/g, ""));
}

/** A call succeeded: a 2xx, and for gRPC an OK status besides. */
export function callSucceeded(call: HopCall): boolean {
  const http = call.status >= 200 && call.status < 300;
  return call.protocol === "grpc" ? http && call.grpc_status === 0 : http;
}

/** gRPC status codes the stand-in answers with or names. */
export const GRPC_STATUS_NAMES: Record<number, string> = {
  0: "OK",
  1: "CANCELLED",
  2: "UNKNOWN",
  3: "INVALID_ARGUMENT",
  4: "DEADLINE_EXCEEDED",
  5: "NOT_FOUND",
  7: "PERMISSION_DENIED",
  8: "RESOURCE_EXHAUSTED",
  12: "UNIMPLEMENTED",
  13: "INTERNAL",
  14: "UNAVAILABLE",
};

/** One gRPC message on the wire: a compressed flag (0: not compressed), its length (4 bytes, big-endian), the bytes. */
export function grpcFrame(message: Buffer): Buffer {
  const head = Buffer.alloc(5);
  head.writeUInt32BE(message.length, 1);
  return Buffer.concat([head, message]);
}

/** The messages of a gRPC body; null when it is cut short or compressed (no grpc-encoding is agreed). */
export function grpcMessages(body: Buffer): Buffer[] | null {
  const out: Buffer[] = [];
  let at = 0;
  while (at < body.length) {
    if (body.length - at < 5 || body[at] !== 0) return null;
    const length = body.readUInt32BE(at + 1);
    if (body.length - at - 5 < length) return null;
    out.push(body.subarray(at + 5, at + 5 + length));
    at += 5 + length;
  }
  return out;
}

function callThroughProxy(
  agent: http.Agent,
  proxy: URL,
  url: string,
  method: string,
  body: string,
): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const target = new URL(url);
    const withBody = method !== "GET" && method !== "HEAD";
    const req = http.request(
      {
        host: proxy.hostname,
        port: Number(proxy.port),
        method,
        path: url, // absolute-form: what an HTTP client sends to its HTTP_PROXY
        headers: {
          host: target.host,
          ...(withBody ? { "content-type": "application/json", "content-length": Buffer.byteLength(body) } : {}),
        },
        agent,
        timeout: 10_000,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString("utf8") }));
      },
    );
    req.on("timeout", () => req.destroy(new Error("timed out after 10 s")));
    req.on("error", reject);
    req.end(withBody ? body : undefined);
  });
}

interface GrpcAnswer {
  status: number;
  grpcStatus: number | null;
  grpcMessage: string;
  messages: Buffer[] | null;
}

/** One unary gRPC call on an HTTP/2 session (cleartext, to the sidecar's mapped port). */
function callGrpc(session: http2.ClientHttp2Session, path: string, message: Buffer): Promise<GrpcAnswer> {
  return new Promise((resolve, reject) => {
    const stream = session.request({
      ":method": "POST",
      ":path": path,
      "content-type": "application/grpc",
      te: "trailers",
      // The call's deadline, which the sidecars honour too (answering DEADLINE_EXCEEDED).
      "grpc-timeout": "10S",
    });
    let headers: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders = {};
    const chunks: Buffer[] = [];
    stream.setTimeout(10_000, () => stream.destroy(new Error("timed out after 10 s")));
    stream.on("response", (h) => {
      headers = h;
    });
    stream.on("trailers", (h) => {
      trailers = h;
    });
    stream.on("data", (c: Buffer) => chunks.push(c));
    stream.on("error", reject);
    stream.on("close", () => {
      if (headers[":status"] === undefined) {
        reject(new Error(`the stream closed without an answer (code ${stream.rstCode})`));
        return;
      }
      // A refusal comes Trailers-Only: grpc-status in the one HEADERS frame.
      const status = trailers["grpc-status"] ?? headers["grpc-status"];
      const text = String(trailers["grpc-message"] ?? headers["grpc-message"] ?? "");
      resolve({
        status: Number(headers[":status"]),
        grpcStatus: status === undefined ? null : Number(status),
        grpcMessage: percentDecoded(text),
        messages: grpcMessages(Buffer.concat(chunks)),
      });
    });
    stream.end(grpcFrame(message));
  });
}

/** grpc-message as the spec encodes it: bytes outside printable ASCII, and "%", percent-encoded. */
function percentEncoded(text: string): string {
  let out = "";
  for (const byte of Buffer.from(text, "utf8"))
    out +=
      byte >= 0x20 && byte <= 0x7e && byte !== 0x25
        ? String.fromCharCode(byte)
        : `%${byte.toString(16).padStart(2, "0")}`;
  return out;
}

/** grpc-message is percent-encoded; a sender that got it wrong still gets its words shown. */
function percentDecoded(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

export interface StandinOptions {
  mesh: Mesh;
  key: string;
  /**
   * The sidecar's forward proxy, e.g. http://127.0.0.1:15001 (HTTP_PROXY). Its mapped ports for
   * gRPC callees are on the same address (the mesh file puts every listener of a sidecar on its
   * app's loopback), at each callee's upstreamPort.
   */
  proxy: string;
  host: string;
  port: number;
}

export interface Standin {
  server: http.Server | http2.Http2Server;
  /** Closes the listener and every connection and session, in and out. */
  close(): void;
}

type Request = http.IncomingMessage | http2.Http2ServerRequest;

export function createStandinApp(options: StandinOptions): Standin {
  const self: MeshService = service(options.mesh, options.key);
  const proxy = new URL(options.proxy);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
  const grpcSessions = new Map<string, http2.ClientHttp2Session>();
  // The gRPC methods this service serves: those the mesh file's calls name.
  const grpcMethods = new Set(
    options.mesh.services.flatMap((s) =>
      s.calls.filter((c) => c.protocol === "grpc" && c.to === self.key).map((c) => c.path),
    ),
  );

  const grpcSession = (address: string): http2.ClientHttp2Session => {
    const open = grpcSessions.get(address);
    if (open && !open.closed && !open.destroyed) return open;
    const session = http2.connect(`http://${address}`);
    session.on("error", () => undefined); // a failed session fails its streams, which report it
    session.on("close", () => {
      if (grpcSessions.get(address) === session) grpcSessions.delete(address);
    });
    grpcSessions.set(address, session);
    return session;
  };

  const makeCall = async (call: MeshCall): Promise<HopCall> => {
    const peer = service(options.mesh, call.to);
    const base = { to: peer.dnsName, method: call.method, path: call.path, protocol: call.protocol };
    const request = JSON.stringify({ from: self.key });
    try {
      if (call.protocol === "grpc") {
        const address = `${proxy.hostname}:${peer.upstreamPort}`;
        const answer = await callGrpc(grpcSession(address), call.path, Buffer.from(request));
        const parsed = parseReport(answer.messages?.[0]?.toString("utf8") ?? "");
        const name = GRPC_STATUS_NAMES[answer.grpcStatus ?? -1] ?? "no grpc-status";
        return {
          ...base,
          status: answer.status,
          grpc_status: answer.grpcStatus,
          ...(answer.grpcStatus !== 0
            ? { error: `${answer.grpcStatus ?? "-"} ${name}: ${answer.grpcMessage} (via ${address})` }
            : {}),
          ...(parsed ? { answer: parsed } : {}),
        };
      }
      const answer = await callThroughProxy(agent, proxy, `http://${peer.dnsName}${call.path}`, call.method, request);
      const parsed = parseReport(answer.text);
      return {
        ...base,
        status: answer.status,
        ...(answer.status >= 400 ? { error: answer.text.slice(0, 300) } : {}),
        ...(parsed ? { answer: parsed } : {}),
      };
    } catch (err) {
      return {
        ...base,
        status: 0,
        ...(call.protocol === "grpc" ? { grpc_status: null } : {}),
        error: (err as Error).message,
      };
    }
  };

  /** What this service does for any request: its own calls, in order, and who asked. */
  const serve = async (req: Request): Promise<{ ok: boolean; report: HopReport }> => {
    const xfcc = req.headers["x-forwarded-client-cert"];
    const report: HopReport = {
      service: self.serviceName,
      served_by: self.dnsName,
      caller: xfccDns(typeof xfcc === "string" ? xfcc : undefined)[0] ?? null,
      xfcc: typeof xfcc === "string" ? xfcc : null,
      calls: [],
    };
    for (const call of self.calls) report.calls.push(await makeCall(call));
    return { ok: report.calls.every(callSucceeded), report };
  };

  const onHttp = async (req: Request, reply: (status: number, body: string) => void) => {
    if (req.url === "/health") {
      reply(200, `{"status":"ok","service":"${self.serviceName}"}`);
      return;
    }
    const { ok, report } = await serve(req);
    reply(ok ? 200 : 502, JSON.stringify(report));
  };

  const onGrpc = async (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse, body: Buffer) => {
    const refuse = (code: number, message: string) =>
      // Trailers-Only, as gRPC servers answer a call they do not take.
      res.stream.destroyed ||
      res.stream.respond(
        {
          ":status": 200,
          "content-type": "application/grpc",
          "grpc-status": String(code),
          "grpc-message": percentEncoded(message),
        },
        { endStream: true },
      );
    if (req.method !== "POST" || !grpcMethods.has(req.url)) {
      refuse(12, `${self.dnsName} has no method ${req.method} ${req.url}`);
      return;
    }
    if (grpcMessages(body)?.length !== 1) {
      refuse(3, "expected one uncompressed message (a unary call)");
      return;
    }
    const { ok, report } = await serve(req);
    res.writeHead(200, { "content-type": "application/grpc" });
    res.addTrailers(
      ok
        ? { "grpc-status": "0" }
        : { "grpc-status": "14", "grpc-message": percentEncoded("a call of this service failed") },
    );
    res.end(grpcFrame(Buffer.from(JSON.stringify(report))));
  };

  const reader = (req: Request, then: (body: Buffer) => void) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => then(Buffer.concat(chunks)));
  };
  const closeClients = () => {
    agent.destroy();
    for (const session of grpcSessions.values()) session.destroy();
  };

  if (self.appProtocol === "h2c") {
    // Cleartext HTTP/2 with prior knowledge only: what the sidecar's inbound speaks to an h2c app.
    const server = http2.createServer((req, res) =>
      reader(req, (body) => {
        if (req.headers["content-type"]?.startsWith("application/grpc")) void onGrpc(req, res, body);
        else
          void onHttp(req, (status, text) => {
            res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
            res.end(text);
          });
      }),
    );
    const sessions = new Set<http2.ServerHttp2Session>();
    server.on("session", (session: http2.ServerHttp2Session) => {
      sessions.add(session);
      session.on("close", () => sessions.delete(session));
    });
    server.on("close", closeClients);
    return {
      server,
      close: () => {
        for (const session of sessions) session.destroy();
        server.close();
      },
    };
  }
  const server = http.createServer((req, res) =>
    reader(req, () =>
      onHttp(req, (status, text) => {
        res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
        res.end(text);
      }),
    ),
  );
  server.on("close", closeClients);
  return {
    server,
    close: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

function parseReport(text: string): HopReport | undefined {
  try {
    const parsed = JSON.parse(text) as HopReport;
    return parsed?.served_by ? parsed : undefined;
  } catch {
    return undefined;
  }
}

export async function startStandinApp(options: StandinOptions): Promise<Standin & { address: AddressInfo }> {
  const standin = createStandinApp(options);
  const { server } = standin;
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port, options.host, () => resolve());
  });
  return { ...standin, address: server.address() as AddressInfo };
}

/** In a container: STANDIN_SERVICE (a key of the mesh file), MESH_FILE, HTTP_PROXY, STANDIN_HOST. */
async function main(): Promise<void> {
  const mesh = loadMesh(process.env.MESH_FILE ?? "compose/mesh.yaml");
  const key = process.env.STANDIN_SERVICE ?? "";
  const self = service(mesh, key);
  const { address } = await startStandinApp({
    mesh,
    key,
    proxy: process.env.HTTP_PROXY ?? `http://127.0.0.1:${mesh.ports.outbound}`,
    host: process.env.STANDIN_HOST ?? "127.0.0.1",
    port: self.appPort,
  });
  process.stdout.write(
    `${JSON.stringify({ event: "standin_listening", service: self.serviceName, address: `${address.address}:${address.port}` })}\n`,
  );
  const stop = () => process.exit(0);
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);
}

if (process.argv[1] && /standin\.(js|ts)$/.test(process.argv[1])) {
  main().catch((err: Error) => {
    process.stderr.write(`standin: ${err.message}\n`);
    process.exit(2);
  });
}
