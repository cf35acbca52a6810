// `npm run bench`: latency of the ashmesh sidecar pair against the direct path and an nginx mTLS
// pair, at fixed request rates (open loop), plus maximum throughput, new mTLS connections per
// second, CPU per request and memory. Everything it starts runs as its own process: the app and
// the proxies pinned to core 0, the load generators to core 1. Results go to stdout and to
// bench/results/latest.{md,json}; progress goes to stderr.
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { Client } from "undici";
import { DevCa } from "../certs-dev/store.js";
import { ENV_VARS } from "../config/load.js";
import type { ClosedLoopResult, LoadSpec, OpenLoopResult, Target } from "./load.js";
import { findNginx, inboundConfig, outboundConfig } from "./nginx.js";
import {
  coreBusy,
  coreTimes,
  cpuSeconds,
  hasTaskset,
  type LineProc,
  memory,
  type Proc,
  Procs,
  tail,
  waitForLine,
} from "./procs.js";
import {
  type BenchReport,
  type HandshakeRun,
  markdown,
  PATH_LABELS,
  type PathId,
  sustained,
  toJson,
} from "./report.js";
import { findTool, handshakes, wrk } from "./tools.js";

const HERE = dirname(fileURLToPath(import.meta.url));
/** dist/bench → the package root. */
const ROOT = resolve(HERE, "..", "..");
const ASHMESH = join(HERE, "..", "bin", "ashmesh.js");
const LOAD = join(HERE, "load.js");
const APP = join(HERE, "app.js");

const CALLER = "gateway.ashchan.local";
const CALLEE = "auth.ashchan.local";
const PROXY_CORE = 0;
const LOAD_CORE = 1;
const ALL_PATHS: PathId[] = ["direct", "ashmesh", "ashmesh-fwd", "nginx"];

const HELP = `npm run bench -- [options]        (or: node dist/bench/run.js [options])

  --quick                 a ~40 s sanity run: rates 500,2000, 2 s each, short throughput/handshake runs
  --rates LIST            fixed request rates, req/s (default 500,1000,2000,4000)
  --duration S            measured seconds per rate and path (default 5; quick 2)
  --warmup S              warm-up seconds before each measurement (default 1; quick 0.5)
  --paths LIST            any of ${ALL_PATHS.join(",")} (default: all)
  --connections N         keep-alive connections of the load generator (default 32)
  --max-in-flight N       outstanding requests before new ones are dropped (default 2000)
  --timeout-ms N          a request unanswered after this counts as a timeout (default 5000)
  --throughput S          seconds of the closed-loop throughput run per path, 0 to skip (default 5; quick 2)
  --handshakes S          seconds of the new-connection run per inbound, 0 to skip (default 5; quick 2)
  --handshake-clients N   parallel openssl s_time clients (default 4)
  --repeat N              run every rate and path N times, interleaved; report the median-p99 run (default 1)
  --no-nginx              skip the nginx reference pair
  --cpu-prof DIR          run the two sidecars with --cpu-prof, profiles written to DIR on exit
  --sidecar-node-arg ARG  an extra Node option for the two sidecars (repeatable), e.g. --trace-gc
  --out DIR               where latest.json and latest.md go (default bench/results; "-" for none)
  --keep                  keep the temporary directory (configs, logs) and print its path
`;

interface Options {
  quick: boolean;
  rates: number[];
  durationS: number;
  warmupS: number;
  paths: PathId[];
  connections: number;
  maxInFlight: number;
  timeoutMs: number;
  throughputS: number;
  handshakeS: number;
  handshakeClients: number;
  repeat: number;
  nginx: boolean;
  cpuProf: string | null;
  sidecarNodeArgs: string[];
  out: string | null;
  keep: boolean;
}

class UsageError extends Error {}

function positive(name: string, value: string | undefined, fallback: number, allowZero = false): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || n < 0 || (!allowZero && n === 0)) {
    throw new UsageError(`--${name}: expected a ${allowZero ? "non-negative" : "positive"} number, got "${value}"`);
  }
  return n;
}

function parseOptions(argv: string[]): Options | null {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: "boolean" },
      rates: { type: "string" },
      duration: { type: "string" },
      warmup: { type: "string" },
      paths: { type: "string" },
      connections: { type: "string" },
      "max-in-flight": { type: "string" },
      "timeout-ms": { type: "string" },
      throughput: { type: "string" },
      handshakes: { type: "string" },
      "handshake-clients": { type: "string" },
      "no-nginx": { type: "boolean" },
      repeat: { type: "string" },
      "cpu-prof": { type: "string" },
      "sidecar-node-arg": { type: "string", multiple: true },
      out: { type: "string" },
      keep: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help) return null;
  const quick = values.quick ?? false;
  const rates = (values.rates ?? (quick ? "500,2000" : "500,1000,2000,4000"))
    .split(",")
    .map((r) => positive("rates", r.trim(), 0));
  if (rates.some((r) => r > 50_000)) throw new UsageError("--rates: at most 50000 req/s per rate");
  const paths = (values.paths ?? ALL_PATHS.join(",")).split(",").map((p) => p.trim()) as PathId[];
  for (const p of paths) {
    if (!ALL_PATHS.includes(p)) throw new UsageError(`--paths: unknown path "${p}"; expected ${ALL_PATHS.join(", ")}`);
  }
  if (!paths.includes("direct")) paths.unshift("direct"); // every overhead is measured against it
  const durationS = positive("duration", values.duration, quick ? 2 : 5);
  const warmupS = positive("warmup", values.warmup, quick ? 0.5 : 1, true);
  if (durationS > 60 || warmupS > 30) throw new UsageError("--duration is at most 60 s and --warmup at most 30 s");
  return {
    quick,
    rates,
    durationS,
    warmupS,
    paths,
    connections: Math.round(positive("connections", values.connections, 32)),
    maxInFlight: Math.round(positive("max-in-flight", values["max-in-flight"], 2000)),
    timeoutMs: Math.round(positive("timeout-ms", values["timeout-ms"], 5000)),
    throughputS: Math.min(60, positive("throughput", values.throughput, quick ? 2 : 5, true)),
    handshakeS: Math.min(60, Math.round(positive("handshakes", values.handshakes, quick ? 2 : 5, true))),
    handshakeClients: Math.min(32, Math.round(positive("handshake-clients", values["handshake-clients"], 4))),
    repeat: Math.min(9, Math.round(positive("repeat", values.repeat, 1))),
    nginx: !values["no-nginx"],
    cpuProf: values["cpu-prof"] ? resolve(values["cpu-prof"]) : null,
    sidecarNodeArgs: values["sidecar-node-arg"] ?? [],
    out: values.out === "-" ? null : resolve(values.out ?? join(ROOT, "bench", "results")),
    keep: values.keep ?? false,
  };
}

const t0 = performance.now();
function progress(message: string): void {
  process.stderr.write(`[bench ${((performance.now() - t0) / 1000).toFixed(1).padStart(5)} s] ${message}\n`);
}

/** A port that was free a moment ago (nginx needs numbers in its config; ashmesh takes port 0). */
function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolvePort(port));
    });
  });
}

async function waitForPort(port: number, proc: Proc, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (proc.exitCode !== undefined)
      throw new Error(`${proc.name} exited (code ${proc.exitCode}):\n${tail(proc.logFile)}`);
    const ok = await new Promise<boolean>((done) => {
      const s = net.connect(port, "127.0.0.1");
      s.once("connect", () => {
        s.destroy();
        done(true);
      });
      s.once("error", () => done(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${proc.name}: nothing listens on 127.0.0.1:${port} after ${ms} ms:\n${tail(proc.logFile)}`);
}

/** The environment without the variables that would override a sidecar's config file. */
function cleanEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  for (const name of Object.keys(ENV_VARS)) delete env[name];
  return env;
}

/** The first line a tool prints about its version, wherever it prints it (nginx and wrk: stderr, exit 1). */
function version(cmd: string, args: string[], pattern?: RegExp): string {
  const r = spawnSync(cmd, args, { encoding: "utf8", timeout: 5_000 });
  const text = `${r.stdout ?? ""}\n${r.stderr ?? ""}`;
  if (pattern) return pattern.exec(text)?.[0] ?? "unknown";
  return text.trim().split("\n")[0] ?? "unknown";
}

interface PathSetup {
  id: PathId;
  target: Target;
  /** The proxy processes whose CPU this path costs (none for direct). */
  proxyPids: () => number[];
}

interface Stack {
  app: Proc;
  appPort: number;
  paths: Map<PathId, PathSetup>;
  ashmeshInbound?: { proc: Proc; port: number };
  nginxInbound?: { pids: () => number[]; port: number };
  memoryOf: Array<{ name: string; pids: () => number[] }>;
}

/** The callee's sidecar (inbound only) and the caller's (outbound only), as `ashmesh proxy` config files. */
function sidecarConfigs(ca: DevCa, appPort: number): { callee: unknown; caller: (inboundPort: number) => unknown } {
  const tlsOf = (name: string) => {
    const f = ca.identityFiles(name);
    return { cert: f.cert, key: f.key, ca: f.ca, crl: f.crl };
  };
  const limits = { drainTimeoutMs: 1_000 };
  return {
    callee: {
      service: { name: "auth", dnsName: CALLEE },
      tls: tlsOf(CALLEE),
      inbound: { listen: "127.0.0.1:0", app: `http://127.0.0.1:${appPort}`, allow: [CALLER] },
      outbound: { enabled: false },
      admin: { listen: "127.0.0.1:0" },
      limits,
      log: { level: "info" },
    },
    caller: (inboundPort: number) => ({
      service: { name: "gateway", dnsName: CALLER },
      tls: tlsOf(CALLER),
      inbound: { enabled: false },
      outbound: {
        listen: "127.0.0.1:0",
        resolve: { [CALLEE]: `127.0.0.1:${inboundPort}` },
        upstreams: { auth: { listen: "127.0.0.1:0", target: `${CALLEE}:8443` } },
      },
      admin: { listen: "127.0.0.1:0" },
      limits,
      log: { level: "info" },
    }),
  };
}

function listeningPort(match: (line: Record<string, unknown>) => boolean) {
  return (text: string): number | null => {
    if (!text.startsWith("{")) return null;
    try {
      const line = JSON.parse(text) as Record<string, unknown>;
      if (line.event !== "listening" || !match(line)) return null;
      return Number(String(line.address).split(":").pop());
    } catch {
      return null;
    }
  };
}

async function startStack(procs: Procs, tmp: string, ca: DevCa, options: Options, notes: string[]): Promise<Stack> {
  const node = process.execPath;
  const appLog = join(tmp, "app.log");
  progress("starting the app (core 0)");
  const app = procs.start("app", node, [APP, "0"], { core: PROXY_CORE, logFile: appLog });
  const appPort = await waitForLine(app, (l) =>
    l.startsWith('{"port"') ? (JSON.parse(l) as { port: number }).port : null,
  );
  const paths = new Map<PathId, PathSetup>();
  paths.set("direct", {
    id: "direct",
    target: { origin: `http://127.0.0.1:${appPort}`, path: "/api/v1/ping", host: `127.0.0.1:${appPort}` },
    proxyPids: () => [],
  });
  const stack: Stack = { app, appPort, paths, memoryOf: [{ name: "app (node:http)", pids: () => [app.pid] }] };

  const wantAshmesh = options.paths.some((p) => p.startsWith("ashmesh")) || options.handshakeS > 0;
  if (wantAshmesh) {
    progress("starting the ashmesh sidecars (core 0)");
    const configs = sidecarConfigs(ca, appPort);
    const env = cleanEnv();
    const prof = (name: string) => [
      ...options.sidecarNodeArgs,
      ...(options.cpuProf
        ? ["--cpu-prof", `--cpu-prof-dir=${options.cpuProf}`, `--cpu-prof-name=${name}.cpuprofile`]
        : []),
    ];
    const calleeFile = join(tmp, "ashmesh-auth.json");
    writeFileSync(calleeFile, JSON.stringify(configs.callee, null, 2));
    const callee = procs.start(
      "ashmesh inbound (auth)",
      node,
      [...prof("ashmesh-auth-inbound"), ASHMESH, "proxy", "--config", calleeFile],
      { core: PROXY_CORE, logFile: join(tmp, "ashmesh-auth.log"), env },
    );
    const inboundPort = await waitForLine(
      callee,
      listeningPort((l) => l.listener === "inbound"),
    );
    await waitForLine(
      callee,
      listeningPort((l) => l.listener === "admin"),
    );
    const callerFile = join(tmp, "ashmesh-gateway.json");
    writeFileSync(callerFile, JSON.stringify(configs.caller(inboundPort), null, 2));
    const caller = procs.start(
      "ashmesh outbound (gateway)",
      node,
      [...prof("ashmesh-gateway-outbound"), ASHMESH, "proxy", "--config", callerFile],
      { core: PROXY_CORE, logFile: join(tmp, "ashmesh-gateway.log"), env },
    );
    const forwardPort = await waitForLine(
      caller,
      listeningPort((l) => l.listener === "outbound" && l.name === "forward proxy"),
    );
    const mappedPort = await waitForLine(
      caller,
      listeningPort((l) => l.listener === "outbound" && l.name === "upstream auth"),
    );
    await waitForLine(
      caller,
      listeningPort((l) => l.listener === "admin"),
    );
    const pair = () => [caller.pid, callee.pid];
    paths.set("ashmesh", {
      id: "ashmesh",
      target: { origin: `http://127.0.0.1:${mappedPort}`, path: "/api/v1/ping", host: "auth" },
      proxyPids: pair,
    });
    paths.set("ashmesh-fwd", {
      id: "ashmesh-fwd",
      target: { origin: `http://127.0.0.1:${forwardPort}`, path: `http://${CALLEE}/api/v1/ping`, host: CALLEE },
      proxyPids: pair,
    });
    stack.ashmeshInbound = { proc: callee, port: inboundPort };
    stack.memoryOf.push(
      { name: "ashmesh outbound (gateway)", pids: () => [caller.pid] },
      { name: "ashmesh inbound (auth)", pids: () => [callee.pid] },
    );
  }

  const nginx = options.nginx ? findNginx() : null;
  if (options.nginx && !nginx) {
    notes.push("nginx is not installed: the reference pair was skipped (Debian: apt-get install nginx).");
    progress("nginx not found: skipping the reference pair");
  }
  const wantNginx = options.paths.includes("nginx") || options.handshakeS > 0;
  if (nginx && wantNginx) {
    progress("starting the nginx pair (core 0)");
    const inPort = await freePort();
    const outPort = await freePort();
    const filesOf = (name: string) => {
      const f = ca.identityFiles(name);
      return { cert: f.cert, key: f.key, ca: f.ca, crl: f.crl };
    };
    const inConf = join(tmp, "nginx-inbound.conf");
    const outConf = join(tmp, "nginx-outbound.conf");
    writeFileSync(
      inConf,
      inboundConfig(tmp, { listen: inPort, appPort, allow: CALLER, files: filesOf(CALLEE), connections: 64 }),
    );
    writeFileSync(
      outConf,
      outboundConfig(tmp, {
        listen: outPort,
        peerPort: inPort,
        peerName: CALLEE,
        files: filesOf(CALLER),
        connections: 64,
      }),
    );
    const start = (name: string, conf: string, log: string) =>
      procs.start(name, nginx, ["-p", tmp, "-c", conf, "-g", "daemon off;"], {
        core: PROXY_CORE,
        logFile: join(tmp, log),
      });
    const nIn = start("nginx inbound", inConf, "nginx-inbound.stderr.log");
    const nOut = start("nginx outbound", outConf, "nginx-outbound.stderr.log");
    await waitForPort(inPort, nIn);
    await waitForPort(outPort, nOut);
    // Master and its worker: the workers are adopted so that they are stopped whatever happens.
    const inPids = () => [nIn.pid, ...procs.adoptDescendants(nIn.pid)];
    const outPids = () => [nOut.pid, ...procs.adoptDescendants(nOut.pid)];
    inPids();
    outPids();
    paths.set("nginx", {
      id: "nginx",
      target: { origin: `http://127.0.0.1:${outPort}`, path: "/api/v1/ping", host: "auth" },
      proxyPids: () => [...outPids(), ...inPids()],
    });
    stack.nginxInbound = { pids: inPids, port: inPort };
    stack.memoryOf.push(
      { name: "nginx outbound (master + worker)", pids: outPids },
      { name: "nginx inbound (master + worker)", pids: inPids },
    );
  }
  return stack;
}

/** One request per path before any load: the answer must come from the app, through mTLS for the pairs. */
async function checkPaths(stack: Stack): Promise<void> {
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

async function runLoad(generator: LineProc, spec: LoadSpec, timeoutMs: number): Promise<unknown> {
  const line = await generator.ask(JSON.stringify(spec), timeoutMs);
  const result = JSON.parse(line) as { error?: string };
  if (result.error) throw new Error(`load generator: ${result.error}`);
  return result;
}

/** What every measurement step needs. */
interface Ctx {
  o: Options;
  procs: Procs;
  stack: Stack;
  generator: LineProc;
  /** The paths to measure, in the order they alternate. */
  order: PathId[];
  report: BenchReport;
}

/** CPU of a path's proxies and of the app, and the cores' business, between start() and stop(). */
function cpuMeter(stack: Stack, pids: number[]) {
  const cpu0 = cpuSeconds(pids);
  const app0 = cpuSeconds([stack.app.pid]);
  const core0 = coreTimes();
  const wall0 = performance.now();
  return () => {
    const wallS = (performance.now() - wall0) / 1000;
    const proxyCpuS = cpuSeconds(pids) - cpu0;
    const appCpuS = cpuSeconds([stack.app.pid]) - app0;
    return { wallS, proxyCpuS, appCpuS, coreBusy: coreBusy(core0, coreTimes()) };
  };
}

function openSpec(o: Options, target: Target, rate: number, warmupS: number, durationS: number): LoadSpec {
  return {
    mode: "open",
    target,
    rate,
    warmupS,
    durationS,
    connections: o.connections,
    maxInFlight: o.maxInFlight,
    timeoutMs: o.timeoutMs,
  };
}

/**
 * One warm-up per path before anything is measured: JIT, connection pools (each new upstream
 * connection is a full handshake), heaps grown to their working size, in the proxies and in the
 * generator. Each measured run has its own short warm-up on top.
 */
async function warmUp({ o, stack, generator, order }: Ctx): Promise<void> {
  const rate = Math.min(2_000, Math.max(...o.rates));
  const seconds = o.quick ? 1 : 2;
  progress(`warm-up: ${seconds} s at ${rate} req/s on each path`);
  for (const id of order) {
    const target = (stack.paths.get(id) as PathSetup).target;
    await runLoad(generator, openSpec(o, target, rate, 0, seconds), seconds * 1000 + o.timeoutMs + 20_000);
  }
}

/**
 * Fixed rates, open loop. The paths alternate within each rate (and rounds repeat the whole
 * matrix), so that a burst of noise from elsewhere on the machine lands on all of them rather
 * than on one path. With --repeat, each row is the round whose p99 is the median.
 */
async function measureRates({ o, stack, generator, order, report }: Ctx): Promise<void> {
  for (let round = 1; round <= o.repeat; round++) {
    for (const rate of o.rates) {
      for (const id of order) {
        const setup = stack.paths.get(id) as PathSetup;
        const pids = setup.proxyPids();
        const stop = cpuMeter(stack, pids);
        const load = (await runLoad(
          generator,
          openSpec(o, setup.target, rate, o.warmupS, o.durationS),
          (o.warmupS + o.durationS) * 1000 + o.timeoutMs + 20_000,
        )) as OpenLoopResult;
        const m = stop();
        report.allRates.push({
          path: id,
          rate,
          round,
          load,
          proxyCpuS: m.proxyCpuS,
          appCpuS: m.appCpuS,
          coreBusy: m.coreBusy,
          oursOnCore0: (m.proxyCpuS + m.appCpuS) / m.wallS,
          wallS: m.wallS,
        });
        const l = load.latency;
        progress(
          `${o.repeat > 1 ? `round ${round}/${o.repeat} ` : ""}${String(rate).padStart(5)} req/s  ${PATH_LABELS[id].padEnd(28)} ` +
            `p50 ${l.p50.toFixed(2)} ms  p99 ${l.p99.toFixed(2)} ms  ` +
            `achieved ${Math.round(load.achievedRate)}/s${sustained(load) ? "" : " (not sustained)"}`,
        );
      }
    }
  }
  for (const rate of o.rates) {
    for (const id of order) {
      const runs = report.allRates
        .filter((r) => r.rate === rate && r.path === id)
        .sort((a, b) => a.load.latency.p99 - b.load.latency.p99);
      const median = runs[Math.floor((runs.length - 1) / 2)];
      if (median) report.rates.push(median);
    }
  }
}

/** Closed loop at `connections`: wrk when installed (C, cheap per request), else the Node generator. */
async function measureThroughput({ o, procs, stack, generator, order, report }: Ctx, wrkBin: string | null) {
  if (!wrkBin) report.notes.push("wrk not found: throughput measured with the Node closed-loop generator instead.");
  // The forward proxy's throughput is the port-mapped one's: same code after the target is parsed.
  for (const id of order.filter((p) => p !== "ashmesh-fwd")) {
    const setup = stack.paths.get(id) as PathSetup;
    const stop = cpuMeter(stack, setup.proxyPids());
    let measured: { tool: "wrk" | "node closed loop"; throughput: number; p50: number; p99: number } & {
      errors: number;
      requests: number;
    };
    if (wrkBin) {
      const w = await wrk(procs, wrkBin, {
        url: `${setup.target.origin}${setup.target.path}`,
        host: setup.target.host,
        connections: o.connections,
        seconds: o.throughputS,
        core: LOAD_CORE,
      });
      measured = { tool: "wrk", ...w, errors: w.non2xx + w.socketErrors };
    } else {
      const c = (await runLoad(
        generator,
        {
          mode: "closed",
          target: setup.target,
          connections: o.connections,
          warmupS: 0.5,
          durationS: o.throughputS,
          timeoutMs: o.timeoutMs,
        },
        (o.throughputS + 1) * 1000 + o.timeoutMs + 20_000,
      )) as ClosedLoopResult;
      measured = {
        tool: "node closed loop",
        throughput: c.throughput,
        p50: c.latency.p50,
        p99: c.latency.p99,
        errors: c.errors,
        requests: c.totalCompleted,
      };
    }
    const m = stop();
    report.throughput.push({
      path: id,
      tool: measured.tool,
      connections: o.connections,
      throughput: measured.throughput,
      p50: measured.p50,
      p99: measured.p99,
      errors: measured.errors,
      requests: measured.requests,
      proxyCpuS: m.proxyCpuS,
      appCpuS: m.appCpuS,
      coreBusy: m.coreBusy,
    });
    progress(`throughput  ${PATH_LABELS[id].padEnd(28)} ${Math.round(measured.throughput)} req/s`);
  }
}

/** New mTLS connections per second against each inbound, and the inbound's CPU per connection. */
async function measureHandshakes({ o, procs, stack, report }: Ctx, ca: DevCa): Promise<void> {
  const openssl = findTool("/usr/bin/openssl", "/usr/local/bin/openssl");
  if (!openssl) {
    report.notes.push("openssl not found: new-connection rates were not measured.");
    return;
  }
  const gw = ca.identityFiles(CALLER);
  const sides: Array<{ side: HandshakeRun["side"]; port: number; pids: () => number[] }> = [];
  if (stack.ashmeshInbound) {
    const inbound = stack.ashmeshInbound;
    sides.push({ side: "ashmesh inbound", port: inbound.port, pids: () => [inbound.proc.pid] });
  }
  if (stack.nginxInbound) sides.push({ side: "nginx inbound", ...stack.nginxInbound });
  for (const s of sides) {
    const stop = cpuMeter(stack, s.pids());
    const result = await handshakes(procs, openssl, {
      port: s.port,
      cert: gw.cert,
      key: gw.key,
      ca: gw.ca,
      seconds: o.handshakeS,
      clients: o.handshakeClients,
      core: LOAD_CORE,
    });
    const m = stop();
    report.handshakes.push({ side: s.side, result, inboundCpuS: m.proxyCpuS, coreBusy: m.coreBusy });
    progress(`handshakes  ${s.side.padEnd(28)} ${Math.round(result.rate)} new connections/s`);
  }
}

function describeMachine(stack: Stack, wrkBin: string | null, loadBefore: number[]): Record<string, string> {
  const nginx = findNginx();
  return {
    cpu: `${os.cpus()[0]?.model ?? "unknown"} × ${os.cpus().length}`,
    kernel: `${os.type()} ${os.release()}`,
    memory: `${(os.totalmem() / 2 ** 30).toFixed(1)} GiB`,
    node: `${process.version} (OpenSSL ${process.versions.openssl}) — the sidecars, the app and the generator`,
    nginx:
      stack.nginxInbound && nginx
        ? `${version(nginx, ["-V"], /nginx\/\S+/)} (${version(nginx, ["-V"], /running with OpenSSL [^)]+|built with OpenSSL \S+/)})`
        : "not run",
    wrk: wrkBin ? version(wrkBin, ["-v"], /wrk \S+/) : "not installed",
    openssl: version("openssl", ["version"]),
    pinning: hasTaskset() ? `proxies and app on core ${PROXY_CORE}, load generators on core ${LOAD_CORE}` : "none",
    "load average (1 min) before / after": `${loadBefore[0]?.toFixed(2)} / ${os.loadavg()[0]?.toFixed(2)}`,
  };
}

/** Warnings for the reader when the machine was busy with other work while we measured. */
function noiseNotes(report: BenchReport, loadBefore: number[]): string[] {
  const notes: string[] = [];
  if ((loadBefore[0] ?? 0) > 0.5) {
    notes.push(
      `the machine was not idle when the bench started (load average ${loadBefore[0]?.toFixed(2)}): ` +
        "expect noise; compare rows of the same run, not runs with each other.",
    );
  }
  const maxOther = Math.max(0, ...report.rates.map((r) => (r.coreBusy[0] ?? 0) - r.oursOnCore0));
  if (maxOther > 0.15) {
    notes.push(
      `other processes used up to ${Math.round(maxOther * 100)} % of core 0 during a fixed-rate run: ` +
        "those rows are noisy (see the core columns); --repeat 3 helps.",
    );
  }
  return notes;
}

async function main(argv: string[]): Promise<number> {
  let options: Options | null;
  try {
    options = parseOptions(argv);
  } catch (err) {
    process.stderr.write(`bench: ${(err as Error).message}\n\n${HELP}`);
    return 2;
  }
  if (!options) {
    process.stdout.write(HELP);
    return 0;
  }
  const o = options;
  const procs = new Procs();
  const tmp = mkdtempSync(join(os.tmpdir(), "ashmesh-bench-"));
  let cleaned = false;
  let interrupted = false;
  const cleanup = async () => {
    if (cleaned) return;
    cleaned = true;
    await procs.stopAll();
    if (o.keep) progress(`kept ${tmp}`);
    else rmSync(tmp, { recursive: true, force: true });
  };
  const onSignal = (signal: NodeJS.Signals) => {
    interrupted = true;
    progress(`${signal}: stopping everything the bench started`);
    void cleanup().finally(() => process.exit(signal === "SIGINT" ? 130 : 143));
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);

  const loadBefore = os.loadavg();
  const report: BenchReport = {
    startedAt: new Date().toISOString(),
    seconds: 0,
    quick: o.quick,
    machine: {},
    settings: {
      rates: o.rates,
      durationS: o.durationS,
      warmupS: o.warmupS,
      connections: o.connections,
      maxInFlight: o.maxInFlight,
      timeoutMs: o.timeoutMs,
      throughputS: o.throughputS,
      handshakeS: o.handshakeS,
      handshakeClients: o.handshakeClients,
      repeat: o.repeat,
      cores: { proxiesAndApp: PROXY_CORE, loadGenerators: LOAD_CORE },
    },
    notes: [],
    rates: [],
    allRates: [],
    throughput: [],
    handshakes: [],
    memory: [],
  };
  try {
    if (os.cpus().length < 2) report.notes.push("fewer than 2 CPUs: the generator shares a core with the proxies.");
    if (!hasTaskset()) report.notes.push("taskset not found: nothing was pinned to a core.");
    if (o.cpuProf) mkdirSync(o.cpuProf, { recursive: true });

    progress(`temporary CA and certificates for ${CALLER} and ${CALLEE} in ${tmp}`);
    const ca = await DevCa.init(join(tmp, "pki"));
    await ca.issue(CALLER);
    await ca.issue(CALLEE);

    const stack = await startStack(procs, tmp, ca, o, report.notes);
    await checkPaths(stack);
    progress(`every path answers (${[...stack.paths.keys()].join(", ")}); the pairs deliver the caller's identity`);
    const idleMemory = new Map(stack.memoryOf.map((m) => [m.name, memory(m.pids())]));
    const generator = procs.startLines("load generator", process.execPath, [LOAD, "--serve"], { core: LOAD_CORE });
    const ctx: Ctx = { o, procs, stack, generator, order: o.paths.filter((p) => stack.paths.has(p)), report };
    const wrkBin = findTool("/usr/bin/wrk", "/usr/local/bin/wrk");

    await warmUp(ctx);
    await measureRates(ctx);
    if (o.throughputS > 0) await measureThroughput(ctx, wrkBin);
    if (o.handshakeS > 0) await measureHandshakes(ctx, ca);
    report.memory = stack.memoryOf.map((m) => ({
      name: m.name,
      idle: idleMemory.get(m.name) ?? { rss: 0, peak: 0 },
      end: memory(m.pids()),
    }));

    // A process that died under load makes the numbers meaningless: say so instead of printing them.
    const died = procs.exitedEarly();
    if (died) throw new Error(`${died.name} exited during the run (code ${died.exitCode}):\n${tail(died.logFile)}`);

    report.seconds = (performance.now() - t0) / 1000;
    report.machine = describeMachine(stack, wrkBin, loadBefore);
    report.notes.push(...noiseNotes(report, loadBefore));
    const md = markdown(report);
    process.stdout.write(`\n${md}`);
    if (o.out) {
      mkdirSync(o.out, { recursive: true });
      writeFileSync(join(o.out, "latest.json"), `${toJson(report)}\n`);
      writeFileSync(join(o.out, "latest.md"), md);
      progress(`wrote ${join(o.out, "latest.md")} and latest.json`);
    }
    return 0;
  } catch (err) {
    // After Ctrl-C the run fails because its processes were stopped: that is not news.
    if (!interrupted) process.stderr.write(`bench: ${err instanceof Error ? err.message : String(err)}\n`);
    return 1;
  } finally {
    progress("stopping the processes and removing the temporary directory");
    await cleanup();
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`bench: ${String(err)}\n`);
    process.exitCode = 1;
  },
);
