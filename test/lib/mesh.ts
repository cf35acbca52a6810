// Test fixtures that use the real parts: a dev CA in a temp directory, a stand-in app on a real
// socket, sidecars started in-process on port 0 with their log lines captured, and clients with
// certificates from our own CA. Nothing here is mocked.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import http from "node:http";
import net, { type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import tls from "node:tls";
import { Agent, request } from "undici";
import { DevCa, type IdentityFiles } from "../../certs-dev/store.js";
import { parseConfig } from "../../config/load.js";
import type { ConfigInput } from "../../config/schema.js";
import { Sidecar } from "../../proxy/sidecar.js";

export interface Tap {
  teardown(fn: () => unknown): void;
}

export interface Pki {
  dir: string;
  ca: DevCa;
  /** The trust bundle and CRL every sidecar reads. */
  trust: { ca: string; crl: string };
  /** Issues NAME (a DNS name) once; later calls return the same files. */
  identity(name: string, options?: Parameters<DevCa["issue"]>[1]): Promise<IdentityFiles>;
  files(name: string): IdentityFiles;
  read(path: string): Buffer;
}

export async function pki(t: Tap, options: { algorithm?: "ecdsa" | "rsa" } = {}): Promise<Pki> {
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-test-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const ca = await DevCa.init(dir, options.algorithm ? { algorithm: options.algorithm } : {});
  const issued = new Set<string>();
  const paths = DevCa.paths(dir);
  return {
    dir,
    ca,
    trust: { ca: paths.trustCa, crl: paths.trustCrl },
    async identity(name, issueOptions) {
      if (!issued.has(name)) {
        await ca.issue(name, issueOptions ?? {});
        issued.add(name);
      }
      return ca.identityFiles(name);
    },
    files: (name) => ca.identityFiles(name),
    read: (path) => readFileSync(path),
  };
}

export interface SeenRequest {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  rawHeaders: string[];
  body: Buffer;
}

export interface App {
  url: string;
  port: number;
  server: http.Server;
  /** Every request that reached the app, in order. */
  seen: SeenRequest[];
  /** Connections ever accepted: a refused client must not add one. */
  connections: number;
}

export type AppHandler = (req: http.IncomingMessage, res: http.ServerResponse, body: Buffer) => void;

/** A stand-in app: by default answers 200 with JSON describing what it received. */
export async function app(t: Tap, handler?: AppHandler): Promise<App> {
  const seen: SeenRequest[] = [];
  const state = { connections: 0 };
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      seen.push({
        method: req.method ?? "",
        url: req.url ?? "",
        headers: req.headers,
        rawHeaders: req.rawHeaders,
        body,
      });
      if (handler) return handler(req, res, body);
      const answer = JSON.stringify({
        method: req.method,
        url: req.url,
        xfcc: req.headers["x-forwarded-client-cert"] ?? null,
        host: req.headers.host ?? null,
        bodyLength: body.length,
      });
      res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(answer) });
      res.end(answer);
    });
  });
  server.on("connection", () => state.connections++);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.teardown(() => {
    server.closeAllConnections();
    server.close();
  });
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    server,
    seen,
    get connections() {
      return state.connections;
    },
  };
}

/** Log lines captured from a sidecar, parsed back from NDJSON. */
export class LogLines extends Writable {
  readonly lines: Array<Record<string, unknown>> = [];
  override _write(chunk: Buffer, _enc: string, callback: () => void): void {
    for (const line of chunk.toString("utf8").split("\n")) if (line) this.lines.push(JSON.parse(line));
    callback();
  }
  events(event: string): Array<Record<string, unknown>> {
    return this.lines.filter((l) => l.event === event);
  }
}

export interface RunningSidecar {
  sidecar: Sidecar;
  logs: LogLines;
  inboundPort: number;
  outboundPort: number;
  adminUrl: string;
  /** The port of each TCP listener, by name. */
  tcpPorts: Record<string, number>;
  /** Prometheus text of /metrics. */
  metrics(): Promise<string>;
}

/** Sidecar config for identity NAME from `pki`, every listener on 127.0.0.1:0; `overrides` merged per section. */
export function sidecarConfig(p: Pki, name: string, overrides: ConfigInput | Record<string, unknown> = {}) {
  const f = p.files(name);
  const o = overrides as Record<string, Record<string, unknown> | undefined>;
  return parseConfig({
    service: { name: name.split(".")[0], dnsName: name, ...o.service },
    tls: { cert: f.cert, key: f.key, ca: f.ca, crl: f.crl, ...o.tls },
    inbound: { listen: "127.0.0.1:0", ...o.inbound },
    outbound: { listen: "127.0.0.1:0", ...o.outbound },
    admin: { listen: "127.0.0.1:0", ...o.admin },
    tcp: { ...o.tcp },
    limits: { ...o.limits },
    log: { level: "debug", ...o.log },
  });
}

export async function sidecar(
  t: Tap,
  p: Pki,
  name: string,
  overrides: ConfigInput | Record<string, unknown> = {},
): Promise<RunningSidecar> {
  await p.identity(name);
  const logs = new LogLines();
  const sc = await Sidecar.create(sidecarConfig(p, name, overrides), { logDestination: logs, processMetrics: false });
  t.teardown(() => sc.stop());
  const listening = await sc.start();
  const adminUrl = listening.admin ? `http://127.0.0.1:${listening.admin.port}` : "";
  return {
    sidecar: sc,
    logs,
    inboundPort: listening.inbound?.port ?? 0,
    outboundPort: listening.outbound[0]?.address.port ?? 0,
    adminUrl,
    tcpPorts: Object.fromEntries(listening.tcp.map((l) => [l.name, l.address.port])),
    metrics: async () => (await request(`${adminUrl}/metrics`)).body.text(),
  };
}

/**
 * The value of a sample in Prometheus text, 0 when absent; the sum of every series that carries
 * `labels` (so {direction: "outbound"} counts connections of every protocol).
 */
export function sample(text: string, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    const match = /^([^{\s]+)(?:\{(.*)\})?\s+(\S+)$/.exec(line);
    if (!match || match[1] !== name) continue;
    const found: Record<string, string> = {};
    for (const m of (match[2] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) found[m[1] as string] = m[2] as string;
    if (Object.entries(labels).every(([k, v]) => found[k] === v)) sum += Number(match[3]);
  }
  return sum;
}

/** An undici Agent presenting NAME's certificate (or none) and trusting the dev CA. */
export function mtlsAgent(p: Pki, name: string | null, extra: Record<string, unknown> = {}): Agent {
  const ca = p.read(p.trust.ca);
  const f = name ? p.files(name) : null;
  return new Agent({
    connect: {
      ca,
      ...(f ? { cert: p.read(f.cert), key: p.read(f.key) } : {}),
      servername: extra.servername as string | undefined,
      ...extra,
    },
  });
}

export interface RawTlsResult {
  /** The handshake completed from the client's side (in TLS 1.3 also when the server refuses). */
  handshake: boolean;
  /** Bytes the server sent after the handshake. */
  data: string;
  error: string | null;
}

/**
 * Connects with node:tls, writes `send` after the handshake, and reads until the server closes.
 * Under TLS 1.3 a refused client learns it on its first read, so the assertion is on `data`.
 */
export function rawTls(port: number, options: tls.ConnectionOptions, send: string): Promise<RawTlsResult> {
  return new Promise((resolve) => {
    const result: RawTlsResult = { handshake: false, data: "", error: null };
    const socket = tls.connect({ host: "127.0.0.1", port, rejectUnauthorized: false, ...options }, () => {
      result.handshake = true;
      socket.write(send);
    });
    socket.setTimeout(5_000, () => socket.destroy(new Error("timeout")));
    socket.on("data", (d: Buffer) => {
      result.data += d.toString("latin1");
    });
    socket.on("error", (err: NodeJS.ErrnoException) => {
      result.error = err.code ?? err.message;
    });
    socket.on("close", () => resolve(result));
  });
}

export const GET = "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

/** A plain-HTTP request through the forward proxy, absolute-form as curl with HTTP_PROXY sends it. */
export function viaProxy(
  proxyPort: number,
  url: string,
  options: { method?: string; headers?: Record<string, string>; body?: string } = {},
): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: "127.0.0.1",
        port: proxyPort,
        method: options.method ?? "GET",
        path: url,
        headers: { host: new URL(url).host, ...options.headers },
        agent: false,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () =>
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString("utf8") }),
        );
      },
    );
    req.on("error", reject);
    req.end(options.body);
  });
}

const handedOut = new Set<number>();

/**
 * A TCP port on 127.0.0.1 that was free a moment ago: for servers that cannot listen on port 0.
 * Never the same port twice in one process: the kernel may offer a port it just gave, and a test
 * that asks for four (Pebble's) must get four.
 */
export async function freePort(host = "127.0.0.1"): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(0, host, resolve));
    const { port } = server.address() as AddressInfo;
    await new Promise((resolve) => server.close(resolve));
    if (!handedOut.has(port)) {
      handedOut.add(port);
      return port;
    }
  }
  throw new Error("no fresh free port in 50 tries");
}

export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `check` every 20 ms until it returns true or `ms` pass. */
export async function eventually(check: () => boolean | Promise<boolean>, ms = 3_000): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await check()) return true;
    await sleep(20);
  }
  return check();
}

export interface LoadResult {
  at: number;
  ok: boolean;
  error: string | null;
}

/**
 * Steady requests over new TLS connections (GET, expecting 200) from `workers` loops, each
 * pausing `gapMs` between requests, until `stop()` or `maxMs`: for "this change fails nothing".
 */
export function steadyLoad(
  port: number,
  creds: tls.ConnectionOptions,
  options: { workers?: number; gapMs?: number; maxMs?: number } = {},
): { results: LoadResult[]; stop: () => Promise<LoadResult[]> } {
  const results: LoadResult[] = [];
  let running = true;
  const end = Date.now() + (options.maxMs ?? 60_000);
  const loop = async () => {
    while (running && Date.now() < end) {
      const at = Date.now();
      const r = await rawTls(port, creds, GET);
      results.push({ at, ok: r.data.startsWith("HTTP/1.1 200"), error: r.error });
      await sleep(options.gapMs ?? 10);
    }
  };
  const loops = Array.from({ length: options.workers ?? 2 }, loop);
  return {
    results,
    stop: async () => {
      running = false;
      await Promise.all(loops);
      return results;
    },
  };
}
