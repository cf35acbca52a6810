// Invariant 5: the outbound listener binds to loopback by default and the forward proxy reaches
// only `destinations`: anything else gets 403 before a connection is opened.
import net from "node:net";
import t from "tap";
import { parseConfig } from "../config/load.js";
import { app, pki, sample, sidecar, viaProxy } from "./lib/mesh.js";
import { countingServer } from "./lib/tcp.js";

t.test("the default listener is loopback, and nothing else is accepted", async (t) => {
  const c = parseConfig({ service: { name: "gw", dnsName: "gateway.ashchan.local" } });
  t.same(c.outbound.listen, { host: "127.0.0.1", port: 15001 });
  t.throws(
    () =>
      parseConfig({ service: { name: "gw", dnsName: "gateway.ashchan.local" }, outbound: { listen: "0.0.0.0:15001" } }),
    /loopback/,
  );
  t.throws(
    () =>
      parseConfig({ service: { name: "gw", dnsName: "gateway.ashchan.local" }, outbound: { listen: "[::]:15001" } }),
    /loopback/,
  );
});

t.test("only destinations are reached; others get 403 and no connection", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url },
    outbound: { enabled: false },
  });
  // A trap: a TCP server that counts connections; the denied destinations resolve to it.
  const trap = await countingServer(t, (s) => s.destroy());
  const trapAddress = trap.target;
  const gw = await sidecar(t, p, "gateway.ashchan.local", {
    inbound: { enabled: false },
    outbound: {
      destinations: ["auth.ashchan.local"],
      resolve: {
        "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}`,
        "boards.ashchan.local": trapAddress,
        "example.com": trapAddress,
      },
    },
  });
  const ok = await viaProxy(gw.outboundPort, "http://auth.ashchan.local/api/v1/verify");
  t.equal(ok.status, 200);

  for (const url of [
    "http://boards.ashchan.local/api/v1/posts",
    "http://example.com/",
    "http://127.0.0.1:9/",
    "http://AUTH.ashchan.local.evil.com/",
  ]) {
    const res = await viaProxy(gw.outboundPort, url);
    t.equal(res.status, 403, url);
    t.equal(res.headers["x-ashmesh-error"], "destination_not_allowed");
    t.match(JSON.parse(res.body).message, /is not in outbound\.destinations \(auth\.ashchan\.local\)/);
  }
  t.equal(trap.connections, 0, "no connection was opened for a denied destination");
  t.equal(sample(await gw.metrics(), "mtls_handshake_total", { direction: "outbound", result: "ok" }), 1);
  t.equal(gw.logs.events("destination_denied").length, 4);
});

t.test("CONNECT tunnels to destinations only; https:// targets are refused with a reason", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url },
    outbound: { enabled: false },
  });
  // A trap: a TCP server that counts connections; the denied destinations resolve to it.
  const trap = await countingServer(t, (s) => s.destroy());
  const trapAt = trap.target;
  const gw = await sidecar(t, p, "gateway.ashchan.local", {
    inbound: { enabled: false },
    outbound: {
      destinations: ["auth.ashchan.local"],
      resolve: { "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}`, "example.com": trapAt, localhost: trapAt },
    },
  });
  const connect = (target: string, then = "") =>
    new Promise<string>((resolve) => {
      const s = net.connect(gw.outboundPort, "127.0.0.1", () =>
        s.write(`CONNECT ${target} HTTP/1.1\r\nhost: ${target}\r\n\r\n${then}`),
      );
      let data = "";
      s.on("data", (d) => {
        data += d;
        if (then && /\r\n\r\n[\s\S]*\r\n\r\n/.test(data)) s.end();
      });
      s.on("close", () => resolve(data));
    });
  // A mesh name: the tunnel reaches auth's inbound over mTLS, and HTTP/1.1 inside it reaches the app.
  const tunnelled = await connect(
    "auth.ashchan.local:9502",
    "GET /in-tunnel HTTP/1.1\r\nhost: auth\r\nconnection: close\r\n\r\n",
  );
  t.match(tunnelled, /^HTTP\/1\.1 200 Connection Established\r\n\r\nHTTP\/1\.1 200 /);
  t.same(
    backend.seen.map((r) => r.url),
    ["/in-tunnel"],
    "the request inside the tunnel reached auth's app",
  );
  t.match(
    backend.seen[0]?.headers["x-forwarded-client-cert"],
    /DNS=gateway\.ashchan\.local/,
    "as gateway, verified by auth",
  );
  const adminPort = new URL(gw.adminUrl).port;
  for (const target of ["example.com:443", trapAt, "localhost:80", `127.0.0.1:${adminPort}`]) {
    const reply = await connect(target);
    t.match(reply, /^HTTP\/1\.1 403 /, `CONNECT ${target}: 403`);
    t.match(reply, /x-ashmesh-error: destination_not_allowed/);
  }
  t.equal(trap.connections, 0, "no refused CONNECT opened a connection");
  const https = await viaProxy(gw.outboundPort, "https://auth.ashchan.local/");
  t.equal(https.status, 400);
  t.match(https.body, /call the service over http:\/\//);
});

t.test("names no server proved add no metric series, edge or pool", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url },
    outbound: { enabled: false },
  });
  // Every *.ashchan.local is a destination; only auth is real. The made-up names are not in the
  // configuration and do not resolve, as when an app loops over typos or attacker-chosen names.
  const made = Array.from({ length: 12 }, (_, i) => `nope-${i}.ashchan.local`);
  const gw = await sidecar(t, p, "gateway.ashchan.local", {
    inbound: { enabled: false },
    outbound: {
      destinations: ["*.ashchan.local"],
      resolve: { "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}` },
    },
  });
  for (const name of made) {
    const res = await viaProxy(gw.outboundPort, `http://${name}/`);
    // 502 when the lookup fails, 504 when the resolver does not answer within the connect timeout.
    t.ok(res.status === 502 || res.status === 504, `${name}: ${res.status}`);
  }
  t.equal((await viaProxy(gw.outboundPort, "http://auth.ashchan.local/api/v1/verify")).status, 200);

  const metrics = await gw.metrics();
  t.notMatch(metrics, /nope-\d+/, "no series names a destination that no server proved");
  const unverified = ["502", "504"]
    .map((code) => sample(metrics, "mtls_requests_total", { direction: "outbound", peer: "unverified", code }))
    .reduce((a, b) => a + b, 0);
  t.equal(unverified, made.length, "each counted under the one label peer=unverified");
  t.equal(
    sample(metrics, "mtls_requests_total", { direction: "outbound", peer: "auth.ashchan.local", code: "200" }),
    1,
  );
  const edges = (await (await fetch(`${gw.adminUrl}/edges`)).json()) as Array<{ dst: string }>;
  t.same(
    edges.map((e) => e.dst),
    ["auth.ashchan.local:8443"].map((d) => d.replace("8443", String(auth.inboundPort))),
    "only the proved edge is listed",
  );
});
