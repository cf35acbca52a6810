// Hostile inputs, class limits: connections that hold a handshake open (slowloris, half-open
// floods) and ClientHello floods. Expected: a handshake has a deadline; unfinished handshakes are
// capped in all and per source, the oldest closed first; a verified client is served throughout.
// Latencies are reported (t.comment), never asserted: the benchmark owns timing.

import { readFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import t from "tap";
import { clientHello, tcpExchange } from "./lib/hostile.js";
import { app, eventually, GET, type Pki, pki, rawTls, sample, sidecar } from "./lib/mesh.js";
import { ashmesh, portOf, writeYaml } from "./lib/spawn.js";

const SERVER = "auth.ashchan.local";

/** `count` TCP connections that never send a byte, from `localAddress`, opened one after the other. */
async function silent(port: number, count: number, localAddress = "127.0.0.1"): Promise<net.Socket[]> {
  const sockets: net.Socket[] = [];
  for (let i = 0; i < count; i++) {
    const s = net.connect({ host: "127.0.0.1", port, localAddress });
    s.on("error", () => undefined);
    await new Promise<void>((resolve) => {
      s.once("connect", () => resolve());
      s.once("close", () => resolve());
    });
    sockets.push(s);
  }
  return sockets;
}

const closedByServer = (s: net.Socket) => s.destroyed || s.readableEnded;

async function goodClient(p: Pki, port: number, requests: number): Promise<{ ok: number; ms: number[] }> {
  const f = p.files("gateway.ashchan.local");
  const creds = { cert: p.read(f.cert), key: p.read(f.key), ca: p.read(p.trust.ca), servername: SERVER };
  const ms: number[] = [];
  let ok = 0;
  for (let i = 0; i < requests; i++) {
    const started = performance.now();
    const r = await rawTls(port, creds, GET);
    ms.push(performance.now() - started);
    if (r.data.startsWith("HTTP/1.1 200")) ok++;
  }
  return { ok, ms };
}

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? Number.NaN;
}

t.test("a handshake has a deadline (limits.handshakeTimeoutMs)", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, SERVER, {
    inbound: { app: backend.url },
    outbound: { enabled: false },
    limits: { handshakeTimeoutMs: 300 },
  });
  const hello = await clientHello(SERVER);
  const nothing = tcpExchange(auth.inboundPort, Buffer.alloc(0), { ms: 15_000 });
  const half = tcpExchange(auth.inboundPort, hello.subarray(0, 40), { ms: 15_000 });
  t.ok((await nothing).closedByPeer, "a connection that sends nothing is closed by the sidecar");
  t.ok((await half).closedByPeer, "a connection that sends half a ClientHello is closed by the sidecar");
  t.ok(
    await eventually(
      async () =>
        sample(await auth.metrics(), "mtls_handshake_failures", { direction: "inbound", reason: "timeout" }) === 2,
      10_000,
    ),
    "both counted as timeout",
  );
  t.match(
    auth.logs.events("mtls_handshake_failed").map((l) => l.detail),
    [/handshakeTimeoutMs.*sent nothing/, /handshakeTimeoutMs/],
  );
});

t.test("unfinished handshakes are capped per source and in all, oldest closed first", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  await p.identity("gateway.ashchan.local");
  const auth = await sidecar(t, p, SERVER, {
    inbound: { app: backend.url },
    outbound: { enabled: false },
    limits: { maxPendingHandshakesPerSource: 20, maxPendingHandshakes: 50, handshakeTimeoutMs: 60_000 },
  });
  const overload = async () =>
    sample(await auth.metrics(), "mtls_handshake_failures", { direction: "inbound", reason: "overload" });

  const one = await silent(auth.inboundPort, 30, "127.0.0.2");
  t.teardown(() => {
    for (const s of one) s.destroy();
  });
  t.ok(await eventually(async () => (await overload()) === 10, 10_000), "30 from one source: 10 closed to keep 20");
  t.ok(await eventually(() => one.slice(0, 10).every(closedByServer), 10_000), "the 10 oldest are the ones closed");
  t.notOk(one.slice(10).some(closedByServer), "the 20 newest stay");
  const during = await goodClient(p, auth.inboundPort, 5);
  t.equal(during.ok, 5, "a verified client from another source is served meanwhile");

  // Two more sources fill the table (50): the oldest in all goes, whoever it belongs to.
  const two = await silent(auth.inboundPort, 20, "127.0.0.3");
  const three = await silent(auth.inboundPort, 15, "127.0.0.4");
  t.teardown(() => {
    for (const s of [...two, ...three]) s.destroy();
  });
  t.ok(await eventually(async () => (await overload()) === 15, 10_000), "55 unfinished: 5 more closed");
  t.ok(await eventually(() => one.slice(10, 15).every(closedByServer), 10_000), "the oldest of all (source one) went");
  const after = await goodClient(p, auth.inboundPort, 5);
  t.equal(after.ok, 5, "a verified client is still served");
  t.equal(backend.seen.length, 10, "only the verified client's requests reached the app");
});

/** The fd limit of this process: the half-open ramp stays below it. */
function openFileLimit(): number {
  const line = readFileSync("/proc/self/limits", "utf8")
    .split("\n")
    .find((l) => l.startsWith("Max open files"));
  return Number(line?.split(/\s+/)[3] ?? 1024);
}

t.test("half-open connections do not lock verified clients out (the outside run's attack)", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  await p.identity("gateway.ashchan.local");
  // Default limits: maxConnections 4096, maxPendingHandshakes 512, per source 128, 5 s deadline.
  const auth = await sidecar(t, p, SERVER, { inbound: { app: backend.url }, outbound: { enabled: false } });
  const held: net.Socket[] = [];
  t.teardown(() => {
    for (const s of held) s.destroy();
  });
  // Sources spread over 127.0.1.0/24: past the per-source cap, the total cap is what is tested.
  const ceiling = Math.min(4_100, openFileLimit() - 600);
  let opened = 0;
  for (const step of [0, 500, 1_000, 2_000, 4_100].filter((n) => n <= ceiling)) {
    while (opened < step) {
      const batch = Math.min(100, step - opened);
      held.push(...(await silent(auth.inboundPort, batch, `127.0.1.${1 + Math.floor(opened / 100)}`)));
      opened += batch;
    }
    const good = await goodClient(p, auth.inboundPort, 30);
    t.equal(good.ok, 30, `${step} half-open connections held: every verified request served`);
    t.comment(
      `${step} half-open: verified client p50 ${percentile(good.ms, 50).toFixed(1)} ms, p99 ${percentile(good.ms, 99).toFixed(1)} ms (new TLS connection each)`,
    );
  }
  const pending = auth.sidecar.status() as { open_connections: { inbound: number } };
  t.ok(pending.open_connections.inbound <= 1, "the held connections never counted as open mTLS connections");
});

/**
 * Up to 1,000 ClientHellos a second from 127.0.0.2 for 10 s (each dropped once the server answered,
 * or after 200 ms), while a verified client on 127.0.0.1 makes a request every 100 ms.
 */
async function floodWithClient(p: Pki, port: number): Promise<{ sent: number; ok: number; ms: number[] }> {
  const hello = await clientHello(SERVER);
  const until = Date.now() + 10_000;
  let sent = 0;
  const flood = (async () => {
    while (Date.now() < until && sent < 10_000) {
      const tick = Date.now();
      for (let i = 0; i < 50; i++) {
        const s = net.connect({ port, host: "127.0.0.1", localAddress: "127.0.0.2" }, () => s.write(hello));
        s.on("error", () => undefined);
        s.once("data", () => s.destroy());
        setTimeout(() => s.destroy(), 200).unref();
        sent++;
      }
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, 50 - (Date.now() - tick))));
    }
  })();
  const ms: number[] = [];
  let ok = 0;
  while (Date.now() < until) {
    const r = await goodClient(p, port, 1);
    ok += r.ok;
    ms.push(...r.ms);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  await flood;
  return { sent, ok, ms };
}

t.test("a ClientHello flood does not stop verified clients", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const files = await p.identity(SERVER);
  await p.identity("gateway.ashchan.local");
  for (const perSource of [0, 50]) {
    // Its own process, so the flood generated here does not share the sidecar's event loop.
    const config = writeYaml(join(p.dir, `auth-${perSource}.yaml`), {
      service: { name: "auth-accounts", dnsName: SERVER },
      tls: { cert: files.cert, key: files.key, ca: files.ca, crl: files.crl },
      inbound: { listen: "127.0.0.1:0", app: backend.url, allow: ["gateway.ashchan.local"] },
      outbound: { enabled: false },
      admin: { listen: "127.0.0.1:0" },
      limits: { handshakesPerSecondPerSource: perSource },
    });
    const proc = ashmesh(["proxy", "--config", config]);
    t.teardown(() => proc.child.kill("SIGKILL"));
    const port = portOf(await proc.waitFor((l) => l.event === "listening" && l.listener === "inbound", 30_000));
    const admin = portOf(await proc.waitFor((l) => l.event === "listening" && l.listener === "admin", 30_000));
    const run = await floodWithClient(p, port);
    const label = perSource ? `limits.handshakesPerSecondPerSource ${perSource}` : "no rate limit (default)";
    t.equal(run.ok, run.ms.length, `${label}: every verified request during the flood was served (${run.ok})`);
    t.comment(
      `${label}: flood of ${run.sent} ClientHellos in 10 s; verified client p50 ${percentile(run.ms, 50).toFixed(1)} ms, p99 ${percentile(run.ms, 99).toFixed(1)} ms over ${run.ms.length} requests`,
    );
    if (perSource) {
      const metrics = await (await fetch(`http://127.0.0.1:${admin}/metrics`)).text();
      t.ok(
        sample(metrics, "mtls_handshake_failures", { direction: "inbound", reason: "overload" }) > run.sent / 2,
        "most of the flood was turned away before TLS (reason overload)",
      );
    }
    proc.child.kill("SIGTERM");
    await proc.exited;
  }
});
