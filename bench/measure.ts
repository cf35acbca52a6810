// The measurements, one function per kind of row: latency at fixed rates (open loop), maximum
// throughput (closed loop), new mTLS connections per second, the CPU each costs, and memory. They
// run against a stack that is already up and fill in a BenchReport; report.ts turns it into text.
// The protocol rows (protocols.ts) use the same fixed-rate matrix and CPU meter for gRPC.
import os from "node:os";
import { fileURLToPath } from "node:url";
import { CALLER, LOAD_CORE, type PathSetup, PROXY_CORE } from "./contenders.js";
import { findHaproxy } from "./haproxy.js";
import type { ClosedLoopResult, LoadSpec, OpenLoopResult, Target } from "./load.js";
import { findNginx } from "./nginx.js";
import {
  coreBusy,
  coreTimes,
  cpuSeconds,
  hasTaskset,
  type LineProc,
  type Memory,
  memory,
  type Procs,
} from "./procs.js";
import { type BenchReport, type MemoryRow, PATH_LABELS, type PathId, type RateRun, sustained } from "./report.js";
import { PROTOCOL_TOOLS, type Stack } from "./stack.js";
import { findTool, handshakes, version, wrk } from "./tools.js";

const LOAD = fileURLToPath(new URL("load.js", import.meta.url));

export interface MeasureOptions {
  quick: boolean;
  rates: number[];
  durationS: number;
  warmupS: number;
  connections: number;
  maxInFlight: number;
  timeoutMs: number;
  throughputS: number;
  handshakeS: number;
  handshakeClients: number;
  repeat: number;
}

/** An empty report whose settings record how the rows will be measured. */
export function newReport(o: MeasureOptions): BenchReport {
  return {
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
    memoryAfterRate: null,
    protocols: { h2: [], grpc: [], tcp: [], between: [], missing: [] },
    startup: null,
    soak: null,
    targets: [],
  };
}

/** One generator process for the whole run: see load.ts --serve. */
export function startGenerator(procs: Procs): LineProc {
  return procs.startLines("load generator", process.execPath, [LOAD, "--serve"], { core: LOAD_CORE });
}

/** What every measurement step needs. */
export interface Ctx {
  o: MeasureOptions;
  procs: Procs;
  stack: Stack;
  generator: LineProc;
  /** The paths to measure, in the order they alternate. */
  order: PathId[];
  report: BenchReport;
  progress: (message: string) => void;
}

export async function runLoad(generator: LineProc, spec: LoadSpec, timeoutMs: number): Promise<unknown> {
  const line = await generator.ask(JSON.stringify(spec), timeoutMs);
  const result = JSON.parse(line) as { error?: string };
  if (result.error) throw new Error(`load generator: ${result.error}`);
  return result;
}

/** CPU of a path's proxies and of its app, and the cores' business, between start() and stop(). */
export function cpuMeter(pids: number[], appPid: number | null) {
  const apps = appPid === null ? [] : [appPid];
  const cpu0 = cpuSeconds(pids);
  const app0 = cpuSeconds(apps);
  const core0 = coreTimes();
  const wall0 = performance.now();
  return () => {
    const wallS = (performance.now() - wall0) / 1000;
    const proxyCpuS = cpuSeconds(pids) - cpu0;
    const appCpuS = cpuSeconds(apps) - app0;
    return { wallS, proxyCpuS, appCpuS, coreBusy: coreBusy(core0, coreTimes()) };
  };
}

export function openSpec(
  o: MeasureOptions,
  target: Target,
  rate: number,
  warmupS: number,
  durationS: number,
): LoadSpec {
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
export async function warmUp({ o, stack, generator, order, progress }: Ctx): Promise<void> {
  const rate = Math.min(2_000, Math.max(...o.rates));
  const seconds = o.quick ? 1 : 2;
  progress(`warm-up: ${seconds} s at ${rate} req/s on each path`);
  for (const id of order) {
    const target = (stack.paths.get(id) as PathSetup).target;
    await runLoad(generator, openSpec(o, target, rate, 0, seconds), seconds * 1000 + o.timeoutMs + 20_000);
  }
}

/** A path of a fixed-rate matrix: where the load goes, whose CPU it costs, which app answers. */
export interface Lane {
  id: PathId;
  target: Target;
  proxyPids: () => number[];
  appPid: number;
}

/**
 * Fixed rates, open loop, for every lane: the lanes alternate within each rate (and rounds repeat
 * the whole matrix), so that a burst of noise from elsewhere on the machine lands on all of them
 * rather than on one lane. `all` gets every run; the result is, per rate and lane, the round whose
 * p99 is the median. `afterRate` runs once all lanes of a rate are done, in every round.
 */
export async function rateMatrix(
  { o, generator, progress }: Ctx,
  lanes: Lane[],
  rates: number[],
  all: RateRun[],
  label: string,
  afterRate?: (rate: number) => void,
): Promise<RateRun[]> {
  for (let round = 1; round <= o.repeat; round++) {
    for (const rate of rates) {
      for (const lane of lanes) {
        const stop = cpuMeter(lane.proxyPids(), lane.appPid);
        const load = (await runLoad(
          generator,
          openSpec(o, lane.target, rate, o.warmupS, o.durationS),
          (o.warmupS + o.durationS) * 1000 + o.timeoutMs + 20_000,
        )) as OpenLoopResult;
        const m = stop();
        all.push({
          path: lane.id,
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
          `${o.repeat > 1 ? `round ${round}/${o.repeat} ` : ""}${label}${String(rate).padStart(5)} req/s  ${PATH_LABELS[lane.id].padEnd(28)} ` +
            `p50 ${l.p50.toFixed(2)} ms  p99 ${l.p99.toFixed(2)} ms  ` +
            `achieved ${Math.round(load.achievedRate)}/s${sustained(load) ? "" : " (not sustained)"}`,
        );
      }
      afterRate?.(rate);
    }
  }
  const medians: RateRun[] = [];
  for (const rate of rates) {
    for (const lane of lanes) {
      const runs = all
        .filter((r) => r.rate === rate && r.path === lane.id)
        .sort((a, b) => a.load.latency.p99 - b.load.latency.p99);
      const median = runs[Math.floor((runs.length - 1) / 2)];
      if (median) medians.push(median);
    }
  }
  return medians;
}

/** The rate after which the memory target is read: 2,000 req/s, or the highest rate below it. */
export const MEMORY_RATE = 2_000;

/**
 * The HTTP paths at fixed rates. Memory is sampled right after the 2,000 req/s rate (the RSS
 * target's moment), before throughput and handshakes have grown anything further.
 */
export async function measureRates(ctx: Ctx): Promise<void> {
  const { o, stack, order, report } = ctx;
  const lanes = order.map((id) => {
    const setup = stack.paths.get(id) as PathSetup;
    return { id, target: setup.target, proxyPids: setup.proxyPids, appPid: stack.app.pid };
  });
  const memoryRate = Math.max(...o.rates.filter((r) => r <= MEMORY_RATE), 0);
  report.rates = await rateMatrix(ctx, lanes, o.rates, report.allRates, "", (rate) => {
    if (rate !== memoryRate) return;
    report.memoryAfterRate = { rate, rows: stack.memoryOf.map((m) => ({ name: m.name, rss: memory(m.pids()).rss })) };
  });
}

/** Closed loop at `connections`: wrk when installed (C, cheap per request), else the Node generator. */
export async function measureThroughput(
  { o, procs, stack, generator, order, report, progress }: Ctx,
  wrkBin: string | null,
): Promise<void> {
  if (!wrkBin) report.notes.push("wrk not found: throughput measured with the Node closed-loop generator instead.");
  // The forward proxy's throughput is the port-mapped one's: same code after the target is parsed.
  for (const id of order.filter((p) => p !== "ashmesh-fwd")) {
    const setup = stack.paths.get(id) as PathSetup;
    const stop = cpuMeter(setup.proxyPids(), stack.app.pid);
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
export async function measureHandshakes({ o, procs, stack, report, progress }: Ctx): Promise<void> {
  const openssl = findTool("/usr/bin/openssl", "/usr/local/bin/openssl");
  if (!openssl) {
    report.notes.push("openssl not found: new-connection rates were not measured.");
    return;
  }
  const gw = stack.ca.identityFiles(CALLER);
  for (const s of stack.inbounds) {
    const stop = cpuMeter(s.pids(), null);
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

/** Memory right after start, before any load, for the "after start" column. */
export function idleMemory(stack: Stack): Map<string, Memory> {
  return new Map(stack.memoryOf.map((m) => [m.name, memory(m.pids())]));
}

export function memoryRows(stack: Stack, idle: Map<string, Memory>): MemoryRow[] {
  return stack.memoryOf.map((m) => ({
    name: m.name,
    idle: idle.get(m.name) ?? { rss: 0, peak: 0 },
    end: memory(m.pids()),
  }));
}

export function describeMachine(stack: Stack, wrkBin: string | null, loadBefore: number[]): Record<string, string> {
  const nginx = findNginx();
  const haproxy = findHaproxy();
  const h2loadBin = PROTOCOL_TOOLS.h2load();
  const redis = PROTOCOL_TOOLS.redisServer();
  return {
    cpu: `${os.cpus()[0]?.model ?? "unknown"} × ${os.cpus().length}`,
    kernel: `${os.type()} ${os.release()}`,
    memory: `${(os.totalmem() / 2 ** 30).toFixed(1)} GiB`,
    node: `${process.version} (OpenSSL ${process.versions.openssl}) — the sidecars, the app and the generator`,
    nginx:
      stack.started.has("nginx") && nginx
        ? `${version(nginx, ["-V"], /nginx\/\S+/)} (${version(nginx, ["-V"], /running with OpenSSL [^)]+|built with OpenSSL \S+/)})`
        : "not run",
    haproxy:
      stack.started.has("haproxy") && haproxy
        ? `${version(haproxy, ["-v"], /HAProxy version \S+/)} (${version(haproxy, ["-vv"], /Running on OpenSSL version : [^\n]+/)})`
        : "not run",
    h2load: stack.protocols.includes("h2") && h2loadBin ? version(h2loadBin, ["--version"]) : "not run",
    redis: stack.protocols.includes("tcp") && redis ? version(redis, ["--version"], /v=\S+/) : "not run",
    wrk: wrkBin ? version(wrkBin, ["-v"], /wrk \S+/) : "not installed",
    openssl: version("openssl", ["version"]),
    pinning: hasTaskset() ? `proxies and app on core ${PROXY_CORE}, load generators on core ${LOAD_CORE}` : "none",
    "load average (1 min) before / after": `${loadBefore[0]?.toFixed(2)} / ${os.loadavg()[0]?.toFixed(2)}`,
  };
}

/** Warnings for the reader when the machine was busy with other work while we measured. */
export function noiseNotes(report: BenchReport, loadBefore: number[]): string[] {
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
