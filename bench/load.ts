// The load generator, run as its own process (`taskset -c 1 node dist/bench/load.js JSON`) so
// that it never shares a core with what it measures. It prints one JSON result line on stdout.
//
// open loop: request i is scheduled at start + i / rate, whatever happened to earlier requests,
//   and its latency is completion − scheduled time. A proxy that stalls therefore shows its
//   queueing in the latency instead of slowing the generator down (no coordinated omission).
//   Requests beyond `maxInFlight` outstanding are dropped and counted, never silently delayed.
// closed loop: `connections` workers each send the next request when the previous one is
//   answered, for the maximum throughput when wrk is not installed.
// Both send HTTP/1.1 GETs over a keep-alive pool, or gRPC unary calls (bench/grpc.ts) when the
// target says so: the schedule and the counting are the same whatever carries the request.
import { pathToFileURL } from "node:url";
import type { Dispatcher } from "undici";
import { Pool } from "undici";
import { EMPTY_SUMMARY, type Summary, summarize } from "./stats.js";

export interface Target {
  /** Origin the pool connects to: the app, a sidecar's outbound listener, nginx. */
  origin: string;
  /** Request target: "/path", or an absolute URL for a forward proxy. */
  path: string;
  /** Host header (for the forward proxy: the destination's name). */
  host: string;
  /** "grpc": unary calls of bench/grpc.ts's method over one HTTP/2 channel to `origin`. Default: HTTP/1.1. */
  protocol?: "http1" | "grpc";
}

export interface OpenLoopSpec {
  mode: "open";
  target: Target;
  rate: number;
  warmupS: number;
  durationS: number;
  connections: number;
  maxInFlight: number;
  timeoutMs: number;
}

export interface ClosedLoopSpec {
  mode: "closed";
  target: Target;
  connections: number;
  warmupS: number;
  durationS: number;
  timeoutMs: number;
}

export type LoadSpec = OpenLoopSpec | ClosedLoopSpec;

export interface OpenLoopResult {
  mode: "open";
  rate: number;
  /** Requests scheduled in the measured window (after the warm-up). */
  scheduled: number;
  sent: number;
  ok: number;
  /** Answers other than 2xx, by status. */
  non2xx: Record<string, number>;
  /** Transport errors by code (connection refused, reset, ...), timeouts excluded. */
  errors: Record<string, number>;
  timeouts: number;
  /** Not sent because `maxInFlight` requests were already outstanding. */
  dropped: number;
  /** Requests the generator sent (or dropped) per second, on schedule: its own health. */
  sendRate: number;
  /** 2xx answers per second, from the window's start to the last answer. */
  achievedRate: number;
  /** How late the generator acted, behind schedule (ms): p50 / p99 / max. */
  sendLag: { p50: number; p99: number; max: number };
  /** Answer time − scheduled send time: the latency a caller at this rate sees, queueing included. */
  latency: Summary;
  /** Answer time − actual send time: without the generator's own lateness (for diagnosis only). */
  serviceLatency: Summary;
  /** Every completed request including the warm-up, for CPU per request. */
  totalCompleted: number;
  /** CPU of the generator over the whole run divided by wall time (1.0 = one full core). */
  generatorCpu: number;
}

export interface ClosedLoopResult {
  mode: "closed";
  connections: number;
  ok: number;
  errors: number;
  throughput: number;
  latency: Summary;
  totalCompleted: number;
  generatorCpu: number;
}

const TIMEOUT_CODES = new Set([
  "UND_ERR_HEADERS_TIMEOUT",
  "UND_ERR_BODY_TIMEOUT",
  "UND_ERR_CONNECT_TIMEOUT",
  "GRPC_DEADLINE_EXCEEDED",
]);

/** Called once per request: the HTTP status (200 for a gRPC OK), or an error whose `code` names it. */
export type Done = (status: number, error: Error | null) => void;

/** How a run sends one request, whatever the protocol. */
export interface Sender {
  send(done: Done): void;
  close(): Promise<void>;
}

/** undici's raw handler: no header parsing, no body stream; the body is read and dropped. */
class Exchange implements Dispatcher.DispatchHandler {
  private status = 0;
  constructor(private readonly done: Done) {}
  onConnect(): void {}
  onHeaders(statusCode: number): boolean {
    this.status = statusCode;
    return true;
  }
  onData(): boolean {
    return true;
  }
  onComplete(): void {
    this.done(this.status, null);
  }
  onError(err: Error): void {
    this.done(0, err);
  }
}

function makePool(target: Target, connections: number, timeoutMs: number): Pool {
  return new Pool(target.origin, {
    connections,
    pipelining: 1,
    keepAliveTimeout: 30_000,
    headersTimeout: timeoutMs,
    bodyTimeout: timeoutMs,
    connect: { timeout: timeoutMs },
  });
}

function httpSender(target: Target, connections: number, timeoutMs: number): Sender {
  const pool = makePool(target, connections, timeoutMs);
  return {
    send: (done) =>
      pool.dispatch(
        {
          method: "GET",
          path: target.path,
          headers: ["host", target.host],
          headersTimeout: timeoutMs,
          bodyTimeout: timeoutMs,
        },
        new Exchange(done),
      ),
    close: () => pool.destroy().catch(() => undefined),
  };
}

/** gRPC is loaded only when asked for: HTTP runs need nothing but undici. */
async function senderFor(target: Target, connections: number, timeoutMs: number): Promise<Sender> {
  if (target.protocol === "grpc") {
    const { grpcSender } = await import("./grpc.js");
    return grpcSender(target, timeoutMs);
  }
  return httpSender(target, connections, timeoutMs);
}

function errorCode(err: Error): string {
  return (err as NodeJS.ErrnoException).code ?? err.name;
}

function cpuShare(startCpu: NodeJS.CpuUsage, startWall: number): number {
  const cpu = process.cpuUsage(startCpu);
  return (cpu.user + cpu.system) / 1000 / (performance.now() - startWall);
}

export async function openLoop(spec: OpenLoopSpec): Promise<OpenLoopResult> {
  const { target, rate, timeoutMs } = spec;
  const sender = await senderFor(target, spec.connections, timeoutMs);
  const interval = 1000 / rate;
  const warmupCount = Math.round(spec.warmupS * rate);
  const total = warmupCount + Math.round(spec.durationS * rate);
  const measured = total - warmupCount;
  const latencies = new Float64Array(measured);
  const lags = new Float64Array(measured);
  const result: OpenLoopResult = {
    mode: "open",
    rate,
    scheduled: measured,
    sent: 0,
    ok: 0,
    non2xx: {},
    errors: {},
    timeouts: 0,
    dropped: 0,
    sendRate: 0,
    achievedRate: 0,
    sendLag: { p50: 0, p99: 0, max: 0 },
    latency: { ...EMPTY_SUMMARY },
    serviceLatency: { ...EMPTY_SUMMARY },
    totalCompleted: 0,
    generatorCpu: 0,
  };
  const service = new Float64Array(measured);
  const cpu0 = process.cpuUsage();
  const wall0 = performance.now();
  let inFlight = 0;
  let lastCompletion = 0;
  let attempts = 0;
  let firstSend = 0;
  let lastSend = 0;
  let onIdle: (() => void) | null = null;
  // Set once the result is taken: answers (or pool-destroyed errors) after that are ignored.
  let finished = false;

  const start = performance.now() + 20;
  const windowStart = start + warmupCount * interval;
  let next = 0;

  const fire = (i: number, scheduled: number, now: number) => {
    const inWindow = i >= warmupCount;
    if (inWindow) {
      // The generator's own punctuality, whether or not the request then goes out.
      const k = attempts++;
      lags[k] = now - scheduled;
      if (k === 0) firstSend = now;
      lastSend = now;
    }
    if (inFlight >= spec.maxInFlight) {
      if (inWindow) result.dropped++;
      return;
    }
    inFlight++;
    if (inWindow) result.sent++;
    sender.send((status, err) => {
      if (finished) return;
      const end = performance.now();
      inFlight--;
      result.totalCompleted++;
      if (inWindow) {
        if (err) {
          const code = errorCode(err);
          if (TIMEOUT_CODES.has(code)) result.timeouts++;
          else result.errors[code] = (result.errors[code] ?? 0) + 1;
        } else if (status >= 200 && status < 300) {
          service[result.ok] = end - now;
          latencies[result.ok++] = end - scheduled;
          lastCompletion = end;
        } else {
          result.non2xx[String(status)] = (result.non2xx[String(status)] ?? 0) + 1;
        }
      }
      if (inFlight === 0 && next >= total) onIdle?.();
    });
  };

  // Timers fire about a millisecond late, which would count as latency: sleep with a timer only
  // while the next send is more than ~1.5 ms away, and spin on setImmediate (I/O still runs
  // between iterations) for the rest.
  await new Promise<void>((resolve) => {
    const tick = () => {
      const now = performance.now();
      while (next < total) {
        const scheduled = start + next * interval;
        if (scheduled > now) break;
        fire(next, scheduled, now);
        next++;
      }
      if (next >= total) return resolve();
      const wait = start + next * interval - performance.now();
      if (wait > 1.5) setTimeout(tick, wait - 1.2);
      else setImmediate(tick);
    };
    tick();
  });

  // Everything is scheduled: wait for what is outstanding, at most timeoutMs (+ a margin).
  if (inFlight > 0) {
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      new Promise<void>((resolve) => (onIdle = resolve)),
      new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs + 1_000))),
    ]);
    clearTimeout(timer);
  }
  finished = true;
  result.timeouts += inFlight;
  result.generatorCpu = cpuShare(cpu0, wall0);
  await sender.close();

  result.latency = summarize(latencies, result.ok);
  result.serviceLatency = summarize(service, result.ok);
  const sentLags = lags.slice(0, attempts).sort();
  result.sendLag = {
    p50: sentLags[Math.floor(sentLags.length * 0.5)] ?? 0,
    p99: sentLags[Math.min(sentLags.length - 1, Math.floor(sentLags.length * 0.99))] ?? 0,
    max: sentLags[sentLags.length - 1] ?? 0,
  };
  const sendSpan = (lastSend - firstSend) / 1000;
  result.sendRate = sendSpan > 0 ? (attempts - 1) / sendSpan : 0;
  const okSpan = (lastCompletion - windowStart) / 1000;
  result.achievedRate = okSpan > 0 ? result.ok / okSpan : 0;
  return result;
}

export async function closedLoop(spec: ClosedLoopSpec): Promise<ClosedLoopResult> {
  const { target, timeoutMs } = spec;
  const sender = await senderFor(target, spec.connections, timeoutMs);
  const capacity = Math.ceil(spec.durationS * 200_000);
  const latencies = new Float64Array(Math.min(capacity, 5_000_000));
  const result: ClosedLoopResult = {
    mode: "closed",
    connections: spec.connections,
    ok: 0,
    errors: 0,
    throughput: 0,
    latency: { ...EMPTY_SUMMARY },
    totalCompleted: 0,
    generatorCpu: 0,
  };
  const cpu0 = process.cpuUsage();
  const wall0 = performance.now();
  const windowStart = wall0 + spec.warmupS * 1000;
  const windowEnd = windowStart + spec.durationS * 1000;
  const worker = () =>
    new Promise<void>((resolve) => {
      const loop = () => {
        const started = performance.now();
        if (started >= windowEnd) return resolve();
        sender.send((status, err) => {
          const end = performance.now();
          result.totalCompleted++;
          if (started >= windowStart && end <= windowEnd) {
            if (!err && status >= 200 && status < 300 && result.ok < latencies.length) {
              latencies[result.ok++] = end - started;
            } else if (err || status < 200 || status >= 300) result.errors++;
          }
          // An error would otherwise spin as fast as the connection fails.
          if (err) setTimeout(loop, 10);
          else loop();
        });
      };
      loop();
    });
  await Promise.all(Array.from({ length: spec.connections }, worker));
  result.generatorCpu = cpuShare(cpu0, wall0);
  await sender.close();
  result.latency = summarize(latencies, result.ok);
  result.throughput = result.ok / spec.durationS;
  return result;
}

function run(spec: LoadSpec): Promise<OpenLoopResult | ClosedLoopResult> {
  return spec.mode === "open" ? openLoop(spec) : closedLoop(spec);
}

/**
 * `load.js --serve`: one spec per line on stdin, one result per line on stdout, until stdin
 * closes. One process for the whole bench keeps its JIT and heap warm between runs, so a fresh
 * process's first milliseconds are not measured as the proxies' latency.
 */
async function serve(): Promise<void> {
  let buffer = "";
  let queue = Promise.resolve();
  process.stdin.setEncoding("utf8");
  process.stdin.on("data", (chunk: string) => {
    buffer += chunk;
    let nl = buffer.indexOf("\n");
    while (nl !== -1) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 1);
      nl = buffer.indexOf("\n");
      if (!line.trim()) continue;
      queue = queue.then(async () => {
        try {
          const result = await run(JSON.parse(line) as LoadSpec);
          process.stdout.write(`${JSON.stringify(result)}\n`);
        } catch (err) {
          process.stdout.write(`${JSON.stringify({ error: err instanceof Error ? err.message : String(err) })}\n`);
        }
      });
    }
  });
  await new Promise<void>((resolve) => process.stdin.once("end", resolve));
  await queue;
}

async function main(): Promise<void> {
  const arg = process.argv[2];
  if (arg === "--serve") return serve();
  if (!arg) {
    process.stderr.write("usage: node dist/bench/load.js '<json spec>' | --serve   (started by bench/run.ts)\n");
    process.exitCode = 2;
    return;
  }
  process.stdout.write(`${JSON.stringify(await run(JSON.parse(arg) as LoadSpec))}\n`);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exitCode = 1;
  });
}
