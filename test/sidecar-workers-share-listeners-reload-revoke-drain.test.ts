// `workers: 2`: two processes serve one sidecar's listeners. Connections reach both; /metrics adds
// them up (and does not double a certificate's expiry); /status and /edges show all of them; a
// rotated certificate reaches every worker, and so does a revocation (each closes its connections
// of the revoked peer); SIGTERM drains every worker (a request in flight still gets its answer)
// and the primary exits 0; a worker that dies is replaced.
import { once } from "node:events";
import { join } from "node:path";
import tls from "node:tls";
import t, { type Test } from "tap";
import { request } from "undici";
import { app, eventually, mtlsAgent, type Pki, pki, sample } from "./lib/mesh.js";
import { ashmesh, portOf, type Running, writeYaml } from "./lib/spawn.js";

const SERVER = "auth.ashchan.local";
const CALLER = "gateway.ashchan.local";

async function workers(t: Test, p: Pki, appUrl: string): Promise<{ proc: Running; inbound: number; admin: string }> {
  const files = await p.identity(SERVER);
  const config = writeYaml(join(p.dir, "auth.yaml"), {
    service: { name: "auth-accounts", dnsName: SERVER },
    tls: { cert: files.cert, key: files.key, ca: files.ca, crl: files.crl },
    inbound: { listen: "127.0.0.1:0", app: appUrl, allow: [CALLER] },
    outbound: { enabled: false },
    admin: { listen: "127.0.0.1:0" },
    limits: { drainTimeoutMs: 10_000 },
    workers: 2,
  });
  const proc = ashmesh(["proxy", "--config", config]);
  t.teardown(() => proc.child.kill("SIGKILL"));
  const admin = `http://127.0.0.1:${portOf(await proc.waitFor((l) => l.event === "listening" && l.listener === "admin", 30_000))}`;
  const inbound = portOf(await proc.waitFor((l) => l.event === "listening" && l.listener === "inbound", 30_000));
  t.ok(
    await eventually(async () => (await request(`${admin}/readyz`)).statusCode === 200, 30_000),
    "ready once both workers listen",
  );
  return { proc, inbound, admin };
}

/** A new TLS connection as the caller, one request on it; the serial the server presented. */
function call(p: Pki, port: number, path = "/"): Promise<{ status: string; serial: string }> {
  const f = p.files(CALLER);
  return new Promise((resolve, reject) => {
    let serial = "";
    const socket = tls.connect(
      { host: "127.0.0.1", port, cert: p.read(f.cert), key: p.read(f.key), ca: p.read(p.trust.ca), servername: SERVER },
      () => {
        serial = socket.getPeerX509Certificate()?.serialNumber.toLowerCase() ?? "";
        socket.write(`GET ${path} HTTP/1.1\r\nhost: ${SERVER}\r\nconnection: close\r\n\r\n`);
      },
    );
    let data = "";
    socket.on("data", (d) => (data += d));
    socket.on("error", reject);
    socket.on("close", () => resolve({ status: data.slice(9, 12), serial }));
  });
}

t.test("two workers serve, report together, reload and revoke together", async (t) => {
  const p = await pki(t);
  await p.identity(CALLER);
  const backend = await app(t);
  const { proc, inbound, admin } = await workers(t, p, backend.url);

  const results = await Promise.all(Array.from({ length: 12 }, (_, i) => call(p, inbound, `/r${i}`)));
  t.ok(
    results.every((r) => r.status === "200"),
    "twelve requests served",
  );
  const servedBy = new Set(proc.lines.filter((l) => l.event === "mtls_handshake_complete").map((l) => l.worker));
  t.same([...servedBy].sort(), [1, 2], "both workers took connections");

  const metrics = await (await request(`${admin}/metrics`)).body.text();
  t.equal(
    sample(metrics, "mtls_requests_total", { direction: "inbound", peer: CALLER, code: "200" }),
    12,
    "/metrics adds the workers up",
  );
  const expiry = sample(metrics, "mtls_cert_expiry_days", { cert: "server" });
  t.ok(expiry > 300 && expiry < 366, `a certificate's expiry is one value, not a sum (${expiry.toFixed(1)} days)`);
  const status = (await (await request(`${admin}/status`)).body.json()) as {
    workers: Array<{ pid: number }>;
    identity: unknown;
  };
  t.equal(status.workers.length, 2, "/status lists both workers");
  t.ok(status.identity, "with the identity");
  const edges = (await (await request(`${admin}/edges`)).body.json()) as Array<{
    src_identity: string;
    requests: number;
  }>;
  t.equal(edges.find((e) => e.src_identity === CALLER)?.requests, 12, "/edges merges both workers' counts");

  // A rotated certificate: every worker's watcher takes it.
  const { record } = await p.ca.rotate(SERVER);
  const reloadedBy = () =>
    new Set(
      proc.lines
        .filter((l) => l.event === "cert_reloaded" && l.serial === record.serial && l.worker !== undefined)
        .map((l) => l.worker),
    );
  t.ok(await eventually(() => reloadedBy().size === 2, 15_000), "both workers reloaded the new certificate");
  const after = await Promise.all(Array.from({ length: 8 }, () => call(p, inbound)));
  t.same(
    [...new Set(after.map((r) => r.serial))],
    [record.serial],
    "every new connection, whichever worker, presents it",
  );

  // Open connections on both workers, then a revocation: each worker closes its own.
  const f = p.files(CALLER);
  const open = await Promise.all(
    Array.from({ length: 6 }, async () => {
      const s = tls.connect({
        host: "127.0.0.1",
        port: inbound,
        cert: p.read(f.cert),
        key: p.read(f.key),
        ca: p.read(p.trust.ca),
        servername: SERVER,
      });
      s.on("error", () => undefined);
      await once(s, "secureConnect");
      s.write(`GET /keep HTTP/1.1\r\nhost: ${SERVER}\r\n\r\n`);
      await once(s, "data");
      return s;
    }),
  );
  const closed = Promise.all(open.map((s) => once(s, "close")));
  await p.ca.revoke(CALLER);
  await closed;
  t.pass("all six open connections of the revoked caller were closed");
  t.same(
    [...new Set(proc.lines.filter((l) => l.event === "mtls_connection_revoked").map((l) => l.worker))].sort(),
    [1, 2],
    "by both workers",
  );
});

t.test("a dead worker is replaced; SIGTERM drains every worker", async (t) => {
  const p = await pki(t);
  await p.identity(CALLER);
  let release = () => {};
  const backend = await app(t, (req, res) => {
    if (req.url === "/slow") release = () => res.end("finished");
    else res.end("ok");
  });
  const { proc, inbound, admin } = await workers(t, p, backend.url);

  const before = (await (await request(`${admin}/status`)).body.json()) as { workers: Array<{ pid: number }> };
  const victim = before.workers[0]?.pid as number;
  process.kill(victim, "SIGKILL");
  await proc.waitFor((l) => l.event === "worker_exited", 15_000);
  t.ok(
    await eventually(async () => {
      const s = (await (await request(`${admin}/status`)).body.json()) as { workers: Array<{ pid: number }> };
      return s.workers.length === 2 && !s.workers.some((w) => w.pid === victim);
    }, 30_000),
    "a new worker took the dead one's place",
  );
  t.equal((await call(p, inbound)).status, "200", "and requests are served");

  const inFlight = request(`https://127.0.0.1:${inbound}/slow`, {
    dispatcher: mtlsAgent(p, CALLER, { servername: SERVER }),
  });
  t.ok(await eventually(() => backend.seen.some((s) => s.url === "/slow"), 15_000), "a request is in flight");
  proc.child.kill("SIGTERM");
  await proc.waitFor((l) => l.event === "draining" && l.worker === undefined);
  t.equal((await request(`${admin}/readyz`)).statusCode, 503, "not ready while draining");
  release();
  const res = await inFlight;
  t.equal(await res.body.text(), "finished", "the request in flight got its whole answer");
  t.equal(await proc.exited, 0, "the primary exits 0 once every worker drained");
  const stopped = proc.lines.filter((l) => l.event === "stopped");
  t.equal(stopped.filter((l) => l.worker !== undefined).length, 2, "both live workers drained and stopped");
  t.ok(
    stopped.some((l) => l.worker === undefined),
    "then the primary",
  );
});
