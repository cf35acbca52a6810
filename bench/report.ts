// The bench's report: what measure.ts measured, as JSON (kept whole) and as markdown tables.
// Overheads are differences to the direct path at the same rate in the same run, never absolute
// thresholds: the machine, its load and the Node version all move the absolute numbers (the
// targets table, targets.ts, is made of ratios to the reference pairs of the same run). The
// protocol rows, the start-up timing, the soak and the targets render their own sections
// (protocols.ts, startup.ts, soak.ts, targets.ts) with this file's table().
import type { OpenLoopResult } from "./load.js";
import type { Memory } from "./procs.js";
import type { H2loadResult, HandshakeResult, RedisBenchResult } from "./tools.js";

export type PathId = "direct" | "ashmesh" | "ashmesh-fwd" | "ashmesh-auto" | "nginx" | "haproxy";

export const PATH_LABELS: Record<PathId, string> = {
  direct: "direct (app)",
  ashmesh: "ashmesh pair",
  "ashmesh-fwd": "ashmesh pair (forward proxy)",
  "ashmesh-auto": "ashmesh pair (workers: auto)",
  nginx: "nginx pair",
  haproxy: "HAProxy pair",
};

/** The protocol rows: HTTP/2 with h2load, gRPC unary at fixed rates, Redis over a TCP hop. */
export type Protocol = "h2" | "grpc" | "tcp";

export type HandshakeSide = "ashmesh inbound" | "nginx inbound" | "haproxy inbound" | "node:tls floor";

export interface RateRun {
  path: PathId;
  rate: number;
  /** Which round of --repeat this run was (1-based). */
  round: number;
  load: OpenLoopResult;
  /** CPU seconds of the proxy processes (both sides of the pair) over the whole load run. */
  proxyCpuS: number;
  appCpuS: number;
  /** Share of each core that was busy during the run (everything on the machine, not only ours). */
  coreBusy: number[];
  /** Share of core 0 used by our pinned processes (proxies + app). */
  oursOnCore0: number;
  wallS: number;
}

export interface ThroughputRun {
  path: PathId;
  tool: "wrk" | "node closed loop";
  connections: number;
  throughput: number;
  p50: number;
  p99: number;
  errors: number;
  requests: number;
  proxyCpuS: number;
  appCpuS: number;
  coreBusy: number[];
}

export interface HandshakeRun {
  side: HandshakeSide;
  result: HandshakeResult;
  /** CPU seconds of the inbound proxy process(es) during the run. */
  inboundCpuS: number;
  coreBusy: number[];
}

export interface MemoryRow {
  name: string;
  idle: Memory;
  end: Memory;
}

/** HTTP/2, closed loop: h2load's clients each keep `streams` requests in flight on one connection. */
export interface H2Run {
  path: PathId;
  result: H2loadResult;
  proxyCpuS: number;
  appCpuS: number;
  coreBusy: number[];
}

/** One redis-benchmark test through a path. */
export interface TcpRun {
  path: PathId;
  result: RedisBenchResult;
  proxyCpuS: number;
  coreBusy: number[];
}

export interface ProtocolRows {
  h2: H2Run[];
  /** gRPC unary at fixed rates, as the HTTP rows (the median-p99 round with --repeat). */
  grpc: RateRun[];
  tcp: TcpRun[];
  /** What each pair speaks between its two proxies, per protocol row. */
  between: { protocol: Protocol; path: PathId; between: string }[];
  /** Rows a contender could not take part in, and why. */
  missing: { protocol: Protocol; path: PathId; reason: string }[];
}

/** Start of a sidecar to its first /readyz 200, in milliseconds, several times. */
export interface StartupResult {
  samplesMs: number[];
  medianMs: number;
}

export interface SoakSample {
  /** Seconds since the soak started. */
  atS: number;
  /** Per sidecar, in the order of SoakResult.sidecars. */
  rssMiB: number[];
  heapUsedMiB: number[];
}

export interface SoakResult {
  rate: number;
  seconds: number;
  sidecars: string[];
  samples: SoakSample[];
  /** GC pauses of both sidecars during the soak (--trace-gc), in milliseconds. */
  gc: { count: number; p99: number; max: number; totalMs: number };
  requests: number;
  /** Non-2xx answers, transport errors, timeouts and drops. */
  errors: number;
  /** The same by kind: "503", "ECONNRESET", "timeouts", "dropped", ... */
  errorKinds: Record<string, number>;
  latency: { p50: number; p99: number; max: number };
}

export interface TargetRow {
  target: string;
  /** The figure measured, in words (or why it was not measured). */
  figure: string;
  /** The same figure against the HAProxy pair, for reference. */
  haproxy: string;
  /** null: not measured in this run. */
  met: boolean | null;
}

export interface BenchReport {
  startedAt: string;
  seconds: number;
  quick: boolean;
  machine: Record<string, string>;
  settings: Record<string, unknown>;
  notes: string[];
  /** One run per rate and path: with --repeat, the round whose p99 is the median. */
  rates: RateRun[];
  /** Every run of every round (--repeat). */
  allRates: RateRun[];
  throughput: ThroughputRun[];
  handshakes: HandshakeRun[];
  memory: MemoryRow[];
  /** RSS of each process right after the 2,000 req/s row (the last rate ≤ 2,000 if there is none). */
  memoryAfterRate: { rate: number; rows: { name: string; rss: number }[] } | null;
  protocols: ProtocolRows;
  startup: StartupResult | null;
  soak: SoakResult | null;
  targets: TargetRow[];
}

export const ms = (v: number) =>
  Number.isFinite(v) ? (v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0)) : "–";
export const signedMs = (v: number) => (Number.isFinite(v) ? `${v >= 0 ? "+" : "−"}${ms(Math.abs(v))}` : "–");
export const int = (v: number) => (Number.isFinite(v) ? Math.round(v).toLocaleString("en-US") : "–");
export const pct = (v: number) => `${Math.round(v * 100)} %`;

/**
 * A markdown table with its columns padded, so that it reads as a table in a terminal too (and
 * is already in the shape Biome's formatter gives it). `align`: ":---" left, "---:" right.
 */
export function table(head: string[], rows: string[][], align: string[]): string {
  const len = (text: string) => [...text].length;
  const widths = head.map((h, i) => Math.max(3, len(h), ...rows.map((r) => len(r[i] ?? ""))));
  const right = (i: number) => (align[i] ?? "---:").endsWith(":");
  const cell = (text: string, i: number) => {
    const pad = " ".repeat((widths[i] as number) - len(text));
    return right(i) ? pad + text : text + pad;
  };
  const sep = widths.map((w, i) => (right(i) ? `${"-".repeat(w - 1)}:` : `:${"-".repeat(w - 1)}`));
  return [head.map(cell), sep, ...rows.map((r) => r.map(cell))].map((r) => `| ${r.join(" | ")} |`).join("\n");
}

/**
 * JSON as Biome formats it (line width 120): objects one key per line, arrays of plain values on
 * one line when they fit. bench/results is checked by `biome check` like the rest of bench/.
 */
export function toJson(value: unknown, indent = "", prefix = 0, suffix = 0): string {
  if (Array.isArray(value)) {
    if (value.length === 0) return "[]";
    if (value.every((v) => v === null || typeof v !== "object")) {
      const flat = `[${value.map((v) => JSON.stringify(v)).join(", ")}]`;
      if (indent.length + prefix + flat.length + suffix <= 120) return flat;
    }
    const inner = `${indent}  `;
    const items = value.map((v, i) => inner + toJson(v, inner, 0, i < value.length - 1 ? 1 : 0));
    return `[\n${items.join(",\n")}\n${indent}]`;
  }
  if (value !== null && typeof value === "object") {
    const entries = Object.entries(value).filter(([, v]) => v !== undefined);
    if (entries.length === 0) return "{}";
    const inner = `${indent}  `;
    const lines = entries.map(([k, v], i) => {
      const key = `${JSON.stringify(k)}: `;
      return inner + key + toJson(v, inner, key.length, i < entries.length - 1 ? 1 : 0);
    });
    return `{\n${lines.join(",\n")}\n${indent}}`;
  }
  return JSON.stringify(value) ?? "null";
}

function problems(l: OpenLoopResult): string {
  const parts: string[] = [];
  const non2xx = Object.values(l.non2xx).reduce((a, b) => a + b, 0);
  const errors = Object.values(l.errors).reduce((a, b) => a + b, 0);
  if (non2xx) parts.push(`${non2xx} non-2xx (${Object.keys(l.non2xx).join(",")})`);
  if (errors) parts.push(`${errors} errors (${Object.keys(l.errors).join(",")})`);
  if (l.timeouts) parts.push(`${l.timeouts} timeouts`);
  if (l.dropped) parts.push(`${l.dropped} dropped`);
  return parts.length ? parts.join(", ") : "0";
}

/** Sustained: ≥ 97 % of the target answered, nothing dropped, no timeouts. */
export function sustained(l: OpenLoopResult): boolean {
  return l.achievedRate >= 0.97 * l.rate && l.dropped === 0 && l.timeouts === 0;
}

/** The fixed-rate rows: the HTTP rows of report.rates, or the gRPC rows. */
export function latencyTable(runs: RateRun[]): string {
  const rows: string[][] = [];
  for (const run of runs) {
    const direct = runs.find((r) => r.rate === run.rate && r.path === "direct");
    const l = run.load;
    const d = direct && run.path !== "direct" ? direct.load.latency : null;
    const cpu = l.totalCompleted > 0 ? (run.proxyCpuS * 1e6) / l.totalCompleted : Number.NaN;
    rows.push([
      int(run.rate),
      PATH_LABELS[run.path],
      `${int(l.achievedRate)}${sustained(l) ? "" : " ⚠"}`,
      ms(l.latency.p50),
      ms(l.latency.p95),
      ms(l.latency.p99),
      d ? signedMs(l.latency.p50 - d.p50) : "—",
      d ? signedMs(l.latency.p99 - d.p99) : "—",
      run.path === "direct" ? "—" : ms(cpu),
      problems(l),
      `${Math.round(Math.max(0, (run.coreBusy[0] ?? 0) - run.oursOnCore0) * 100)} / ${Math.round(Math.max(0, (run.coreBusy[1] ?? 0) - l.generatorCpu) * 100)} %`,
    ]);
  }
  return table(
    [
      "rate (req/s)",
      "path",
      "achieved (req/s)",
      "p50 (ms)",
      "p95 (ms)",
      "p99 (ms)",
      "Δp50 vs direct",
      "Δp99 vs direct",
      "proxy CPU (ms/1k req)",
      "errors",
      "other load, core 0 / 1",
    ],
    rows,
    ["---:", ":---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", ":---", "---:"],
  );
}

export function generatorTable(report: BenchReport): string {
  return table(
    [
      "rate",
      "path",
      "scheduled (req/s)",
      "send lag p50 / p99 / max (ms)",
      "from actual send p50 / p99 (ms)",
      "core 0: ours / others",
      "core 1: generator / others",
      "p99.9 / max (ms)",
    ],
    report.rates.map((r) => {
      const busy0 = r.coreBusy[0] ?? 0;
      const busy1 = r.coreBusy[1] ?? 0;
      return [
        int(r.rate),
        PATH_LABELS[r.path],
        int(r.load.sendRate),
        `${ms(r.load.sendLag.p50)} / ${ms(r.load.sendLag.p99)} / ${ms(r.load.sendLag.max)}`,
        `${ms(r.load.serviceLatency.p50)} / ${ms(r.load.serviceLatency.p99)}`,
        `${pct(r.oursOnCore0)} / ${pct(Math.max(0, busy0 - r.oursOnCore0))}`,
        `${pct(r.load.generatorCpu)} / ${pct(Math.max(0, busy1 - r.load.generatorCpu))}`,
        `${ms(r.load.latency.p999)} / ${ms(r.load.latency.max)}`,
      ];
    }),
    ["---:", ":---", "---:", "---:", "---:", "---:", "---:", "---:"],
  );
}

export function throughputTable(report: BenchReport): string {
  const direct = report.throughput.find((t) => t.path === "direct");
  return table(
    ["path", "tool", "connections", "req/s", "vs direct", "p50 (ms)", "p99 (ms)", "proxy CPU (ms/1k req)", "errors"],
    report.throughput.map((t) => [
      PATH_LABELS[t.path],
      t.tool,
      String(t.connections),
      int(t.throughput),
      direct && t.path !== "direct" ? pct(t.throughput / direct.throughput) : "—",
      ms(t.p50),
      ms(t.p99),
      t.path === "direct" || t.requests === 0 ? "—" : ms((t.proxyCpuS * 1e6) / t.requests),
      String(t.errors),
    ]),
    [":---", ":---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"],
  );
}

export function handshakeTable(report: BenchReport): string {
  return table(
    ["inbound", "clients", "new connections/s", "inbound CPU per connection (ms)", "core 0 busy", "core 1 busy"],
    report.handshakes.map((h) => [
      h.side,
      String(h.result.clients),
      int(h.result.rate),
      h.result.connections > 0 ? ms((h.inboundCpuS * 1000) / h.result.connections) : "–",
      pct(h.coreBusy[0] ?? 0),
      pct(h.coreBusy[1] ?? 0),
    ]),
    [":---", "---:", "---:", "---:", "---:", "---:"],
  );
}

export function memoryTable(report: BenchReport): string {
  return table(
    ["process", "RSS after start (MiB)", "RSS at the end (MiB)", "peak RSS (MiB)"],
    report.memory.map((m) => [m.name, m.idle.rss.toFixed(1), m.end.rss.toFixed(1), m.end.peak.toFixed(1)]),
    [":---", "---:", "---:", "---:"],
  );
}

/**
 * The whole report: `sections` (the protocol rows, start-up, soak) come after the memory table,
 * `last` (the targets) after the notes, at the very end, where a terminal leaves it in view.
 */
export function markdown(report: BenchReport, sections: string[] = [], last: string[] = []): string {
  const machine = Object.entries(report.machine)
    .map(([k, v]) => `- ${k}: ${v}`)
    .join("\n");
  const s = report.settings;
  const parts = [
    `# ashmesh bench${report.quick ? " (--quick)" : ""}`,
    "",
    `${report.startedAt}, ${report.seconds.toFixed(0)} s.`,
    "",
    machine,
    "",
    `## Latency at fixed rates (open loop)`,
    "",
    `Each row: ${s.warmupS} s warm-up, then ${s.durationS} s measured, over ${s.connections} keep-alive ` +
      `connections from the load generator; latency = answer time − scheduled send time. ` +
      (Number(s.repeat) > 1 ? `Of ${s.repeat} interleaved rounds, each row is the one with the median p99. ` : "") +
      `Δ = this path − direct at the same rate. ⚠ = the rate was not sustained (< 97 % answered, drops or timeouts). ` +
      `"other load" is CPU taken on each core by processes outside the bench while the row ran: above ~10 % the row is noisy. ` +
      `The caller's sidecar runs with outbound.peerProtocol ${String(s.peerProtocol ?? "match")}.`,
    "",
    latencyTable(report.rates),
    "",
    "### Load generator and cores",
    "",
    "Scheduled rate and send lag show whether the generator kept its schedule (it spins between sends, so its " +
      "CPU share says little). Latency from the actual send leaves the generator's lateness out. " +
      '"others" is CPU used on that core by processes that are not part of the bench: noise.',
    "",
    generatorTable(report),
  ];
  if (report.throughput.length) {
    parts.push("", "## Maximum throughput (closed loop)", "", throughputTable(report));
  }
  if (report.handshakes.length) {
    parts.push(
      "",
      "## New mTLS connections",
      "",
      "Full TLS 1.3 handshakes with a client certificate, no resumption, one HTTP/1.0 request each " +
        "(`openssl s_time -new -www /`, clients in parallel on core 1).",
      "",
      handshakeTable(report),
    );
  }
  if (report.memory.length) parts.push("", "## Memory", "", memoryTable(report));
  for (const section of sections) if (section) parts.push("", section);
  if (report.notes.length) parts.push("", "## Notes", "", ...report.notes.map((n) => `- ${n}`));
  for (const section of last) if (section) parts.push("", section);
  return `${parts.join("\n")}\n`;
}
