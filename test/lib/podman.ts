// Helpers for the tests that run the mesh in Podman containers: build the images with the
// project's own scripts, drive podman-compose with compose/podman-compose.yml, and probe the
// containers' network from a container of its own (what a workload on the mesh network sees).
import { mkdirSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { at, type RunResult, run, tool } from "./ops.js";

export const podman = tool("podman", "podman");
export const podmanCompose = tool("podman-compose", "podman-compose");
/** The reason to skip the Podman tests, or false when both tools are there. */
export const podmanSkip: string | false = podman.skip || podmanCompose.skip;

export const IMAGE = "localhost/ashmesh:latest";
/** The Redis of the mesh file's `tcp` section, built from this machine's redis-server. */
export const REDIS_IMAGE = "localhost/ashmesh-redis:latest";
export const BASE = "localhost/ashmesh-base:latest";
export const COMPOSE_FILE = at("compose/podman-compose.yml");
const SHIM = at("compose/podman/podman-shim");

/**
 * Podman with the project's settings (runc, ulimits the host allows): nothing in /etc changes.
 * Without tap's NODE_V8_COVERAGE: code that runs inside images is not this checkout's, and its
 * coverage would spoil the report of the code that is.
 */
export function podmanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const { NODE_V8_COVERAGE: _coverage, ...env } = process.env;
  return {
    ...env,
    CONTAINERS_CONF: process.env.CONTAINERS_CONF ?? at("compose/podman/containers.conf"),
    ...extra,
  };
}

export function podmanRun(args: string[], options: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}) {
  return run("podman", args, { env: options.env ?? podmanEnv(), timeoutMs: options.timeoutMs ?? 60_000 });
}

/**
 * Runs `fn` while holding a lock shared by the test processes of this machine: tap runs test
 * files in parallel, and two image builds at once would replace each other's tags midway.
 */
async function withBuildLock<T>(fn: () => Promise<T>): Promise<T> {
  const lock = join(tmpdir(), "ashmesh-test-image-build.lock");
  const deadline = Date.now() + 900_000;
  for (;;) {
    try {
      mkdirSync(lock);
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      // A lock left by a killed run is older than any build.
      if (Date.now() - statSync(lock).mtimeMs > 900_000) rmSync(lock, { recursive: true, force: true });
      if (Date.now() > deadline) throw new Error(`waited 15 min for ${lock}`);
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }
  try {
    return await fn();
  } finally {
    rmSync(lock, { recursive: true, force: true });
  }
}

/** Builds the local base (no registry needed) and the ashmesh image, as the README says. */
export function buildImages(): Promise<RunResult> {
  return withBuildLock(async () => {
    const base = await run("sh", [at("compose/podman/build-base.sh"), BASE], {
      env: podmanEnv(),
      timeoutMs: 300_000,
    });
    if (base.code !== 0) return base;
    return run("sh", [at("compose/build-image.sh"), "--base", BASE, "--tag", IMAGE], {
      env: podmanEnv(),
      timeoutMs: 600_000,
    });
  });
}

/** The Redis image, from this machine's redis-server and its libraries (no registry needed). */
export function buildRedisImage(): Promise<RunResult> {
  return withBuildLock(() =>
    run("sh", [at("compose/podman/build-redis.sh"), REDIS_IMAGE], { env: podmanEnv(), timeoutMs: 300_000 }),
  );
}

export const SYSTEMD_IMAGE = "localhost/ashmesh-systemd:latest";

/** A Debian 12 image with systemd as init (test/fixtures/build-systemd-image.sh), made once. */
export function buildSystemdImage(): Promise<RunResult> {
  return withBuildLock(() =>
    run("sh", [at("test/fixtures/build-systemd-image.sh"), SYSTEMD_IMAGE], { env: podmanEnv(), timeoutMs: 600_000 }),
  );
}

export function compose(project: string, env: NodeJS.ProcessEnv, args: string[], timeoutMs = 300_000) {
  return run("podman-compose", ["--podman-path", SHIM, "-p", project, "-f", COMPOSE_FILE, ...args], {
    env,
    timeoutMs,
  });
}

export interface ProbeStep {
  name: string;
  host: string;
  port: number;
  /** TLS when set (servername = host); plain TCP when absent. */
  tls?: { cert?: string; key?: string; ca?: string };
  /** Bytes to send once connected. */
  send: string;
}

export interface ProbeResult {
  name: string;
  /** The first line of what came back ("" when nothing did). */
  firstLine: string;
  body: string;
  error: string | null;
  /** The serial of the certificate the server presented (TLS only). */
  peerSerial: string | null;
}

// Runs inside the image's Node: no test code, only node:tls and node:net.
const PROBE = `
const tls = require("node:tls"), net = require("node:net");
const steps = JSON.parse(process.env.PROBE_STEPS);
const one = (s) => new Promise((done) => {
  let data = "", error = null, serial = null, finished = false;
  const finish = () => { if (finished) return; finished = true; clearTimeout(timer);
    const i = data.indexOf("\\r\\n\\r\\n");
    done({ name: s.name, firstLine: data.split("\\r\\n")[0], body: i < 0 ? "" : data.slice(i + 4),
      error, peerSerial: serial }); };
  const timer = setTimeout(() => { error = error || "timeout"; sock.destroy(); finish(); }, 8000);
  const sock = s.tls
    ? tls.connect({ host: s.host, port: s.port, servername: s.host, ...s.tls, rejectUnauthorized: Boolean(s.tls.ca) },
        () => { serial = sock.getPeerCertificate().serialNumber || null; sock.write(s.send); })
    : net.connect({ host: s.host, port: s.port }, () => sock.write(s.send));
  sock.on("data", (d) => { data += d.toString("latin1"); });
  sock.on("error", (e) => { error = e.code || e.message; });
  sock.on("close", finish);
});
(async () => { const out = []; for (const s of steps) out.push(await one(s));
  process.stdout.write(JSON.stringify(out)); })();
`;

/** Runs the steps one after another from a fresh container on `network`. */
export async function probe(network: string, steps: ProbeStep[]): Promise<ProbeResult[]> {
  return runProbe(network, PROBE, steps) as Promise<ProbeResult[]>;
}

/** A Node script of ours in the image, with PROBE_STEPS in its environment; its stdout is JSON. */
async function runProbe(network: string, script: string, steps: unknown[]): Promise<unknown[]> {
  const r = await podmanRun(
    [
      "run",
      "--rm",
      "--network",
      network,
      "--read-only",
      "--cap-drop",
      "ALL",
      "--env",
      "PROBE_STEPS",
      "--entrypoint",
      "/usr/local/bin/node",
      IMAGE,
      "-e",
      script,
    ],
    { env: podmanEnv({ PROBE_STEPS: JSON.stringify(steps) }), timeoutMs: 120_000 },
  );
  if (r.code !== 0) throw new Error(`the probe container failed (exit ${r.code}): ${r.output.slice(0, 2000)}`);
  return JSON.parse(r.stdout) as unknown[];
}

export interface GrpcProbeStep {
  name: string;
  host: string;
  port: number;
  /** mTLS to a sidecar's inbound (servername = host), ALPN h2. */
  tls: { cert: string; key: string; ca: string };
  /** The gRPC method, /package.Service/Method. */
  path: string;
  /** The one request message (unary), as UTF-8 bytes. */
  message: string;
}

export interface GrpcProbeResult {
  name: string;
  /** The HTTP/2 :status; 0 when no answer came. */
  status: number;
  /** grpc-status from the trailers, or from the headers of a Trailers-Only answer; null when none. */
  grpcStatus: number | null;
  grpcMessage: string;
  /** The first answer message, as UTF-8. */
  message: string;
  error: string | null;
}

// A unary gRPC call written with node:http2, as the stand-in makes it (the image has no gRPC library).
const GRPC_PROBE = `
const http2 = require("node:http2");
const steps = JSON.parse(process.env.PROBE_STEPS);
const one = (s) => new Promise((done) => {
  const out = { name: s.name, status: 0, grpcStatus: null, grpcMessage: "", message: "", error: null };
  const session = http2.connect("https://" + s.host + ":" + s.port, { servername: s.host, ...s.tls });
  session.on("error", (e) => { out.error = out.error || e.code || e.message; });
  const body = Buffer.from(s.message), head = Buffer.alloc(5);
  head.writeUInt32BE(body.length, 1);
  const stream = session.request({ ":method": "POST", ":path": s.path, "content-type": "application/grpc", te: "trailers" });
  const chunks = [];
  let headers = {}, trailers = {};
  const timer = setTimeout(() => { out.error = out.error || "timeout"; stream.destroy(); }, 8000);
  stream.on("response", (h) => { headers = h; out.status = Number(h[":status"]); });
  stream.on("trailers", (h) => { trailers = h; });
  stream.on("data", (d) => chunks.push(d));
  stream.on("error", (e) => { out.error = out.error || e.code || e.message; });
  stream.on("close", () => {
    clearTimeout(timer);
    const status = trailers["grpc-status"] ?? headers["grpc-status"];
    out.grpcStatus = status === undefined ? null : Number(status);
    out.grpcMessage = decodeURIComponent(String(trailers["grpc-message"] ?? headers["grpc-message"] ?? ""));
    const data = Buffer.concat(chunks);
    out.message = data.length >= 5 ? data.subarray(5, 5 + data.readUInt32BE(1)).toString("utf8") : "";
    session.close();
    done(out);
  });
  stream.end(Buffer.concat([head, body]));
});
(async () => { const out = []; for (const s of steps) out.push(await one(s));
  process.stdout.write(JSON.stringify(out)); })();
`;

/** Runs unary gRPC calls one after another from a fresh container on `network`. */
export async function grpcProbe(network: string, steps: GrpcProbeStep[]): Promise<GrpcProbeResult[]> {
  return runProbe(network, GRPC_PROBE, steps) as Promise<GrpcProbeResult[]>;
}

export const request = (method: string, host: string, path: string) =>
  `${method} ${path} HTTP/1.1\r\nhost: ${host}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n`;

export { freePort } from "./mesh.js";
