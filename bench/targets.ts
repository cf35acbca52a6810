// The targets table (issues 8 and 9): each target as a figure of this run and ✔/×, measured as a
// ratio or a difference to the nginx pair of the same run (never as an absolute threshold of its
// own), with the same figure against the HAProxy pair beside it for reference. A few targets are
// absolute (RSS, start-up), as the issues state them. Below it the floor: the direct path, and
// what Node's TLS alone costs per full handshake (the node:tls floor server of the handshake row).
// It is computed from the report, so that it can be recomputed from a saved latest.json.
import { ASHMESH_SIDECARS } from "./contenders.js";
import { MEMORY_RATE } from "./measure.js";
import { type BenchReport, type HandshakeSide, int, ms, type PathId, type TargetRow, table } from "./report.js";
import { FLAT_GROWTH, soakGrowth } from "./soak.js";

type Peer = "nginx" | "haproxy";
const PEER_LABEL: Record<Peer, string> = { nginx: "nginx", haproxy: "HAProxy" };

/** One target: our figure, the same figure of a peer, the test, and how both read. */
interface Spec {
  target: string;
  ours: (r: BenchReport) => number | null;
  peer?: (r: BenchReport, peer: Peer) => number | null;
  /** null: cannot be judged (a relative target whose peer was not run). */
  met: (ours: number, peer: number | null) => boolean | null;
  /** Our figure in words. */
  value: (ours: number, r: BenchReport) => string;
  /** Ours against a peer's, in words: "0.55× nginx's 205/s". */
  versus?: (ours: number, peer: number, peerLabel: string) => string;
  /** Why `ours` is missing, when it is. */
  missing: (r: BenchReport) => string;
}

const throughput = (r: BenchReport, path: PathId) => r.throughput.find((t) => t.path === path)?.throughput ?? null;
const rateRun = (r: BenchReport, path: PathId, rate: number) => r.rates.find((x) => x.path === path && x.rate === rate);
const cpuPerReq = (r: BenchReport, path: PathId, rate: number) => {
  const run = rateRun(r, path, rate);
  return run && run.load.totalCompleted > 0 ? (run.proxyCpuS * 1e6) / run.load.totalCompleted : null;
};
const addedP50 = (r: BenchReport, path: PathId, rate: number) => {
  const run = rateRun(r, path, rate);
  const direct = rateRun(r, "direct", rate);
  return run && direct ? run.load.latency.p50 - direct.load.latency.p50 : null;
};
const p95 = (r: BenchReport, path: PathId, rate: number) => rateRun(r, path, rate)?.load.latency.p95 ?? null;
const handshake = (r: BenchReport, side: HandshakeSide) => r.handshakes.find((h) => h.side === side);
const handshakeRate = (r: BenchReport, side: HandshakeSide) => handshake(r, side)?.result.rate ?? null;
const handshakeCpuMs = (r: BenchReport, side: HandshakeSide) => {
  const h = handshake(r, side);
  return h && h.result.connections > 0 ? (h.inboundCpuS * 1000) / h.result.connections : null;
};
/** The largest RSS among the processes of `path` after the memory rate's row, if that path ran the row. */
const rssAfter = (r: BenchReport, path: PathId, names: (name: string) => boolean) => {
  const after = r.memoryAfterRate;
  if (!after || !rateRun(r, path, after.rate)) return null;
  const rows = after.rows.filter((m) => names(m.name));
  return rows.length ? Math.max(...rows.map((m) => m.rss)) : null;
};

const signed = (v: number) => `${v >= 0 ? "+" : "−"}${ms(Math.abs(v))}`;
/** "0.55× nginx's 205/s" */
const times = (unit: (v: number) => string) => (o: number, p: number, l: string) =>
  `${(o / p).toFixed(2)}× ${l}'s ${unit(p)}`;
const notRun = (what: string) => () => `not measured: ${what}`;
/** A relative target: judged only against a peer that ran. */
const against = (test: (ours: number, peer: number) => boolean) => (o: number, p: number | null) =>
  p === null ? null : test(o, p);

const SPECS: Spec[] = [
  {
    target: "max throughput, workers: auto ≥ 1.0× nginx's",
    ours: (r) => throughput(r, "ashmesh-auto"),
    peer: (r, p) => throughput(r, p),
    met: against((o, p) => o >= p),
    value: (o) => `${int(o)} req/s`,
    versus: times((p) => `${int(p)} req/s`),
    missing: (r) =>
      r.notes.some((n) => n.includes("workers not available"))
        ? "not measured: workers not available"
        : "not measured: no throughput row for the pair with workers: auto",
  },
  {
    target: "max throughput, one worker each ≥ 0.7× nginx's",
    ours: (r) => throughput(r, "ashmesh"),
    peer: (r, p) => throughput(r, p),
    met: against((o, p) => o >= 0.7 * p),
    value: (o) => `${int(o)} req/s`,
    versus: times((p) => `${int(p)} req/s`),
    missing: notRun("no throughput row for the ashmesh pair"),
  },
  {
    target: "proxy CPU per request at 2,000 req/s ≤ 1.5× nginx's",
    ours: (r) => cpuPerReq(r, "ashmesh", 2_000),
    peer: (r, p) => cpuPerReq(r, p, 2_000),
    met: against((o, p) => o <= 1.5 * p),
    value: (o) => `${ms(o)} ms per 1k req`,
    versus: times((p) => `${ms(p)} ms`),
    missing: notRun("no 2,000 req/s row for the ashmesh pair"),
  },
  {
    target: "added p50 at 500 req/s ≤ nginx's + 0.15 ms",
    ours: (r) => addedP50(r, "ashmesh", 500),
    peer: (r, p) => addedP50(r, p, 500),
    met: against((o, p) => o <= p + 0.15),
    value: (o) => `${signed(o)} ms`,
    versus: (_o, p, l) => `${l} ${signed(p)} ms`,
    missing: notRun("no 500 req/s row for the ashmesh pair"),
  },
  {
    target: "p95 at 2,000 req/s ≤ nginx's + 1 ms",
    ours: (r) => p95(r, "ashmesh", 2_000),
    peer: (r, p) => p95(r, p, 2_000),
    met: against((o, p) => o <= p + 1),
    value: (o) => `${ms(o)} ms`,
    versus: (_o, p, l) => `${l} ${ms(p)} ms`,
    missing: notRun("no 2,000 req/s row for the ashmesh pair"),
  },
  {
    target: `RSS per sidecar ≤ 60 MiB after the ${MEMORY_RATE.toLocaleString("en-US")} req/s row`,
    ours: (r) => rssAfter(r, "ashmesh", (n) => (ASHMESH_SIDECARS as readonly string[]).includes(n)),
    peer: (r, p) => rssAfter(r, p, (n) => n.startsWith(PEER_LABEL[p])),
    met: (o) => o <= 60,
    value: (o, r) => `${o.toFixed(1)} MiB (the larger sidecar, after ${int(r.memoryAfterRate?.rate ?? 0)} req/s)`,
    versus: (_o, p, l) => `${l} ${p.toFixed(1)} MiB (its larger process)`,
    missing: notRun("no fixed-rate row up to 2,000 req/s for the ashmesh pair"),
  },
  {
    target: `RSS flat (≤ +${FLAT_GROWTH * 100} %) across a soak`,
    ours: (r) => (r.soak ? soakGrowth(r.soak) : null),
    met: (o) => o <= FLAT_GROWTH,
    value: (o, r) => `${o >= 0 ? "+" : "−"}${Math.abs(Math.round(o * 100))} % over ${r.soak?.seconds ?? 0} s`,
    missing: notRun("no soak in this run (--soak DURATION)"),
  },
  {
    target: "new mTLS connections/s at the inbound ≥ 1.2× nginx's",
    ours: (r) => handshakeRate(r, "ashmesh inbound"),
    peer: (r, p) => handshakeRate(r, `${p} inbound`),
    met: against((o, p) => o >= 1.2 * p),
    value: (o) => `${int(o)}/s`,
    versus: times((p) => `${int(p)}/s`),
    missing: notRun("no handshake row (--handshakes 0?)"),
  },
  {
    target: "CPU per full handshake ≤ nginx's",
    ours: (r) => handshakeCpuMs(r, "ashmesh inbound"),
    peer: (r, p) => handshakeCpuMs(r, `${p} inbound`),
    met: against((o, p) => o <= p),
    value: (o) => `${ms(o)} ms`,
    versus: times((p) => `${ms(p)} ms`),
    missing: notRun("no handshake row (--handshakes 0?)"),
  },
  {
    target: "start to /readyz 200 < 300 ms (median)",
    ours: (r) => r.startup?.medianMs ?? null,
    met: (o) => o < 300,
    value: (o, r) => `${o.toFixed(0)} ms (of ${r.startup?.samplesMs.length ?? 0})`,
    missing: notRun("no start-up timing (--startup 0)"),
  },
];

/** The targets of the report, in the issues' order. A relative target whose peer was not run is not judged. */
export function targets(report: BenchReport): TargetRow[] {
  return SPECS.map((s) => {
    const ours = s.ours(report);
    if (ours === null) return { target: s.target, figure: s.missing(report), haproxy: "—", met: null };
    const peer = (p: Peer) => (s.peer ? s.peer(report, p) : null);
    const versus = (p: Peer) => {
      const value = peer(p);
      return s.versus && value !== null ? s.versus(ours, value, PEER_LABEL[p]) : null;
    };
    const nginx = versus("nginx");
    return {
      target: s.target,
      figure: `${s.value(ours, report)}${nginx ? `; ${nginx}` : ""}`,
      haproxy: versus("haproxy") ?? "—",
      met: s.met(ours, peer("nginx")),
    };
  });
}

/** The floor: the direct path, and Node's TLS alone per full handshake. */
function floor(report: BenchReport): string[] {
  const lines: string[] = [];
  const direct = throughput(report, "direct");
  const p50 = rateRun(report, "direct", 500)?.load.latency.p50;
  const p95At2k = p95(report, "direct", 2_000);
  const parts = [
    direct !== null ? `${int(direct)} req/s closed loop` : null,
    p50 !== undefined ? `p50 ${ms(p50)} ms at 500 req/s` : null,
    p95At2k !== null ? `p95 ${ms(p95At2k)} ms at 2,000 req/s` : null,
  ].filter(Boolean);
  if (parts.length) lines.push(`- Direct path (no proxy): ${parts.join(", ")}.`);
  const tlsRate = handshakeRate(report, "node:tls floor");
  const tlsCpu = handshakeCpuMs(report, "node:tls floor");
  if (tlsRate !== null && tlsCpu !== null) {
    lines.push(
      `- TLS crypto alone: a bare node:tls server with the same certificate and TLS settings as the inbound ` +
        `(bench/tls-floor.ts) took ${int(tlsRate)} full mTLS handshakes/s at ${ms(tlsCpu)} ms of CPU each.`,
    );
  }
  return lines;
}

export function targetsSection(report: BenchReport): string {
  const mark = (m: boolean | null) => (m === null ? "–" : m ? "✔" : "×");
  return [
    "## Targets",
    "",
    "Ratios to the nginx pair of this run (HAProxy beside it for reference); ✔ met, × not met, – not measured. " +
      (report.quick ? "A --quick run is too short to judge: the figures check the harness. " : "") +
      "Noise moves them: compare with `--repeat 3` on a quiet machine.",
    "",
    table(
      ["target", "this run", "vs HAProxy", ""],
      report.targets.map((t) => [t.target, t.figure, t.haproxy, mark(t.met)]),
      [":---", ":---", ":---", ":---"],
    ),
    ...(floor(report).length ? ["", "Floor:", "", ...floor(report)] : []),
  ].join("\n");
}
