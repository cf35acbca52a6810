// `npm run bench`: latency of the ashmesh sidecar pair against the direct path and an nginx mTLS
// pair, at fixed request rates (open loop), plus maximum throughput, new mTLS connections per
// second, CPU per request and memory. Everything it starts runs as its own process: the app and
// the proxies pinned to core 0, the load generators to core 1. Results go to stdout and to
// bench/results/latest.{md,json}; progress goes to stderr. This file only reads the options and
// runs the steps in order: contenders.ts says what is compared, stack.ts starts and stops it,
// measure.ts takes the rows and report.ts writes them.
import { mkdirSync, writeFileSync } from "node:fs";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { ALL_PATHS } from "./contenders.js";
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
import { markdown, type PathId, toJson } from "./report.js";
import { checkPaths, type StackOptions, startStack, workspace } from "./stack.js";
import { findTool } from "./tools.js";

const HERE = dirname(fileURLToPath(import.meta.url));
/** dist/bench → the package root. */
const ROOT = resolve(HERE, "..", "..");

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

interface Options extends StackOptions, MeasureOptions {
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
    skip: values["no-nginx"] ? ["nginx"] : [],
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

    const stack = await startStack(ws, o, report.notes, progress);
    await checkPaths(stack);
    progress(`every path answers (${[...stack.paths.keys()].join(", ")}); the pairs deliver the caller's identity`);
    const idle = idleMemory(stack);
    const generator = startGenerator(ws.procs);
    const order = o.paths.filter((p) => stack.paths.has(p));
    const ctx: Ctx = { o, procs: ws.procs, stack, generator, order, report, progress };
    const wrkBin = findTool("/usr/bin/wrk", "/usr/local/bin/wrk");

    await warmUp(ctx);
    await measureRates(ctx);
    if (o.throughputS > 0) await measureThroughput(ctx, wrkBin);
    if (o.handshakeS > 0) await measureHandshakes(ctx);
    report.memory = memoryRows(stack, idle);

    // A process that died under load makes the numbers meaningless: say so instead of printing them.
    const died = ws.procs.exitedEarly();
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
    if (!ws.interrupted()) process.stderr.write(`bench: ${err instanceof Error ? err.message : String(err)}\n`);
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
