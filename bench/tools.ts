// The outside tools the bench drives, and what it reads from their output: wrk for the maximum
// throughput (a C load generator is far cheaper per request than a Node one),
// `openssl s_time -new` for full mTLS handshakes with a client certificate, h2load (nghttp2-client)
// for HTTP/2 and redis-benchmark for the TCP row. Each run is bounded in time (and killed past it).
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import type { Procs } from "./procs.js";

export function findTool(...candidates: string[]): string | null {
  return candidates.find((p) => existsSync(p)) ?? null;
}

/** The first line a tool prints about its version, wherever it prints it (nginx and wrk: stderr, exit 1). */
export function version(cmd: string, args: string[], pattern?: RegExp): string {
  const r = spawnSync(cmd, args, { encoding: "utf8", timeout: 5_000 });
  const text = `${r.stdout ?? ""}\n${r.stderr ?? ""}`;
  if (pattern) return pattern.exec(text)?.[0] ?? "unknown";
  return text.trim().split("\n")[0] ?? "unknown";
}

export interface WrkResult {
  requests: number;
  seconds: number;
  throughput: number;
  p50: number;
  p90: number;
  p99: number;
  non2xx: number;
  socketErrors: number;
}

/** "1.23ms" / "345.00us" / "1.02s" → milliseconds. */
export function wrkDuration(text: string): number {
  const m = /^([\d.]+)(us|ms|s|m)$/.exec(text.trim());
  if (!m) return Number.NaN;
  const v = Number(m[1]);
  return m[2] === "us" ? v / 1000 : m[2] === "ms" ? v : m[2] === "s" ? v * 1000 : v * 60_000;
}

export function parseWrk(out: string): WrkResult | null {
  const done = /(\d+) requests in ([\d.]+)(us|ms|s|m)/.exec(out);
  const rps = /Requests\/sec:\s+([\d.]+)/.exec(out);
  if (!done || !rps) return null;
  const pct = (p: string) => {
    const m = new RegExp(`^\\s+${p}%\\s+(\\S+)`, "m").exec(out);
    return m ? wrkDuration(m[1] as string) : Number.NaN;
  };
  const socket = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out);
  return {
    requests: Number(done[1]),
    seconds: wrkDuration(`${done[2]}${done[3]}`) / 1000,
    throughput: Number(rps[1]),
    p50: pct("50"),
    p90: pct("90"),
    p99: pct("99"),
    non2xx: Number(/Non-2xx or 3xx responses: (\d+)/.exec(out)?.[1] ?? 0),
    socketErrors: socket ? socket.slice(1).reduce((a, b) => a + Number(b), 0) : 0,
  };
}

export async function wrk(
  procs: Procs,
  bin: string,
  o: { url: string; host: string; connections: number; seconds: number; core: number | null },
): Promise<WrkResult> {
  const r = await procs.run(
    bin,
    ["-t1", `-c${o.connections}`, `-d${o.seconds}s`, "--timeout", "5s", "--latency", "-H", `Host: ${o.host}`, o.url],
    { core: o.core, timeoutMs: (o.seconds + 15) * 1000 },
  );
  const parsed = parseWrk(r.stdout);
  if (!parsed) throw new Error(`wrk ${o.url}: unreadable output (exit ${r.code}):\n${r.stdout}${r.stderr}`);
  return parsed;
}

export interface HandshakeResult {
  /** Connections completed by all clients (each a full handshake plus one request). */
  connections: number;
  seconds: number;
  rate: number;
  clients: number;
}

/**
 * `clients` parallel `openssl s_time -new -www /`: each opens a connection, completes a full
 * TLS 1.3 handshake with our client certificate (no resumption), sends one HTTP/1.0 GET, reads
 * the answer, closes, and starts over. Run side by side because one s_time is sequential.
 */
export async function handshakes(
  procs: Procs,
  bin: string,
  o: { port: number; cert: string; key: string; ca: string; seconds: number; clients: number; core: number | null },
): Promise<HandshakeResult> {
  const args = [
    "s_time",
    "-connect",
    `127.0.0.1:${o.port}`,
    "-new",
    "-tls1_3",
    "-cert",
    o.cert,
    "-key",
    o.key,
    "-CAfile",
    o.ca,
    "-time",
    String(o.seconds),
    "-www",
    "/",
  ];
  const started = performance.now();
  const runs = await Promise.all(
    Array.from({ length: o.clients }, () => procs.run(bin, args, { core: o.core, timeoutMs: (o.seconds + 15) * 1000 })),
  );
  const seconds = (performance.now() - started) / 1000;
  let connections = 0;
  for (const r of runs) {
    const m = /(\d+) connections in [\d.]+s;/.exec(r.stdout);
    if (!m) throw new Error(`openssl s_time: unreadable output (exit ${r.code}):\n${r.stdout}${r.stderr}`);
    connections += Number(m[1]);
  }
  return { connections, seconds, rate: connections / seconds, clients: o.clients };
}

export interface H2loadResult {
  clients: number;
  streams: number;
  seconds: number;
  throughput: number;
  requests: number;
  succeeded: number;
  /** Failed, errored and timed-out requests, and answers other than 2xx. */
  errors: number;
  /** h2load reports no percentiles: mean and max time per request. */
  meanMs: number;
  maxMs: number;
}

export function parseH2load(out: string, clients: number, streams: number): H2loadResult | null {
  const finished = /finished in ([\d.]+)(us|ms|s|m), ([\d.]+) req\/s/.exec(out);
  const req =
    /requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout/.exec(
      out,
    );
  const status = /status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx/.exec(out);
  const time = /time for request:\s+(\S+)\s+(\S+)\s+(\S+)/.exec(out);
  if (!finished || !req || !status || !time) return null;
  const n = (m: RegExpExecArray, i: number) => Number(m[i]);
  return {
    clients,
    streams,
    seconds: wrkDuration(`${finished[1]}${finished[2]}`) / 1000,
    throughput: n(finished, 3),
    requests: n(req, 1),
    succeeded: n(req, 2),
    errors: n(req, 3) + n(req, 4) + n(req, 5) + n(status, 2) + n(status, 3) + n(status, 4),
    meanMs: wrkDuration(time[3] as string),
    maxMs: wrkDuration(time[2] as string),
  };
}

/** `h2load` over cleartext HTTP/2 with prior knowledge (its default for an http:// URL). */
export async function h2load(
  procs: Procs,
  bin: string,
  o: { url: string; clients: number; streams: number; seconds: number; warmupS: number; core: number | null },
): Promise<H2loadResult> {
  const r = await procs.run(
    bin,
    [`-c${o.clients}`, `-m${o.streams}`, "-t1", `-D${o.seconds}`, `--warm-up-time=${o.warmupS}`, o.url],
    { core: o.core, timeoutMs: (o.seconds + o.warmupS + 15) * 1000 },
  );
  const parsed = parseH2load(r.stdout, o.clients, o.streams);
  if (!parsed) throw new Error(`h2load ${o.url}: unreadable output (exit ${r.code}):\n${r.stdout}${r.stderr}`);
  return parsed;
}

export interface RedisBenchResult {
  test: string;
  clients: number;
  requests: number;
  throughput: number;
  p50: number;
  p99: number;
}

/** redis-benchmark --csv: a header line, then one line per test with its rate and latency percentiles. */
export function parseRedisBench(out: string, clients: number, requests: number): RedisBenchResult[] {
  const lines = out
    .trim()
    .split("\n")
    .map((l) => l.trim().replaceAll('"', "").split(","));
  const head = lines.find((l) => l[0] === "test");
  if (!head) return [];
  const col = (name: string) => head.indexOf(name);
  return lines
    .filter((l) => l !== head && l.length === head.length)
    .map((l) => ({
      test: l[0] as string,
      clients,
      requests,
      throughput: Number(l[col("rps")]),
      p50: Number(l[col("p50_latency_ms")]),
      p99: Number(l[col("p99_latency_ms")]),
    }));
}

/** One redis-benchmark test (`-t`), `requests` commands over `clients` connections, no pipelining. */
export async function redisBenchmark(
  procs: Procs,
  bin: string,
  o: { port: number; test: string; clients: number; requests: number; core: number | null; timeoutS: number },
): Promise<RedisBenchResult> {
  const r = await procs.run(
    bin,
    ["-h", "127.0.0.1", "-p", String(o.port), "-c", String(o.clients), "-n", String(o.requests), "-t", o.test, "--csv"],
    { core: o.core, timeoutMs: o.timeoutS * 1000 },
  );
  const [parsed] = parseRedisBench(r.stdout, o.clients, o.requests);
  if (!parsed || r.code !== 0) {
    throw new Error(`redis-benchmark -t ${o.test} on port ${o.port}: exit ${r.code}:\n${r.stdout}${r.stderr}`);
  }
  return parsed;
}
