// SIGTERM: /readyz turns 503, the listeners stop accepting, a request in flight still gets its
// whole answer, and the process exits 0. SIGHUP reloads the identity files.

import net from "node:net";
import { join } from "node:path";
import t from "tap";
import { request } from "undici";
import { app, eventually, mtlsAgent, pki } from "./lib/mesh.js";
import { ashmesh, portOf, writeYaml } from "./lib/spawn.js";

t.test("drain on SIGTERM", async (t) => {
  const p = await pki(t);
  await p.identity("gateway.ashchan.local");
  const files = await p.identity("auth.ashchan.local");
  // The app answers when the test says so: after the checks made while the sidecar drains.
  let finish = () => {};
  const slow = await app(t, (_req, res) => {
    finish = () => res.end("finished");
  });
  const config = writeYaml(join(p.dir, "auth.yaml"), {
    service: { name: "auth-accounts", dnsName: "auth.ashchan.local" },
    tls: { cert: files.cert, key: files.key, ca: files.ca, crl: files.crl },
    inbound: { listen: "127.0.0.1:0", app: slow.url },
    outbound: { enabled: false },
    admin: { listen: "127.0.0.1:0" },
    limits: { drainTimeoutMs: 5000 },
  });
  const proc = ashmesh(["proxy", "--config", config]);
  t.teardown(() => proc.child.kill("SIGKILL"));
  const inbound = portOf(await proc.waitFor((l) => l.event === "listening" && l.listener === "inbound"));
  const admin = portOf(await proc.waitFor((l) => l.event === "listening" && l.listener === "admin"));
  t.equal((await request(`http://127.0.0.1:${admin}/readyz`)).statusCode, 200, "ready before");

  const inFlight = request(`https://127.0.0.1:${inbound}/slow`, {
    dispatcher: mtlsAgent(p, "gateway.ashchan.local", { servername: "auth.ashchan.local" }),
  });
  t.ok(await eventually(() => slow.seen.length === 1, 15_000), "the request is in flight at the app");
  proc.child.kill("SIGTERM");
  await proc.waitFor((l) => l.event === "draining");

  const ready = await request(`http://127.0.0.1:${admin}/readyz`);
  t.equal(ready.statusCode, 503, "not ready while draining");
  t.same(await ready.body.json(), { status: "not_ready", reason: "draining" });

  const refused = await new Promise<string>((resolve) => {
    const s = net.connect(inbound, "127.0.0.1");
    s.on("connect", () => {
      s.destroy();
      resolve("connected");
    });
    s.on("error", (e: NodeJS.ErrnoException) => resolve(e.code ?? "error"));
  });
  t.equal(refused, "ECONNREFUSED", "no new connections while draining");

  finish();
  const res = await inFlight;
  t.equal(res.statusCode, 200);
  t.equal(await res.body.text(), "finished", "the request in flight got its whole answer");
  t.equal(await proc.exited, 0, "exit code 0");
  t.ok(proc.lines.some((l) => l.event === "stopped"));
});

t.test("SIGHUP reloads certificates", async (t) => {
  const p = await pki(t);
  const files = await p.identity("auth.ashchan.local");
  const config = writeYaml(join(p.dir, "auth.yaml"), {
    service: { name: "auth-accounts", dnsName: "auth.ashchan.local" },
    tls: { cert: files.cert, key: files.key, ca: files.ca },
    inbound: { listen: "127.0.0.1:0" },
    outbound: { enabled: false },
    admin: { listen: "127.0.0.1:0" },
  });
  // Watching off would be the systemd LoadCredential case; SIGHUP must work regardless.
  const proc = ashmesh(["proxy", "--config", config]);
  t.teardown(() => proc.child.kill("SIGKILL"));
  await proc.waitFor((l) => l.event === "listening" && l.listener === "admin");
  const before = await p.ca.issue("auth.ashchan.local", { replace: true });
  proc.child.kill("SIGHUP");
  const reloaded = await proc.waitFor((l) => l.event === "cert_reloaded" && l.serial === before.serial);
  t.ok(reloaded, "the new serial is in use");
  proc.child.kill("SIGTERM");
  t.equal(await proc.exited, 0);
});
