// Metrics move as traffic flows, the handshake log line has the seed's exact shape, and the
// admin endpoints answer what DESIGN §6 says.
import t from "tap";
import { request } from "undici";
import { app, mtlsAgent, pki, sample, sidecar, viaProxy } from "./lib/mesh.js";

async function mesh(t: Parameters<typeof pki>[0]) {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    service: { name: "auth-accounts" },
    inbound: { app: backend.url, allow: ["gateway.ashchan.local"] },
    outbound: { enabled: false },
  });
  const gw = await sidecar(t, p, "gateway.ashchan.local", {
    service: { name: "api-gateway" },
    inbound: { enabled: false },
    outbound: {
      resolve: {
        "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}`,
        "boards.ashchan.local": `127.0.0.1:${auth.inboundPort}`,
      },
    },
  });
  return { p, backend, auth, gw };
}

t.test("counters and histograms follow successes and failures", async (t) => {
  const { p, auth, gw } = await mesh(t);
  for (let i = 0; i < 5; i++)
    t.equal((await viaProxy(gw.outboundPort, "http://auth.ashchan.local/api/v1/verify")).status, 200);
  t.equal((await viaProxy(gw.outboundPort, "http://boards.ashchan.local/x")).status, 502, "auth's cert is not boards'");
  await p.identity("media.ashchan.local");
  const denied = await request(`https://127.0.0.1:${auth.inboundPort}/x`, {
    dispatcher: mtlsAgent(p, "media.ashchan.local", { servername: "auth.ashchan.local" }),
  });
  await denied.body.dump();

  const a = await auth.metrics();
  t.equal(
    sample(a, "mtls_handshake_total", { direction: "inbound", result: "ok" }),
    2,
    "one pooled connection from gateway, one from media",
  );
  t.equal(sample(a, "mtls_requests_total", { direction: "inbound", peer: "gateway.ashchan.local", code: "200" }), 5);
  t.equal(sample(a, "mtls_requests_total", { direction: "inbound", peer: "media.ashchan.local", code: "403" }), 1);
  t.equal(sample(a, "mtls_request_duration_seconds_count", { direction: "inbound", peer: "gateway.ashchan.local" }), 5);
  t.equal(sample(a, "mtls_handshake_duration_seconds_count", { direction: "inbound" }), 2);
  t.equal(sample(a, "mtls_authz_denied_total", { identity: "media.ashchan.local", route: "default" }), 1);
  t.ok(sample(a, "mtls_open_connections", { direction: "inbound" }) >= 1, "the pooled connection is open");
  const expiry = sample(a, "mtls_cert_expiry_days", { cert: "server", subject: "CN=auth.ashchan.local" });
  t.ok(expiry > 364 && expiry <= 365, `server cert expires in ~365 days (${expiry})`);
  t.ok(sample(a, "mtls_cert_expiry_days", { cert: "ca", subject: "CN=ashchan-ca,O=ashmesh development CA" }) > 3600);
  t.ok(sample(a, "mtls_crl_next_update_days", {}) > 6, "the CRL's nextUpdate is published");

  const g = await gw.metrics();
  t.equal(
    sample(g, "mtls_handshake_total", { direction: "outbound", result: "ok" }),
    1,
    "the pool reused one connection",
  );
  t.equal(sample(g, "mtls_handshake_total", { direction: "outbound", result: "failed" }), 1);
  t.equal(sample(g, "mtls_handshake_failures", { direction: "outbound", reason: "bad_san" }), 1);
  t.equal(sample(g, "mtls_requests_total", { direction: "outbound", peer: "auth.ashchan.local", code: "200" }), 5);
  t.equal(sample(g, "mtls_requests_total", { direction: "outbound", peer: "boards.ashchan.local", code: "502" }), 1);
});

t.test("the handshake log line is the seed's, key for key", async (t) => {
  const { auth, gw } = await mesh(t);
  await viaProxy(gw.outboundPort, "http://auth.ashchan.local/api/v1/verify");
  const line = auth.logs.events("mtls_handshake_complete")[0] as Record<string, unknown>;
  t.same(Object.keys(line).slice(0, 8), [
    "timestamp",
    "level",
    "service",
    "event",
    "client_cn",
    "server_cn",
    "tls_version",
    "cipher_suite",
  ]);
  t.match(line, {
    level: "info",
    service: "auth-accounts",
    event: "mtls_handshake_complete",
    client_cn: "gateway.ashchan.local",
    server_cn: "auth.ashchan.local",
    tls_version: "TLSv1.3",
    cipher_suite: "TLS_AES_256_GCM_SHA384",
  });
  t.match(String(line.timestamp), /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);
  for (const l of [...auth.logs.lines, ...gw.logs.lines]) {
    t.type(l.timestamp, "string");
    t.match(l.level, /^(trace|debug|info|warn|error|fatal)$/);
    t.type(l.service, "string");
    t.type(l.event, "string", `every line has an event: ${JSON.stringify(l).slice(0, 80)}`);
  }
});

t.test("admin: /healthz, /readyz, /status, /edges, /metrics", async (t) => {
  const { auth, gw } = await mesh(t);
  await viaProxy(gw.outboundPort, "http://auth.ashchan.local/api/v1/verify");
  const get = async (url: string) => {
    const r = await request(url);
    return { status: r.statusCode, type: r.headers["content-type"], body: await r.body.text() };
  };
  t.equal((await get(`${auth.adminUrl}/healthz`)).status, 200);
  t.equal((await get(`${auth.adminUrl}/readyz`)).status, 200);
  const metrics = await get(`${auth.adminUrl}/metrics`);
  t.match(metrics.type, /^text\/plain/);
  t.match(metrics.body, /# TYPE mtls_handshake_total counter/);
  t.match(metrics.body, /# TYPE mtls_handshake_failures counter/);
  const status = JSON.parse((await get(`${auth.adminUrl}/status`)).body);
  t.match(status, {
    service: "auth-accounts",
    dns_name: "auth.ashchan.local",
    state: "running",
    identity: { server: { subject: "CN=auth.ashchan.local", sans: ["auth.ashchan.local"] }, crl: [{ revoked: 0 }] },
    listeners: { inbound: { verify_client: true } },
  });
  t.match(status.identity.server.serial, /^[0-9a-f]+$/);
  t.ok(status.identity.server.days_left >= 364);
  const inbound = JSON.parse((await get(`${auth.adminUrl}/edges`)).body);
  t.match(inbound, [
    {
      direction: "inbound",
      dst: "auth-accounts",
      src_identity: "gateway.ashchan.local",
      dst_identity: "auth.ashchan.local",
      tls_version: "TLSv1.3",
      requests: 1,
    },
  ]);
  const outbound = JSON.parse((await get(`${gw.adminUrl}/edges`)).body);
  t.match(outbound, [
    {
      direction: "outbound",
      src: "api-gateway",
      src_identity: "gateway.ashchan.local",
      dst_identity: "auth.ashchan.local",
      tls_version: "TLSv1.3",
      requests: 1,
    },
  ]);
  t.equal((await get(`${auth.adminUrl}/nope`)).status, 404);
});
