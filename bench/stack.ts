// The stack a run measures: a throw-away CA with the caller's and the callees' identities, the
// apps (the HTTP app, and for the protocol rows a gRPC app and a Redis server), and the
// contenders the options call for, started in the order contenders.ts lists them; then its
// teardown, exactly once, whether the run ends, fails or is interrupted. Everything lives in one
// temporary directory, so that a run leaves nothing behind unless asked to (--keep).
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Client } from "undici";
import { DevCa } from "../certs-dev/store.js";
import {
  type Apps,
  CALLEE,
  CALLER,
  CONTENDERS,
  type Contender,
  type ContenderId,
  GRPC_CALLEE,
  type PathSetup,
  PROXY_CORE,
  type ProcessGroup,
  type ProtocolPath,
  type Sidecar,
  type StartContext,
} from "./contenders.js";
import { freePort, type Proc, Procs, waitForLine, waitForPort } from "./procs.js";
import { type HandshakeRun, PATH_LABELS, type PathId, type Protocol } from "./report.js";
import { findTool } from "./tools.js";

const APP = fileURLToPath(new URL("app.js", import.meta.url));
const GRPC_APP = fileURLToPath(new URL("grpc.js", import.meta.url));

/** The programs the protocol rows drive, found once. */
export const PROTOCOL_TOOLS = {
  h2load: () => findTool("/usr/bin/h2load", "/usr/local/bin/h2load"),
  redisServer: () => findTool("/usr/bin/redis-server", "/usr/local/bin/redis-server"),
  redisBenchmark: () => findTool("/usr/bin/redis-benchmark", "/usr/local/bin/redis-benchmark"),
};

export interface StackOptions {
  paths: PathId[];
  handshakeS: number;
  /** Contenders left out on request (--no-nginx, --no-haproxy), as opposed to not needed. */
  skip: ContenderId[];
  /** The protocol rows asked for (--protocols). */
  protocols: Protocol[];
  cpuProf: string | null;
  sidecarNodeArgs: string[];
  /** outbound.peerProtocol of the caller's sidecars (--peer-protocol). */
  peerProtocol: "match" | "h2";
}

export interface Inbound {
  side: HandshakeRun["side"];
  port: number;
  pids: () => number[];
}

export interface Stack {
  app: Proc;
  /** The gRPC app, when the gRPC rows run: the app CPU of those rows is its. */
  grpcApp: Proc | null;
  ca: DevCa;
  apps: Apps;
  /** Every path of the contenders started, including those the options do not measure. */
  paths: Map<PathId, PathSetup>;
  inbounds: Inbound[];
  memoryOf: ProcessGroup[];
  started: Set<ContenderId>;
  /** The protocol rows that run (asked for, and their tools found), and the paths into them. */
  protocols: Protocol[];
  protocolPaths: ProtocolPath[];
  /** Protocol rows a started contender cannot take part in, and why. */
  cannot: { protocol: Protocol; path: PathId; reason: string }[];
  /** The sidecars of each ashmesh contender, with their admin ports (the soak reads them). */
  sidecars: Map<ContenderId, Sidecar[]>;
  /** What the contenders were started with: the start-up timing starts more sidecars with it. */
  context: StartContext;
}

export interface Workspace {
  procs: Procs;
  tmp: string;
  /** After Ctrl-C the run fails because its processes were stopped: that is not news. */
  interrupted(): boolean;
  teardown(): Promise<void>;
}

/** The run's processes and temporary directory; SIGINT and SIGTERM tear them down too. */
export function workspace(keep: boolean, progress: (message: string) => void): Workspace {
  const procs = new Procs();
  const tmp = mkdtempSync(join(os.tmpdir(), "ashmesh-bench-"));
  let cleaned = false;
  let interrupted = false;
  const teardown = async () => {
    if (cleaned) return;
    cleaned = true;
    await procs.stopAll();
    if (keep) progress(`kept ${tmp}`);
    else rmSync(tmp, { recursive: true, force: true });
  };
  const onSignal = (signal: NodeJS.Signals) => {
    interrupted = true;
    progress(`${signal}: stopping everything the bench started`);
    void teardown().finally(() => process.exit(signal === "SIGINT" ? 130 : 143));
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  return { procs, tmp, interrupted: () => interrupted, teardown };
}

/** A contender's paths are measured: then it also takes part in the protocol rows. */
function measured(c: Contender, o: StackOptions): boolean {
  return c.paths.some((p) => o.paths.includes(p));
}

/** A contender runs when one of its paths is measured, or its inbound is, for the handshake row. */
function wanted(c: Contender, o: StackOptions): boolean {
  return measured(c, o) || (c.inbound !== null && o.handshakeS > 0);
}

/** The protocol rows that can run: asked for, with their tools installed; the notes say what is missing. */
async function runnableProtocols(o: StackOptions, notes: string[]): Promise<Protocol[]> {
  const out: Protocol[] = [];
  for (const p of o.protocols) {
    if (p === "h2" && !PROTOCOL_TOOLS.h2load()) {
      notes.push("h2load not found: the HTTP/2 rows were skipped (Debian: apt-get install nghttp2-client).");
    } else if (p === "tcp" && (!PROTOCOL_TOOLS.redisServer() || !PROTOCOL_TOOLS.redisBenchmark())) {
      notes.push(
        "redis-server or redis-benchmark not found: the TCP rows were skipped (Debian: redis-server, redis-tools).",
      );
    } else if (
      p === "grpc" &&
      !(await import("@grpc/grpc-js").then(
        () => true,
        () => false,
      ))
    ) {
      notes.push("@grpc/grpc-js is not installed (a devDependency): the gRPC rows were skipped.");
    } else out.push(p);
  }
  return out;
}

/** The JSON line {"port":N,…} an app prints once it listens. */
function portLine<T>(line: string): T | null {
  return line.startsWith('{"port"') ? (JSON.parse(line) as T) : null;
}

/** The gRPC app and the Redis server, when their rows run, pinned with the app. */
async function startProtocolApps(procs: Procs, tmp: string, protocols: Protocol[]) {
  let grpcApp: Proc | null = null;
  let grpc: number | null = null;
  let redis: number | null = null;
  const memory: ProcessGroup[] = [];
  if (protocols.includes("grpc")) {
    const app = procs.start("gRPC app", process.execPath, [GRPC_APP, "0"], {
      core: PROXY_CORE,
      logFile: join(tmp, "grpc-app.log"),
    });
    grpc = (await waitForLine(app, (l) => portLine<{ port: number }>(l))).port;
    grpcApp = app;
    memory.push({ name: "gRPC app (@grpc/grpc-js)", pids: () => [app.pid] });
  }
  if (protocols.includes("tcp")) {
    const port = await freePort();
    const server = procs.start(
      "redis-server",
      PROTOCOL_TOOLS.redisServer() as string,
      ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
      { core: PROXY_CORE, logFile: join(tmp, "redis-server.log") },
    );
    await waitForPort(port, server);
    redis = port;
  }
  return { grpcApp, grpc, redis, memory };
}

export async function startStack(
  { procs, tmp }: Workspace,
  o: StackOptions,
  notes: string[],
  progress: (message: string) => void,
): Promise<Stack> {
  progress(`temporary CA and certificates for ${CALLER} and ${CALLEE} in ${tmp}`);
  const ca = await DevCa.init(join(tmp, "pki"));
  await ca.issue(CALLER);
  await ca.issue(CALLEE);
  await ca.issue(GRPC_CALLEE);

  const protocols = await runnableProtocols(o, notes);
  progress(`starting the app${protocols.length ? ` and the protocol rows' servers` : ""} (core ${PROXY_CORE})`);
  const app = procs.start("app", process.execPath, [APP, "0"], { core: PROXY_CORE, logFile: join(tmp, "app.log") });
  const ports = await waitForLine(app, (l) => portLine<{ port: number; h2cPort: number }>(l));
  const extra = await startProtocolApps(procs, tmp, protocols);
  const apps: Apps = { http: ports.port, h2c: ports.h2cPort, grpc: extra.grpc, redis: extra.redis };
  const context: StartContext = { procs, tmp, ca, apps, protocols, options: o };
  const stack: Stack = {
    app,
    grpcApp: extra.grpcApp,
    ca,
    apps,
    paths: new Map(),
    inbounds: [],
    memoryOf: [{ name: "app (node:http)", pids: () => [app.pid] }, ...extra.memory],
    started: new Set(),
    protocols,
    protocolPaths: [],
    cannot: [],
    sidecars: new Map(),
    context,
  };
  for (const c of CONTENDERS) {
    if (o.skip.includes(c.id)) continue;
    const program = c.needs ? c.needs.find() : null;
    if (c.needs && !program) {
      notes.push(c.needs.missingNote);
      progress(c.needs.skipping);
      continue;
    }
    if (!wanted(c, o)) continue;
    if (c.starting) progress(`starting ${c.starting} (core ${PROXY_CORE})`);
    // A contender started only for its inbound (the handshake row) takes no part in the protocol rows.
    const running = await c.start({ ...context, protocols: measured(c, o) ? protocols : [] }, program);
    for (const p of running.paths) stack.paths.set(p.id, p);
    if (c.inbound && running.inbound) stack.inbounds.push({ side: c.inbound, ...running.inbound });
    stack.memoryOf.push(...running.memory);
    stack.protocolPaths.push(...(running.protocols ?? []));
    if (measured(c, o)) {
      for (const [protocol, reason] of Object.entries(running.cannot ?? {})) {
        const path = c.paths[0] as PathId;
        if (protocols.includes(protocol as Protocol))
          stack.cannot.push({ protocol: protocol as Protocol, path, reason });
      }
    }
    if (running.sidecars) stack.sidecars.set(c.id, running.sidecars);
    stack.started.add(c.id);
  }
  return stack;
}

/** One request per path before any load: the answer must come from the app, through mTLS for the pairs. */
export async function checkPaths(stack: Stack): Promise<void> {
  for (const setup of stack.paths.values()) {
    const t = setup.target;
    const client = new Client(t.origin);
    try {
      const path = t.path.replace("/api/v1/ping", "/echo");
      const res = await client.request({
        method: "GET",
        path,
        headers: { host: t.host },
        headersTimeout: 5_000,
        bodyTimeout: 5_000,
      });
      const body = await res.body.text();
      if (res.statusCode !== 200) {
        throw new Error(`${PATH_LABELS[setup.id]}: GET ${path} answered ${res.statusCode}: ${body.slice(0, 300)}`);
      }
      const xfcc = (JSON.parse(body) as { xfcc: string | null }).xfcc;
      if (setup.id !== "direct" && !xfcc?.includes(CALLER)) {
        throw new Error(
          `${PATH_LABELS[setup.id]}: the app saw x-forwarded-client-cert ${JSON.stringify(xfcc)}, not ${CALLER}`,
        );
      }
    } finally {
      await client.close();
    }
  }
}
