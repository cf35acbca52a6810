// Invariant 3: a peer that is not on the allow-list gets 403 and never reaches the app.
// Invariant 4: x-forwarded-client-cert from a caller is removed; only the sidecar sets it.
import { X509Certificate } from "node:crypto";
import t from "tap";
import { request } from "undici";
import { app, mtlsAgent, pki, sample, sidecar } from "./lib/mesh.js";

t.test("allow-list and per-route rules", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  await p.identity("gateway.ashchan.local");
  await p.identity("boards.ashchan.local");
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: {
      app: backend.url,
      allow: ["gateway.ashchan.local", "boards.ashchan.local"],
      routes: [{ path: "/api/v1/verify", methods: ["POST"], allow: ["gateway.ashchan.local"] }],
    },
    outbound: { enabled: false },
  });
  const url = `https://127.0.0.1:${auth.inboundPort}`;
  const as = (name: string) => mtlsAgent(p, name, { servername: "auth.ashchan.local" });

  const ok = await request(`${url}/api/v1/verify`, {
    method: "POST",
    body: "{}",
    dispatcher: as("gateway.ashchan.local"),
  });
  t.equal(ok.statusCode, 200);
  await ok.body.dump();

  const denied = await request(`${url}/api/v1/verify`, {
    method: "POST",
    body: "{}",
    dispatcher: as("boards.ashchan.local"),
  });
  t.equal(denied.statusCode, 403);
  t.equal(denied.headers["x-ashmesh-error"], "forbidden");
  const body = (await denied.body.json()) as Record<string, string>;
  t.equal(body.error, "forbidden");
  t.equal(body.identity, "boards.ashchan.local");
  t.match(body.message, /boards\.ashchan\.local may not call POST \/api\/v1\/verify on auth\.ashchan\.local/);

  const other = await request(`${url}/api/v1/accounts`, { dispatcher: as("boards.ashchan.local") });
  t.equal(other.statusCode, 200, "boards may call what the route does not cover");
  await other.body.dump();

  t.same(
    backend.seen.map((r) => `${r.method} ${r.url}`),
    ["POST /api/v1/verify", "GET /api/v1/accounts"],
    "the denied request never reached the app",
  );
  const metrics = await auth.metrics();
  t.equal(sample(metrics, "mtls_authz_denied_total", { identity: "boards.ashchan.local", route: "/api/v1/verify" }), 1);
  t.equal(
    sample(metrics, "mtls_requests_total", { direction: "inbound", peer: "boards.ashchan.local", code: "403" }),
    1,
  );
  const line = auth.logs.events("authz_denied")[0];
  t.match(line, { identity: "boards.ashchan.local", route: "/api/v1/verify", method: "POST", path: "/api/v1/verify" });
});

t.test("an identity not on the allow-list is refused on every path; [] refuses everyone", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  await p.identity("media.ashchan.local");
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url, allow: ["gateway.ashchan.local"] },
    outbound: { enabled: false },
  });
  const res = await request(`https://127.0.0.1:${auth.inboundPort}/`, {
    dispatcher: mtlsAgent(p, "media.ashchan.local", { servername: "auth.ashchan.local" }),
  });
  t.equal(res.statusCode, 403);
  await res.body.dump();
  const nobody = await sidecar(t, p, "boards.ashchan.local", {
    inbound: { app: backend.url, allow: [] },
    outbound: { enabled: false },
  });
  const res2 = await request(`https://127.0.0.1:${nobody.inboundPort}/`, {
    dispatcher: mtlsAgent(p, "media.ashchan.local", { servername: "boards.ashchan.local" }),
  });
  t.equal(res2.statusCode, 403);
  await res2.body.dump();
  t.equal(backend.seen.length, 0);
});

t.test(
  "x-forwarded-client-cert: the caller's copy is dropped, the sidecar's describes the verified cert",
  async (t) => {
    const p = await pki(t);
    const backend = await app(t);
    const gw = await p.identity("gateway.ashchan.local", { uri: ["spiffe://ashchan.local/ns/default/sa/gateway"] });
    const auth = await sidecar(t, p, "auth.ashchan.local", {
      inbound: { app: backend.url },
      outbound: { enabled: false },
    });
    const res = await request(`https://127.0.0.1:${auth.inboundPort}/x`, {
      headers: {
        "x-forwarded-client-cert": "By=spiffe://evil;URI=spiffe://ashchan.local/admin;DNS=admin.ashchan.local",
        "X-Forwarded-Client-Cert": "DNS=second.copy",
      },
      dispatcher: mtlsAgent(p, "gateway.ashchan.local", { servername: "auth.ashchan.local" }),
    });
    t.equal(res.statusCode, 200);
    await res.body.dump();
    const seen = backend.seen[0];
    const copies =
      seen?.rawHeaders.filter((_, i, all) => i % 2 === 0 && all[i]?.toLowerCase() === "x-forwarded-client-cert") ?? [];
    t.equal(copies.length, 1, "exactly one XFCC header reaches the app");
    const sha256 = new X509Certificate(p.read(gw.cert)).fingerprint256.replaceAll(":", "").toLowerCase();
    t.equal(
      seen?.headers["x-forwarded-client-cert"],
      `By=auth.ashchan.local;Hash=${sha256};Subject="CN=gateway.ashchan.local";URI=spiffe://ashchan.local/ns/default/sa/gateway;DNS=gateway.ashchan.local`,
    );
  },
);
