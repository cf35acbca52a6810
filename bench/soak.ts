// --soak DURATION: a steady 1,000 req/s through the ashmesh pair for DURATION (at most 2 h), after
// the other rows, to see whether memory stays flat. The load runs in 30 s pieces of the same open
// loop, each printing a progress line; meanwhile every 5 s the sidecars' RSS (from /proc) and
// V8 heap (nodejs_heap_size_used_bytes from their admin /metrics) are sampled. GC pauses come
// from the sidecars' --trace-gc lines written during the soak (run.ts adds the flag when --soak is
// given): prom-client's GC histogram has buckets too coarse (1 ms, 10 ms, 100 ms) for a p99.
import { readFileSync, statSync } from "node:fs";
import type { PathSetup, Sidecar } from "./contenders.js";
import type { OpenLoopResult } from "./load.js";
import { type Ctx, openSpec, runLoad } from "./measure.js";
import { descendantsOf, memory } from "./procs.js";
import { type BenchReport, ms, type SoakResult, type SoakSample, table } from "./report.js";
import { percentile } from "./stats.js";

export const SOAK_RATE = 1_000;
export const SOAK_MAX_S = 2 * 3600;
const PIECE_S = 30;
const SAMPLE_EVERY_MS = 5_000;
/** RSS may grow this much from the soak's start to its end and still count as flat. */
export const FLAT_GROWTH = 0.1;

/** "20m", "90s", "1h", "1.5h" or plain seconds → seconds; null when unreadable. */
export function parseDuration(text: string): number | null {
  const m = /^(\d+(?:\.\d+)?)(s|m|h)?$/.exec(text.trim());
  if (!m) return null;
  const unit = m[2] === "h" ? 3600 : m[2] === "m" ? 60 : 1;
  return Number(m[1]) * unit;
}

/** The moment the soak's "start" figures are read: once the pools and heaps have settled to its rate. */
export function settledAtS(seconds: number): number {
  return Math.min(PIECE_S, seconds / 4);
}

/** V8's used heap from a sidecar's Prometheus exposition, in MiB (NaN if it cannot be read). */
async function heapUsedMiB(adminPort: number): Promise<number> {
  try {
    const res = await fetch(`http://127.0.0.1:${adminPort}/metrics`, { signal: AbortSignal.timeout(2_000) });
    const m = /^nodejs_heap_size_used_bytes(?:\{[^}]*\})? ([\d.e+]+)/m.exec(await res.text());
    return m ? Number(m[1]) / 2 ** 20 : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

/** The pause of every --trace-gc line (V8's "…MB, 0.52 / 0.00 ms …"), in milliseconds. */
export function gcPauses(text: string): number[] {
  const out: number[] = [];
  const re = / ms: .+? [\d.]+ \([\d.]+\) -> [\d.]+ \([\d.]+\) MB, (?:pooled: [\d.]+ MB, )?([\d.]+) \/ [\d.]+ ms/g;
  for (const m of text.matchAll(re)) out.push(Number(m[1]));
  return out;
}

function logSize(file: string): number {
  try {
    return statSync(file).size;
  } catch {
    return 0;
  }
}

async function sample(sidecars: Sidecar[], atS: number): Promise<SoakSample> {
  return {
    atS,
    rssMiB: sidecars.map((s) => memory([s.proc.pid, ...descendantsOf(s.proc.pid)]).rss),
    heapUsedMiB: await Promise.all(sidecars.map((s) => heapUsedMiB(s.adminPort))),
  };
}

export async function runSoak(ctx: Ctx, seconds: number): Promise<SoakResult> {
  const { o, stack, generator, progress } = ctx;
  const sidecars = stack.sidecars.get("ashmesh");
  const setup = stack.paths.get("ashmesh") as PathSetup | undefined;
  if (!sidecars || !setup) throw new Error("--soak needs the ashmesh pair (--paths must include ashmesh)");
  const offsets = sidecars.map((s) => logSize(s.proc.logFile));
  const samples: SoakSample[] = [];
  const t0 = performance.now();
  const elapsedS = () => (performance.now() - t0) / 1000;
  samples.push(await sample(sidecars, 0));
  let sampling = false;
  const timer = setInterval(() => {
    if (sampling) return;
    sampling = true;
    void sample(sidecars, elapsedS()).then((s) => {
      samples.push(s);
      sampling = false;
    });
  }, SAMPLE_EVERY_MS);
  let requests = 0;
  let errors = 0;
  const errorKinds: Record<string, number> = {};
  const count = (kind: string, n: number) => {
    if (n > 0) errorKinds[kind] = (errorKinds[kind] ?? 0) + n;
  };
  const p50s: number[] = [];
  let worstP99 = 0;
  let max = 0;
  try {
    for (let done = 0; done < seconds; done += PIECE_S) {
      const piece = Math.min(PIECE_S, seconds - done);
      const load = (await runLoad(
        generator,
        openSpec(o, setup.target, SOAK_RATE, 0, piece),
        piece * 1000 + o.timeoutMs + 20_000,
      )) as OpenLoopResult;
      const bad =
        Object.values(load.non2xx).reduce((a, b) => a + b, 0) +
        Object.values(load.errors).reduce((a, b) => a + b, 0) +
        load.timeouts +
        load.dropped;
      requests += load.ok;
      errors += bad;
      for (const [kind, n] of [...Object.entries(load.non2xx), ...Object.entries(load.errors)]) count(kind, n);
      count("timeouts", load.timeouts);
      count("dropped", load.dropped);
      p50s.push(load.latency.p50);
      worstP99 = Math.max(worstP99, load.latency.p99);
      max = Math.max(max, load.latency.max);
      const last = samples[samples.length - 1];
      progress(
        `soak ${Math.round(done + piece)}/${seconds} s at ${SOAK_RATE} req/s: p50 ${load.latency.p50.toFixed(2)} ms ` +
          `p99 ${load.latency.p99.toFixed(2)} ms, errors ${bad}; RSS ${last?.rssMiB.map((v) => v.toFixed(1)).join(" / ")} MiB, ` +
          `heap ${last?.heapUsedMiB.map((v) => v.toFixed(1)).join(" / ")} MiB`,
      );
    }
  } finally {
    clearInterval(timer);
  }
  while (sampling) await new Promise((resolve) => setTimeout(resolve, 50));
  samples.push(await sample(sidecars, elapsedS()));
  const pauses = sidecars
    .flatMap((s, i) => gcPauses(readFileSync(s.proc.logFile, "utf8").slice(offsets[i])))
    .sort((a, b) => a - b);
  const sortedP50 = [...p50s].sort((a, b) => a - b);
  return {
    rate: SOAK_RATE,
    seconds,
    sidecars: sidecars.map((s) => s.name),
    samples,
    gc: {
      count: pauses.length,
      p99: percentile(pauses, 0.99),
      max: pauses[pauses.length - 1] ?? 0,
      totalMs: pauses.reduce((a, b) => a + b, 0),
    },
    requests,
    errors,
    errorKinds,
    latency: { p50: sortedP50[Math.floor((sortedP50.length - 1) / 2)] ?? 0, p99: worstP99, max },
  };
}

/** Start (once settled), end and maximum of one series of samples for sidecar i. */
function series(result: SoakResult, i: number, pick: (s: SoakSample) => number[]) {
  const values = result.samples.map((s) => ({ atS: s.atS, v: pick(s)[i] ?? Number.NaN }));
  const settled = values.find((s) => s.atS >= settledAtS(result.seconds)) ?? values[0];
  return {
    start: settled?.v ?? Number.NaN,
    end: values[values.length - 1]?.v ?? Number.NaN,
    max: Math.max(...values.map((s) => s.v).filter(Number.isFinite)),
  };
}

/** The largest RSS growth of a sidecar from the soak's (settled) start to its end, as a fraction. */
export function soakGrowth(result: SoakResult): number {
  return Math.max(
    ...result.sidecars.map((_, i) => {
      const r = series(result, i, (s) => s.rssMiB);
      return r.end / r.start - 1;
    }),
  );
}

export function soakSection(report: BenchReport): string {
  const r = report.soak;
  if (!r) return "";
  const mib = (v: number) => (Number.isFinite(v) ? v.toFixed(1) : "–");
  const rows = r.sidecars.map((name, i) => {
    const rss = series(r, i, (s) => s.rssMiB);
    const heap = series(r, i, (s) => s.heapUsedMiB);
    return [
      name,
      `${mib(rss.start)} / ${mib(rss.end)} / ${mib(rss.max)}`,
      `${rss.end >= rss.start ? "+" : "−"}${Math.abs(Math.round((rss.end / rss.start - 1) * 100))} %`,
      `${mib(heap.start)} / ${mib(heap.end)} / ${mib(heap.max)}`,
    ];
  });
  const growth = soakGrowth(r);
  return [
    "## Soak",
    "",
    `${r.rate.toLocaleString("en-US")} req/s through the ashmesh pair for ${r.seconds} s (open loop, in ${PIECE_S} s ` +
      `pieces), RSS and heap sampled every ${SAMPLE_EVERY_MS / 1000} s; "start" is read ${settledAtS(r.seconds)} s in, ` +
      "once the pools and heaps have settled to the rate.",
    "",
    table(["sidecar", "RSS start / end / max (MiB)", "RSS end vs start", "heap used start / end / max (MiB)"], rows, [
      ":---",
      "---:",
      "---:",
      "---:",
    ]),
    "",
    `- ${r.requests.toLocaleString("en-US")} requests answered, ${r.errors} errors` +
      `${
        r.errors
          ? ` (${Object.entries(r.errorKinds)
              .map(([k, n]) => `${k}: ${n}`)
              .join(", ")})`
          : ""
      }; ` +
      `p50 ${ms(r.latency.p50)} ms (median of the pieces), worst piece's p99 ${ms(r.latency.p99)} ms, max ${ms(r.latency.max)} ms.`,
    `- GC pauses (--trace-gc, both sidecars): ${r.gc.count}, p99 ${ms(r.gc.p99)} ms, max ${ms(r.gc.max)} ms, ` +
      `${ms(r.gc.totalMs)} ms in all.`,
    `- Verdict: ${growth <= FLAT_GROWTH ? "flat" : "growing"} (largest RSS growth ${Math.round(growth * 100)} %, ` +
      `flat means ≤ +${FLAT_GROWTH * 100} %).`,
  ].join("\n");
}
