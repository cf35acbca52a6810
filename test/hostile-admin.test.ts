// Hostile inputs, class admin: the admin listener is loopback by default, read-only, answers only
// Host names that are its own (a web page cannot read /status through DNS rebinding), and shows
// no key material. Each row states the answer.

import t from "tap";
import { request } from "undici";
import { parseConfig } from "../config/load.js";
import { hostAllowed } from "../proxy/admin.js";
import { app, GET, mtlsAgent, pki, rawTls, sample, sidecar } from "./lib/mesh.js";

t.test("admin binds to loopback unless told otherwise", async (t) => {
  const c = parseConfig({ service: { name: "auth", dnsName: "auth.ashchan.local" } });
  t.same(c.admin.listen, { host: "127.0.0.1", port: 9901 });
  const env = parseConfig(
    { service: { name: "auth", dnsName: "auth.ashchan.local" } },
    { env: { ADMIN_LISTEN: "0.0.0.0:9901" } },
  );
  t.same(
    env.admin.listen,
    { host: "0.0.0.0", port: 9901 },
    "ADMIN_LISTEN opens it to the network, as the containers do",
  );
});

t.test("Host names the admin listener answers", async (t) => {
  const ours = new Set(["localhost", "auth", "auth.ashchan.local", "scraper.example"]);
  const rows: Array<[string | undefined, boolean]> = [
    ["127.0.0.1:9901", true],
    ["[::1]:9901", true],
    ["10.89.0.7", true],
    ["localhost:9901", true],
    ["auth.ashchan.local:9901", true],
    ["AUTH.ashchan.local.", true],
    ["auth", true],
    ["scraper.example", true],
    [undefined, true], // HTTP/1.0 from a tool; browsers always send Host
    ["evil.example", false],
    ["auth.ashchan.local.evil.example:9901", false],
    ["rebind.attacker.test:9901", false],
  ];
  for (const [host, allowed] of rows)
    t.equal(hostAllowed(host, ours), allowed, `Host ${host ?? "(none)"}: ${allowed ? "answered" : "421"}`);
});

t.test("admin is read-only and answers only its own names", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url },
    outbound: { enabled: false },
    admin: { hosts: ["scraper.example"] },
  });
  await p.identity("gateway.ashchan.local");
  await request(`https://127.0.0.1:${auth.inboundPort}/`, {
    dispatcher: mtlsAgent(p, "gateway.ashchan.local", { servername: "auth.ashchan.local" }),
  }).then((r) => r.body.dump());
  const before = await auth.metrics();
  for (const path of ["/metrics", "/healthz", "/readyz", "/status", "/edges", "/reload", "/"]) {
    for (const method of ["POST", "PUT", "DELETE", "PATCH"]) {
      const r = await request(`${auth.adminUrl}${path}`, { method, body: "{}" });
      t.equal(r.statusCode, 405, `${method} ${path}: 405`);
      await r.body.dump();
    }
  }
  const after = await auth.metrics();
  for (const [name, labels] of [
    ["mtls_requests_total", { direction: "inbound", peer: "gateway.ashchan.local", code: "200" }],
    ["mtls_handshake_total", { direction: "inbound", result: "ok" }],
  ] as const) {
    t.equal(sample(after, name, labels), sample(before, name, labels), `${name} unchanged by the writes`);
  }
  t.equal((await request(`${auth.adminUrl}/readyz`)).statusCode, 200, "still ready");

  for (const [host, status] of [
    ["evil.example", 421],
    ["auth.ashchan.local", 200],
    ["scraper.example", 200],
  ] as const) {
    const r = await request(`${auth.adminUrl}/status`, { headers: { host } });
    t.equal(r.statusCode, status, `Host ${host}: ${status}`);
    const body = await r.body.text();
    if (status === 421) t.match(body, /host_not_allowed/);
    else t.notMatch(body, /PRIVATE KEY|BEGIN CERTIFICATE/, "no key or certificate in /status");
  }
  // The mTLS port is no way into admin either.
  const r = await rawTls(auth.inboundPort, { servername: "auth.ashchan.local" }, GET.replace("GET /", "GET /status"));
  t.equal(r.data, "", "no admin answer over the inbound listener without a certificate");
});
