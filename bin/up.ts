// `ashmesh up` (what `npm start` runs): the whole mesh of a mesh file on this machine, without
// containers. Dev certificates under .ashmesh/pki, one stand-in app and one sidecar per service,
// each service on its own loopback address so that every sidecar listens on :8443, as in Podman.
// It sends the entry request, prints every hop (HTTP, and gRPC through the caller's mapped port)
// with the identities both ends saw, then one round trip to each TCP server (Redis) from each of
// its clients, through the client's tcp.outbound, and keeps running until Ctrl-C (or exits with
// --once: 0 when every hop succeeded, a gRPC one with status OK, 1 otherwise; a TCP server that
// is not installed is skipped, saying so).
import { mkdirSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { callSucceeded, GRPC_STATUS_NAMES, type HopCall, type HopReport } from "../compose/standin.js";
import { loadMesh, type Mesh, type MeshService, type MeshTcpServer, service } from "../config/mesh.js";
import type { Sidecar } from "../proxy/sidecar.js";
import { parse } from "./args.js";
import { defaultMeshFile, ensurePki, startLocalMesh } from "./local-mesh.js";

const HELP = `ashmesh up [--mesh FILE] [--dir DIR] [--once]

Runs the mesh of FILE (default compose/mesh.yaml) on this machine: a development CA and a
certificate per service in DIR (default .ashmesh/pki; made when missing), a stand-in app and a
sidecar per service, each on its own 127.0.0.0/8 address. Sends the entry request (the seed's
post flow), prints every hop, pings each TCP server (Redis, when redis-server is installed)
through its clients' sidecars, and keeps running; --once exits after the flow (0 = every hop ok).
Sidecar logs go to DIR/../logs/<service>.log.`;

interface Hop {
  from: string;
  call: HopCall;
  callerSeen: string | null;
}

function flatten(from: string, report: HopReport, out: Hop[]): void {
  for (const call of report.calls) {
    out.push({ from, call, callerSeen: call.answer?.caller ?? null });
    if (call.answer) flatten(call.to, call.answer, out);
  }
}

/** What a hop did and how it ended: "POST /api/v1/verify  200", or the gRPC method, the port it went through and its status. */
function describeHop(caller: MeshService | undefined, callee: MeshService | undefined, call: HopCall) {
  if (call.protocol !== "grpc") return `${call.method} ${call.path}  ${call.status || "failed"}`;
  const via = caller && callee ? ` through ${caller.local}:${callee.upstreamPort}` : "";
  const status =
    call.grpc_status === null || call.grpc_status === undefined
      ? `failed${call.status ? ` (HTTP ${call.status})` : ""}`
      : `grpc-status ${call.grpc_status} ${GRPC_STATUS_NAMES[call.grpc_status] ?? ""}`.trimEnd();
  return `gRPC ${call.path}${via}  ${status}`;
}

/** A Redis PING over `host:port` (a client's tcp.outbound): the first reply line, or why none came. */
function redisPing(host: string, port: number): Promise<{ reply: string | null; error?: string }> {
  return new Promise((resolve) => {
    let data = "";
    const socket = net.connect({ host, port });
    const done = (result: { reply: string | null; error?: string }) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(result);
    };
    const timer = setTimeout(() => done({ reply: null, error: "no reply within 10 s" }), 10_000);
    socket.once("connect", () => socket.write("*1\r\n$4\r\nPING\r\n"));
    socket.on("data", (d: Buffer) => {
      data += d.toString("latin1");
      const nl = data.indexOf("\r\n");
      if (nl !== -1) done({ reply: data.slice(0, nl) });
    });
    socket.once("error", (err: NodeJS.ErrnoException) => done({ reply: null, error: err.code ?? err.message }));
    socket.once("close", () => done({ reply: null, error: "closed without a reply" }));
  });
}

/** One line (and its details) per client of a TCP server; false when a hop failed. */
async function tcpHops(
  server: MeshTcpServer,
  clients: MeshService[],
  sidecars: Map<string, Sidecar>,
  state: { running: boolean; detail: string } | undefined,
  say: (line: string) => void,
): Promise<boolean> {
  let ok = true;
  for (const client of clients) {
    const via = `${client.local}:${server.port}`;
    if (!state?.running) {
      say(`  - ${client.dnsName} → ${server.dnsName}  TCP ${server.kind}: skipped: ${state?.detail ?? "not started"}`);
      continue;
    }
    const { reply, error } = await redisPing(client.local, server.port);
    const inboundEdge = sidecars
      .get(server.key)
      ?.edges.list()
      .find((e) => e.direction === "inbound" && e.src_identity === client.dnsName);
    const outboundEdge = sidecars
      .get(client.key)
      ?.edges.list()
      .find((e) => e.direction === "outbound" && e.dst_identity === server.dnsName);
    const good = reply === "+PONG" && inboundEdge !== undefined && outboundEdge !== undefined;
    ok &&= good;
    say(
      `  ${good ? "✔" : "×"} ${client.dnsName} → ${server.dnsName}  TCP ${server.kind} PING through ${via}  ${reply ?? "failed"}\n` +
        `      client cert seen by ${server.dnsName}'s sidecar: ${inboundEdge?.src_identity ?? "none"} (once per connection: no per-command identity)\n` +
        `      server cert verified by ${client.dnsName}'s sidecar: ${outboundEdge?.dst_identity ?? "none"}` +
        `  (${inboundEdge?.tls_version ?? "?"}, ${inboundEdge?.cipher_suite ?? "?"})` +
        (error ? `\n      error: ${error}` : ""),
    );
  }
  return ok;
}

async function sendEntry(mesh: Mesh): Promise<{ status: number; report: HopReport | null; error?: string }> {
  const entry = service(mesh, mesh.entry.service);
  try {
    const res = await fetch(`http://${entry.local}:${entry.appPort}${mesh.entry.path}`, {
      method: mesh.entry.method,
      headers: { "content-type": "application/json" },
      body: mesh.entry.method === "GET" ? null : JSON.stringify({ comment: "hello from ashmesh up" }),
      signal: AbortSignal.timeout(15_000),
    });
    return { status: res.status, report: (await res.json()) as HopReport };
  } catch (err) {
    return { status: 0, report: null, error: (err as Error).message };
  }
}

export async function main(argv: string[]): Promise<number> {
  const { values } = parse({
    args: argv,
    options: {
      mesh: { type: "string" },
      dir: { type: "string", default: ".ashmesh/pki" },
      once: { type: "boolean", default: false },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(`${HELP}\n`);
    return 0;
  }
  const say = (line: string) => process.stdout.write(`${line}\n`);
  const mesh = loadMesh(values.mesh ?? defaultMeshFile());
  const dir = values.dir;
  const logDir = join(dir, "..", "logs");
  mkdirSync(logDir, { recursive: true });
  await ensurePki(mesh, dir, say);

  const { sidecars, servers, stop: stopAll } = await startLocalMesh(mesh, dir, { logDir });
  say(`\n${mesh.services.length} services up, each with its sidecar (logs in ${logDir}/)`);
  for (const server of mesh.tcp) {
    const state = servers.get(server.key);
    say(
      state?.running
        ? `${server.key}: ${state.detail}, behind its sidecar's tcp.inbound ${server.local}:${server.mtlsPort}`
        : `${server.key}: ${state?.detail ?? "not started"}; its sidecar runs, the TCP hop is skipped`,
    );
  }
  say("");

  const entry = service(mesh, mesh.entry.service);
  say(`client → ${entry.dnsName}  ${mesh.entry.method} ${mesh.entry.path}`);
  const result = await sendEntry(mesh);
  const hops: Hop[] = [];
  if (result.report) flatten(entry.dnsName, result.report, hops);
  let ok = result.status === 200 && hops.length > 0;
  for (const hop of hops) {
    const { call } = hop;
    const caller = mesh.services.find((s) => s.dnsName === hop.from);
    const callee = mesh.services.find((s) => s.dnsName === call.to);
    // What each end verified: the callee's sidecar saw the client certificate (inbound edge),
    // the caller's sidecar checked the server certificate (outbound edge).
    const inboundEdge = callee
      ? sidecars
          .get(callee.key)
          ?.edges.list()
          .find((e) => e.direction === "inbound" && e.src_identity === hop.from)
      : undefined;
    const outboundEdge = caller
      ? sidecars
          .get(caller.key)
          ?.edges.list()
          .find((e) => e.direction === "outbound" && e.dst_identity === call.to)
      : undefined;
    const good =
      callSucceeded(call) &&
      hop.callerSeen === hop.from &&
      inboundEdge?.src_identity === hop.from &&
      outboundEdge?.dst_identity === call.to;
    ok &&= good;
    // gRPC carries x-forwarded-client-cert as metadata: the same header, read by the server's handler.
    const xfcc = call.protocol === "grpc" ? "x-forwarded-client-cert metadata" : "x-forwarded-client-cert";
    say(
      `  ${good ? "✔" : "×"} ${hop.from} → ${call.to}  ${describeHop(caller, callee, call)}\n` +
        `      client cert seen by ${call.to}: ${inboundEdge?.src_identity ?? "none"} (app read ${xfcc}: ${hop.callerSeen ?? "none"})\n` +
        `      server cert verified by ${hop.from}'s sidecar: ${outboundEdge?.dst_identity ?? "none"}` +
        `  (${inboundEdge?.tls_version ?? "?"}, ${inboundEdge?.cipher_suite ?? "?"})` +
        (call.error ? `\n      error: ${call.error}` : ""),
    );
  }
  if (!result.report) say(`  × the entry request failed: ${result.error ?? `status ${result.status}`}`);
  for (const server of mesh.tcp) {
    const clients = server.clients.map((c) => service(mesh, c));
    ok = (await tcpHops(server, clients, sidecars, servers.get(server.key), say)) && ok;
  }
  say(
    `\n${ok ? "✔ the post crossed the mesh: every hop mutually authenticated" : "× some hop failed (see above and the logs)"}`,
  );
  say("\nadmin endpoints (metrics, status, edges):");
  for (const s of [...mesh.services, ...mesh.tcp])
    say(`  ${s.key.padEnd(11)} http://${s.local}:${mesh.ports.admin}/metrics  /status  /edges`);

  if (values.once) {
    await stopAll();
    return ok ? 0 : 1;
  }
  say("\nrunning; Ctrl-C to stop");
  await new Promise<void>((resolve) => {
    process.once("SIGINT", () => resolve());
    process.once("SIGTERM", () => resolve());
  });
  say("stopping: draining the sidecars");
  await stopAll();
  return ok ? 0 : 1;
}
