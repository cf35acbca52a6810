// `npm run bench`: latency of the ashmesh sidecar pair against the direct path and the nginx and
// HAProxy mTLS pairs, at fixed request rates (open loop), plus maximum throughput, new mTLS
// connections per second, CPU per request and memory; HTTP/2, gRPC and TCP rows; start-up time;
// optionally a soak; and the targets table. Everything it starts runs as its own process: the
// apps and the proxies pinned to core 0, the load generators to core 1. Results go to stdout and
// to bench/results/latest.{md,json}; progress goes to stderr. This file only reads the options and
// runs the steps in order: contenders.ts says what is compared, stack.ts starts and stops it,
// measure.ts, protocols.ts, startup.ts and soak.ts take the rows, targets.ts judges them and
// report.ts writes them.
import { mkdirSync, writeFileSync } from "node:fs";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { ALL_PATHS, ALL_PROTOCOLS } from "./contenders.js";
import {
  type Ctx,
  describeMachine,
  idleMemory,
  type MeasureOptions,
  measureHandshakes,
  measureRates,
  measureThroughput,
  memoryRows,
  newReport,
  noiseNotes,
  startGenerator,
  warmUp,
} from "./measure.js";
import { hasTaskset, tail } from "./procs.js";
import { checkProtocolPaths, measureGrpc, measureH2, measureTcp, protocolSection } from "./protocols.js";
import { markdown, type PathId, type Protocol, toJson } from "./report.js";
import { parseDuration, runSoak, SOAK_MAX_S, soakSection } from "./soak.js";
import { checkPaths, type StackOptions, startStack, workspace } from "./stack.js";
import { measureStartup, startupSection } from "./startup.js";
import { targets, targetsSection } from "./targets.js";
import { findTool } from "./tools.js";

const HERE = dirname(fileURLToPath(import.meta.url));
/** dist/bench → the package root. */
const ROOT = resolve(HERE, "..", "..");

const HELP = `npm run bench -- [options]        (or: node dist/bench/run.js [options])

  --quick                 a sanity run of every row in a few minutes: rates 500,2000, 2 s each, short
                          throughput/handshake/protocol runs
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
  --no-haproxy            skip the HAProxy reference pair
  --protocols LIST        protocol rows, any of ${ALL_PROTOCOLS.join(",")}, or none (default: all): HTTP/2 with
                          h2load (as long as --throughput), gRPC unary at the rates up to 2000, Redis over TCP
  --startup N             times a sidecar is started to time spawn → /readyz 200, 0 to skip (default 5; quick 3)
  --soak DURATION         after the other rows, 1000 req/s through the ashmesh pair for DURATION (e.g. 90s,
                          20m, 1h; at most 2h): RSS, heap, GC pauses (adds --trace-gc to the sidecars), errors
  --peer-protocol P       outbound.peerProtocol of the caller's sidecars: match (default: HTTP/1.1 callers
                          over pooled HTTP/1.1 to the peer) or h2 (every request over one HTTP/2 session)
  --cpu-prof DIR          run the sidecars with --cpu-prof, profiles written to DIR on exit
  --sidecar-node-arg ARG  an extra Node option for the sidecars (repeatable), e.g. --trace-gc
  --out DIR               where latest.json and latest.md go (default bench/results; "-" for none)
  --keep                  keep the temporary directory (configs, logs) and print its path
`;

interface Options extends StackOptions, MeasureOptions {
  startupRuns: number;
  /** Seconds of --soak, 0 for none. */
  soakS: number;
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
      "no-haproxy": { type: "boolean" },
      protocols: { type: "string" },
      startup: { type: "string" },
      soak: { type: "string" },
      repeat: { type: "string" },
      "cpu-prof": { type: "string" },
      "peer-protocol": { type: "string" },
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
  const protocolList = values.protocols ?? ALL_PROTOCOLS.join(",");
  const protocols = (protocolList.trim() === "none" ? [] : protocolList.split(",")).map((p) => p.trim()) as Protocol[];
  for (const p of protocols) {
    if (!ALL_PROTOCOLS.includes(p)) {
      throw new UsageError(`--protocols: unknown protocol "${p}"; expected ${ALL_PROTOCOLS.join(", ")} or none`);
    }
  }
  let soakS = 0;
  if (values.soak !== undefined) {
    const parsed = parseDuration(values.soak);
    if (parsed === null || parsed <= 0) throw new UsageError(`--soak: expected a duration such as 90s, 20m or 1h`);
    if (parsed > SOAK_MAX_S) throw new UsageError("--soak: at most 2h");
    soakS = parsed;
  }
  const peerProtocol = values["peer-protocol"] ?? "match";
  if (peerProtocol !== "match" && peerProtocol !== "h2") {
    throw new UsageError(`--peer-protocol: expected match or h2, got "${peerProtocol}"`);
  }
  const nodeArgs = values["sidecar-node-arg"] ?? [];
  // The soak's GC pauses are read from the sidecars' --trace-gc lines.
  if (soakS > 0 && !nodeArgs.includes("--trace-gc")) nodeArgs.push("--trace-gc");
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
    skip: [
      ...(values["no-nginx"] ? (["nginx"] as const) : []),
      ...(values["no-haproxy"] ? (["haproxy"] as const) : []),
    ],
    protocols,
    startupRuns: Math.min(20, Math.round(positive("startup", values.startup, quick ? 3 : 5, true))),
    soakS,
    cpuProf: values["cpu-prof"] ? resolve(values["cpu-prof"]) : null,
    sidecarNodeArgs: nodeArgs,
    peerProtocol,
    out: values.out === "-" ? null : resolve(values.out ?? join(ROOT, "bench", "results")),
    keep: values.keep ?? false,
  };
}

const t0 = performance.now();
function progress(message: string): void {
  process.stderr.write(`[bench ${((performance.now() - t0) / 1000).toFixed(1).padStart(5)} s] ${message}\n`);
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
  const ws = workspace(o.keep, progress);
  const loadBefore = os.loadavg();
  const report = newReport(o);
  try {
    if (os.cpus().length < 2) report.notes.push("fewer than 2 CPUs: the generator shares a core with the proxies.");
    if (!hasTaskset()) report.notes.push("taskset not found: nothing was pinned to a core.");
    if (o.cpuProf) mkdirSync(o.cpuProf, { recursive: true });

    report.settings.protocols = o.protocols;
    report.settings.startupRuns = o.startupRuns;
    report.settings.soakS = o.soakS;
    report.settings.peerProtocol = o.peerProtocol;
    if (o.soakS > 0) report.notes.push("--soak: the sidecars ran with --trace-gc for the whole run (GC pauses).");
    const stack = await startStack(ws, o, report.notes, progress);
    await checkPaths(stack);
    await checkProtocolPaths(stack);
    if (stack.started.has("ashmesh-auto")) {
      report.notes.push(
        'the ashmesh pair with workers: "auto" runs on cores 0 and 1, so it shares core 1 with the load generator, ' +
          "as sidecars spread over a 2-core host would.",
      );
    }
    report.protocols.missing = stack.cannot;
    report.protocols.between = stack.protocolPaths.map(({ protocol, id, between }) => ({
      protocol,
      path: id,
      between,
    }));
    progress(
      `every path answers (${[...stack.paths.keys()].join(", ")}` +
        `${stack.protocolPaths.length ? `; ${stack.protocolPaths.map((p) => `${p.id} ${p.protocol}`).join(", ")}` : ""}); ` +
        "the pairs deliver the caller's identity",
    );
    const idle = idleMemory(stack);
    const generator = startGenerator(ws.procs);
    const order = o.paths.filter((p) => stack.paths.has(p));
    const ctx: Ctx = { o, procs: ws.procs, stack, generator, order, report, progress };
    const wrkBin = findTool("/usr/bin/wrk", "/usr/local/bin/wrk");

    await warmUp(ctx);
    await measureRates(ctx);
    if (o.throughputS > 0) await measureThroughput(ctx, wrkBin);
    if (o.handshakeS > 0) await measureHandshakes(ctx);
    if (o.throughputS > 0) await measureH2(ctx);
    else if (stack.protocols.includes("h2"))
      report.notes.push("--throughput 0: the HTTP/2 rows (closed loop) were skipped.");
    await measureGrpc(ctx);
    await measureTcp(ctx);
    if (o.startupRuns > 0) report.startup = await measureStartup(stack, o.startupRuns, progress);
    if (o.soakS > 0) report.soak = await runSoak(ctx, o.soakS);
    report.memory = memoryRows(stack, idle);

    // A process that died under load makes the numbers meaningless: say so instead of printing them.
    const died = ws.procs.exitedEarly();
    if (died) throw new Error(`${died.name} exited during the run (code ${died.exitCode}):\n${tail(died.logFile)}`);

    report.seconds = (performance.now() - t0) / 1000;
    report.machine = describeMachine(stack, wrkBin, loadBefore);
    report.notes.push(...noiseNotes(report, loadBefore));
    report.targets = targets(report);
    const md = markdown(
      report,
      [protocolSection(report), startupSection(report.startup), soakSection(report)],
      [targetsSection(report)],
    );
    process.stdout.write(`\n${md}`);
    if (o.out) {
      mkdirSync(o.out, { recursive: true });
      writeFileSync(join(o.out, "latest.json"), `${toJson(report)}\n`);
      writeFileSync(join(o.out, "latest.md"), md);
      progress(`wrote ${join(o.out, "latest.md")} and latest.json`);
    }
    return 0;
  } catch (err) {
    if (!ws.interrupted()) {
      process.stderr.write(`bench: ${err instanceof Error ? err.message : String(err)}\n`);
      // A step that failed because a proxy died (wrk: "connection refused") says so itself.
      const died = ws.procs.exitedEarly();
      if (died)
        process.stderr.write(`bench: ${died.name} had exited (code ${died.exitCode}):\n${tail(died.logFile)}\n`);
    }
    return 1;
  } finally {
    progress("stopping the processes and removing the temporary directory");
    await ws.teardown();
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
