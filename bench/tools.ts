// The outside tools the bench drives, and what it reads from their output: wrk for the maximum
// throughput (a C load generator is far cheaper per request than a Node one), and
// `openssl s_time -new` for full mTLS handshakes with a client certificate.
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
