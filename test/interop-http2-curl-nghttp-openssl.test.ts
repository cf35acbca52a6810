// HTTP/2 with real clients: the inbound offers ALPN h2 and http/1.1 (openssl s_client sees h2
// negotiated), curl --http2 and nghttp speak HTTP/2 to it with a client certificate, curl
// --http2-prior-knowledge and nghttp speak cleartext HTTP/2 to the outbound's mapped port, and a
// peer that offers only http/1.1 is still reached (over HTTP/1.1). HTTP/2 callers share one
// connection to the peer; HTTP/1.1 callers use a pool unless outbound.peerProtocol is "h2".
import { spawnSync } from "node:child_process";
import http2 from "node:http2";
import https from "node:https";
import type { AddressInfo } from "node:net";
import t from "tap";
import { hasOpenssl, openssl } from "./lib/certs.js";
import { app, pki, sample, sidecar, viaProxy } from "./lib/mesh.js";
import { run } from "./lib/run.js";

const hasCurl = spawnSync("curl", ["--version"]).stdout?.toString().includes("HTTP2") ?? false;
const hasNghttp = spawnSync("nghttp", ["--version"]).status === 0;

t.test(
  "ALPN, curl and nghttp over HTTP/2",
  { skip: !(hasOpenssl && hasCurl) && "needs openssl and curl with HTTP/2" },
  async (t) => {
    const p = await pki(t);
    const backend = await app(t);
    const auth = await sidecar(t, p, "auth.ashchan.local", {
      inbound: { app: backend.url, allow: ["gateway.ashchan.local"] },
      outbound: { enabled: false },
    });
    const gw = p.files(await p.identity("gateway.ashchan.local").then(() => "gateway.ashchan.local"));
    const port = auth.inboundPort;

    const s = await openssl(
      ["s_client", "-connect", `127.0.0.1:${port}`, "-servername", "auth.ashchan.local", "-alpn", "h2,http/1.1"].concat(
        ["-cert", gw.cert, "-key", gw.key, "-CAfile", p.trust.ca],
      ),
      "",
    );
    t.match(s.out, /ALPN protocol: h2/, "openssl s_client -alpn h2: h2 negotiated");

    const curl = (args: string[]) =>
      run("curl", [
        "-sS",
        "--cert",
        gw.cert,
        "--key",
        gw.key,
        "--cacert",
        p.trust.ca,
        "--resolve",
        `auth.ashchan.local:${port}:127.0.0.1`,
        "-w",
        "\n%{http_code} %{http_version}",
        ...args,
        `https://auth.ashchan.local:${port}/over-h2`,
      ]);
    const h2 = await curl(["--http2"]);
    t.match(h2.out, /\n200 2$/, "curl --http2: 200 over HTTP/2");
    const h1 = await curl(["--http1.1"]);
    t.match(h1.out, /\n200 1\.1$/, "curl --http1.1: still served, over HTTP/1.1");
    t.match(backend.seen[0]?.headers["x-forwarded-client-cert"], /DNS=gateway\.ashchan\.local/, "XFCC over HTTP/2 too");

    if (hasNghttp) {
      const ng = await run("nghttp", [
        "-v",
        "--cert",
        gw.cert,
        "--key",
        gw.key,
        `https://127.0.0.1:${port}/via-nghttp`,
      ]);
      t.match(ng.out, /:status: 200/, "nghttp: 200");
    }
    const m = await auth.metrics();
    t.ok(sample(m, "mtls_requests_total", { direction: "inbound", protocol: "h2", code: "200" }) >= 1, "counted as h2");
    t.equal(sample(m, "mtls_requests_total", { direction: "inbound", protocol: "http1", code: "200" }), 1, "and h1");
  },
);

t.test(
  "cleartext HTTP/2 to the outbound, HTTP/2 between the sidecars",
  { skip: !hasCurl && "needs curl with HTTP/2" },
  async (t) => {
    const p = await pki(t);
    const backend = await app(t);
    const auth = await sidecar(t, p, "auth.ashchan.local", {
      inbound: { app: backend.url },
      outbound: { enabled: false },
    });
    const gw = await sidecar(t, p, "gateway.ashchan.local", {
      inbound: { enabled: false },
      outbound: {
        resolve: { "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}` },
        upstreams: { auth: { listen: "127.0.0.1:0", target: "auth.ashchan.local:8443" } },
      },
    });
    const mapped = gw.sidecar.addresses.outbound.find((l) => l.name === "upstream auth")?.address.port ?? 0;
    const r = await run("curl", [
      "-sS",
      "--http2-prior-knowledge",
      "-w",
      "\n%{http_code} %{http_version}",
      `http://127.0.0.1:${mapped}/h2c`,
    ]);
    t.match(r.out, /\n200 2$/, "curl --http2-prior-knowledge to the mapped port: 200 over HTTP/2");
    if (hasNghttp) {
      const ng = await run("nghttp", ["-v", `http://127.0.0.1:${mapped}/h2c-nghttp`]);
      t.match(ng.out, /:status: 200/, "nghttp h2c: 200");
    }
    // Twenty HTTP/2 calls at once from the app: one mTLS connection between the sidecars carries
    // them all, and carried curl's and nghttp's before them.
    const session = http2.connect(`http://127.0.0.1:${mapped}`);
    t.teardown(() => session.destroy());
    const statuses = await Promise.all(
      Array.from(
        { length: 20 },
        (_, i) =>
          new Promise<number>((resolve, reject) => {
            const s = session.request({ ":path": `/many/${i}` }, { endStream: true });
            let status = 0;
            s.on("response", (h) => {
              status = Number(h[":status"]);
            });
            s.resume();
            s.on("end", () => resolve(status));
            s.on("error", reject);
          }),
      ),
    );
    t.ok(
      statuses.every((x) => x === 200),
      "twenty concurrent HTTP/2 calls",
    );
    t.equal(
      sample(await auth.metrics(), "mtls_handshake_total", { direction: "inbound", result: "ok" }),
      1,
      "over one connection (HTTP/2 multiplexing)",
    );
    t.match(gw.logs.events("mtls_handshake_complete")[0], { alpn: "h2" });
  },
);

t.test("HTTP/1.1 callers: pooled HTTP/1.1 to the peer, or one HTTP/2 session with peerProtocol h2", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url },
    outbound: { enabled: false },
  });
  for (const peerProtocol of ["match", "h2"] as const) {
    const gw = await sidecar(t, p, "gateway.ashchan.local", {
      inbound: { enabled: false },
      outbound: { peerProtocol, resolve: { "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}` } },
    });
    const results = await Promise.all(
      Array.from({ length: 20 }, (_, i) => viaProxy(gw.outboundPort, `http://auth.ashchan.local/many/${i}`)),
    );
    t.ok(
      results.every((x) => x.status === 200),
      `${peerProtocol}: twenty concurrent HTTP/1.1 calls`,
    );
    const alpns = gw.logs.events("mtls_handshake_complete").map((l) => l.alpn);
    if (peerProtocol === "h2") t.same(alpns, ["h2"], "h2: all over one HTTP/2 connection");
    else {
      t.ok(alpns.length > 1, `match: a pool of connections (${alpns.length})`);
      t.ok(
        alpns.every((a) => a === "http/1.1"),
        "match: every one HTTP/1.1",
      );
    }
  }
});

t.test("a peer that offers only http/1.1 is reached over HTTP/1.1", async (t) => {
  const p = await pki(t);
  const auth = await p.identity("auth.ashchan.local");
  const server = https.createServer(
    {
      cert: p.read(auth.cert),
      key: p.read(auth.key),
      ca: p.read(p.trust.ca),
      requestCert: true,
      ALPNProtocols: ["http/1.1"],
    },
    (req, res) => res.end(`h1 only, ${req.httpVersion}`),
  );
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.teardown(() => server.close());
  const gw = await sidecar(t, p, "gateway.ashchan.local", {
    inbound: { enabled: false },
    // "h2": every call tries HTTP/2 first, so the fallback is what is tested.
    outbound: {
      peerProtocol: "h2",
      resolve: { "auth.ashchan.local": `127.0.0.1:${(server.address() as AddressInfo).port}` },
    },
  });
  for (let i = 0; i < 3; i++) {
    const r = await viaProxy(gw.outboundPort, "http://auth.ashchan.local/");
    t.equal(r.status, 200);
    t.equal(r.body, "h1 only, 1.1");
  }
  t.same(
    gw.logs.events("mtls_handshake_complete").map((l) => l.alpn),
    ["http/1.1", "http/1.1"],
    "the first connection found HTTP/1.1 only; the pool used HTTP/1.1 from then on",
  );
});
