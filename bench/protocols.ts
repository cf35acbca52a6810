// The protocol rows, in the same run as the HTTP/1.1 rows and against the same peers: HTTP/2
// (h2load, cleartext with prior knowledge into each pair's caller side, closed loop), gRPC unary
// calls at fixed rates (the load generator's open loop with a grpc-js channel, pinned like the
// HTTP rows), and Redis commands over a plain TCP hop (redis-benchmark). Each row says what the
// pair speaks between its two proxies, and a peer that cannot take part says so in its row.
import http2 from "node:http2";
import net from "node:net";
import { CALLER, LOAD_CORE, type ProtocolPath } from "./contenders.js";
import { type Ctx, cpuMeter, type Lane, rateMatrix } from "./measure.js";
import {
  type BenchReport,
  type H2Run,
  int,
  latencyTable,
  ms,
  PATH_LABELS,
  type PathId,
  type Protocol,
  pct,
  type RateRun,
  type TcpRun,
  table,
} from "./report.js";
import { PROTOCOL_TOOLS, type Stack } from "./stack.js";
import { h2load, redisBenchmark } from "./tools.js";

/** h2load's connections and the requests each keeps in flight: 64 outstanding, as wrk's 32 connections roughly. */
const H2_CLIENTS = 4;
const H2_STREAMS = 16;
/** redis-benchmark: connections, commands per test, the tests. No pipelining: one round trip per command. */
const REDIS_CLIENTS = 4;
const REDIS_TESTS = ["set", "get"];
/** The gRPC rows' rates: the run's, up to this (a grpc-js client on one core does not hold much more). */
const GRPC_MAX_RATE = 2_000;

function pathsOf(stack: Stack, protocol: Protocol): ProtocolPath[] {
  return stack.protocolPaths.filter((p) => p.protocol === protocol);
}

/** One request within `ms`, or an error naming the path. */
function within<T>(what: string, promise: Promise<T>, timeoutMs = 5_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise,
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer in ${timeoutMs} ms`)), timeoutMs);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** GET over cleartext HTTP/2 with prior knowledge: status and body. */
function h2Get(port: number, path: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const session = http2.connect(`http://127.0.0.1:${port}`);
    session.on("error", reject);
    const req = session.request({ ":path": path });
    let status = 0;
    let body = "";
    req.setEncoding("utf8");
    req.on("response", (headers) => (status = Number(headers[":status"])));
    req.on("data", (d: string) => (body += d));
    req.on("end", () => {
      session.close();
      resolve({ status, body });
    });
    req.on("error", reject);
  });
}

/** A Redis PING over a plain connection: the TCP hop carries bytes both ways. */
function redisPing(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1", () => socket.write("PING\r\n"));
    socket.setEncoding("utf8");
    socket.once("data", (d: string) => {
      socket.destroy();
      resolve(d.trim());
    });
    socket.once("error", reject);
  });
}

/**
 * One exchange per protocol path before any load: the answer must come from the app or server,
 * and through a pair with the caller's identity (HTTP/2, gRPC: x-forwarded-client-cert).
 */
export async function checkProtocolPaths(stack: Stack): Promise<void> {
  const grpc = stack.protocols.includes("grpc") ? await import("./grpc.js") : null;
  for (const p of stack.protocolPaths) {
    const what = `${PATH_LABELS[p.id]} (${p.protocol})`;
    let identity: string | null = null;
    if (p.protocol === "h2") {
      const res = await within(what, h2Get(p.port, "/echo"));
      if (res.status !== 200) throw new Error(`${what}: GET /echo answered ${res.status}: ${res.body.slice(0, 300)}`);
      identity = (JSON.parse(res.body) as { xfcc: string | null }).xfcc;
    } else if (p.protocol === "grpc" && grpc) {
      identity = await within(what, grpc.callOnce(`127.0.0.1:${p.port}`, grpc.XFCC_REQUEST));
    } else if (p.protocol === "tcp") {
      const answer = await within(what, redisPing(p.port));
      if (answer !== "+PONG") throw new Error(`${what}: PING answered ${JSON.stringify(answer)}`);
      continue;
    }
    if (p.id !== "direct" && !identity?.includes(CALLER)) {
      throw new Error(`${what}: the app saw x-forwarded-client-cert ${JSON.stringify(identity)}, not ${CALLER}`);
    }
  }
}

/** HTTP/2, closed loop, one h2load run per path (as long as the throughput row). */
export async function measureH2({ o, procs, stack, report, progress }: Ctx): Promise<void> {
  const bin = PROTOCOL_TOOLS.h2load();
  if (!bin) return;
  for (const p of pathsOf(stack, "h2")) {
    const stop = cpuMeter(p.proxyPids(), stack.app.pid);
    const result = await h2load(procs, bin, {
      url: `http://127.0.0.1:${p.port}/api/v1/ping`,
      clients: H2_CLIENTS,
      streams: H2_STREAMS,
      seconds: o.throughputS,
      warmupS: 0,
      core: LOAD_CORE,
    });
    const m = stop();
    report.protocols.h2.push({
      path: p.id,
      result,
      proxyCpuS: m.proxyCpuS,
      appCpuS: m.appCpuS,
      coreBusy: m.coreBusy,
    });
    progress(`HTTP/2      ${PATH_LABELS[p.id].padEnd(28)} ${Math.round(result.throughput)} req/s`);
  }
}

/** gRPC unary calls at the run's fixed rates (up to 2,000/s), open loop, the paths alternating. */
export async function measureGrpc(ctx: Ctx): Promise<void> {
  const { o, stack, report } = ctx;
  const app = stack.grpcApp;
  if (!app) return;
  const { UNARY } = await import("./grpc.js");
  const lanes: Lane[] = pathsOf(stack, "grpc").map((p) => ({
    id: p.id,
    target: { origin: `http://127.0.0.1:${p.port}`, path: UNARY, host: "", protocol: "grpc" },
    proxyPids: p.proxyPids,
    appPid: app.pid,
  }));
  const rates = o.rates.filter((r) => r <= GRPC_MAX_RATE);
  const all: RateRun[] = [];
  report.protocols.grpc = await rateMatrix(ctx, lanes, rates.length ? rates : [GRPC_MAX_RATE], all, "gRPC ");
}

/** Redis through each TCP path: one redis-benchmark run per test, no pipelining. */
export async function measureTcp({ o, procs, stack, report, progress }: Ctx): Promise<void> {
  const bin = PROTOCOL_TOOLS.redisBenchmark();
  if (!bin) return;
  const requests = o.quick ? 5_000 : 20_000;
  for (const test of REDIS_TESTS) {
    for (const p of pathsOf(stack, "tcp")) {
      const stop = cpuMeter(p.proxyPids(), null);
      const result = await redisBenchmark(procs, bin, {
        port: p.port,
        test,
        clients: REDIS_CLIENTS,
        requests,
        core: LOAD_CORE,
        timeoutS: 120,
      });
      const m = stop();
      report.protocols.tcp.push({ path: p.id, result, proxyCpuS: m.proxyCpuS, coreBusy: m.coreBusy });
      progress(`TCP ${result.test.padEnd(7)} ${PATH_LABELS[p.id].padEnd(28)} ${Math.round(result.throughput)} req/s`);
    }
  }
}

/** "ms of proxy CPU per 1,000 requests", or "—" for the direct path. */
function cpuPer1k(path: string, cpuS: number, requests: number): string {
  return path === "direct" || requests === 0 ? "—" : ms((cpuS * 1e6) / requests);
}

/** What the pair of `path` speaks between its proxies in a protocol row. */
function between(report: BenchReport, protocol: Protocol, path: PathId): string {
  return report.protocols.between.find((b) => b.protocol === protocol && b.path === path)?.between ?? "—";
}

function missingRows(report: BenchReport, protocol: Protocol, width: number): string[][] {
  return report.protocols.missing
    .filter((m) => m.protocol === protocol)
    .map((m) => [PATH_LABELS[m.path], m.reason, ...Array.from({ length: width - 2 }, () => "—")]);
}

function h2Table(report: BenchReport): string {
  const runs = report.protocols.h2;
  const direct = runs.find((r) => r.path === "direct");
  const rows = runs.map((r: H2Run) => [
    PATH_LABELS[r.path],
    between(report, "h2", r.path),
    `${r.result.clients} × ${r.result.streams}`,
    int(r.result.throughput),
    direct && r.path !== "direct" ? pct(r.result.throughput / direct.result.throughput) : "—",
    ms(r.result.meanMs),
    ms(r.result.maxMs),
    cpuPer1k(r.path, r.proxyCpuS, r.result.succeeded),
    String(r.result.errors),
  ]);
  return table(
    [
      "path",
      "between the pair",
      "connections × streams",
      "req/s",
      "vs direct",
      "mean (ms)",
      "max (ms)",
      "proxy CPU (ms/1k req)",
      "errors",
    ],
    [...rows, ...missingRows(report, "h2", 9)],
    [":---", ":---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"],
  );
}

function tcpTable(report: BenchReport): string {
  const runs = report.protocols.tcp;
  const rows = runs.map((r: TcpRun) => {
    const direct = runs.find((d) => d.path === "direct" && d.result.test === r.result.test);
    return [
      PATH_LABELS[r.path],
      between(report, "tcp", r.path),
      r.result.test,
      int(r.result.throughput),
      direct && r.path !== "direct" ? pct(r.result.throughput / direct.result.throughput) : "—",
      ms(r.result.p50),
      ms(r.result.p99),
      cpuPer1k(r.path, r.proxyCpuS, r.result.requests),
    ];
  });
  return table(
    ["path", "between the pair", "command", "req/s", "vs direct", "p50 (ms)", "p99 (ms)", "proxy CPU (ms/1k cmd)"],
    [...rows, ...missingRows(report, "tcp", 8)],
    [":---", ":---", ":---", "---:", "---:", "---:", "---:", "---:"],
  );
}

/** The protocol rows' section of the report, or "" when none ran. */
export function protocolSection(report: BenchReport): string {
  const { h2, grpc, tcp } = report.protocols;
  if (!h2.length && !grpc.length && !tcp.length) return "";
  const parts = ["## Protocols"];
  if (h2.length) {
    parts.push(
      "",
      "### HTTP/2 (closed loop)",
      "",
      `\`h2load\` on core 1, cleartext HTTP/2 with prior knowledge into each pair's caller side (direct: the app's ` +
        `own h2c port), ${H2_CLIENTS} connections with ${H2_STREAMS} streams each, ${report.settings.throughputS} s. ` +
        "The callee side speaks HTTP/1.1 to the app, as in the HTTP/1.1 rows. h2load gives no percentiles.",
      "",
      h2Table(report),
    );
  }
  if (grpc.length) {
    const pairs = [...new Set(grpc.map((r) => r.path))]
      .filter((p) => p !== "direct")
      .map((p) => `${PATH_LABELS[p]}: ${between(report, "grpc", p)}`)
      .join("; ");
    parts.push(
      "",
      "### gRPC unary at fixed rates (open loop)",
      "",
      "A grpc-js client in the load generator (core 1), one channel (one HTTP/2 connection) per path, a unary call " +
        `with a small raw-bytes message; latency from the scheduled send, as in the HTTP rows. Between the pair: ${pairs || "—"}.`,
      "",
      latencyTable(grpc),
    );
    const missing = report.protocols.missing.filter((m) => m.protocol === "grpc");
    for (const m of missing) parts.push("", `- ${PATH_LABELS[m.path]}: ${m.reason}`);
  }
  if (tcp.length) {
    parts.push(
      "",
      "### TCP: Redis over the pair",
      "",
      `\`redis-benchmark\` on core 1, ${REDIS_CLIENTS} connections, no pipelining (one round trip per command), ` +
        `${int(tcp[0]?.result.requests ?? 0)} commands per test.`,
      "",
      tcpTable(report),
    );
  }
  return parts.join("\n");
}
