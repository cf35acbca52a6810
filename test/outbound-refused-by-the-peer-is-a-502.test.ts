// When a peer's sidecar refuses our certificate (here: revoked), TLS 1.3 tells the client only
// after its handshake, when the server closes the connection. Over HTTP/2 the request's stream
// then ends without an answer: that is a 502 naming the cause, never an empty 200.
import t from "tap";
import { app, eventually, pki, sample, sidecar, viaProxy } from "./lib/mesh.js";

const cases = [
  { peerProtocol: "h2", alpn: "h2", what: "HTTP/2" },
  { peerProtocol: "match", alpn: "http/1.1", what: "HTTP/1.1" },
] as const;

for (const { peerProtocol, alpn, what } of cases)
  t.test(`a caller revoked while its ${what} connection is open gets 502, then on every new one`, async (t) => {
    const p = await pki(t);
    const backend = await app(t);
    const auth = await sidecar(t, p, "auth.ashchan.local", {
      inbound: { app: backend.url },
      outbound: { enabled: false },
    });
    const gw = await sidecar(t, p, "gateway.ashchan.local", {
      inbound: { enabled: false },
      outbound: { peerProtocol, resolve: { "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}` } },
    });
    t.equal((await viaProxy(gw.outboundPort, "http://auth.ashchan.local/before")).status, 200);
    t.match(gw.logs.events("mtls_handshake_complete")[0], { alpn }, `an ${what} connection`);

    await p.ca.revoke("gateway.ashchan.local");
    t.ok(
      await eventually(
        async () => sample(await auth.metrics(), "mtls_revoked_connections", { direction: "inbound" }) >= 1,
        10_000,
      ),
      "auth closed the open connection of the revoked caller",
    );
    for (const path of ["/after-1", "/after-2"]) {
      const r = await viaProxy(gw.outboundPort, `http://auth.ashchan.local${path}`);
      t.equal(r.status, 502, `${path}: 502`);
      t.equal(r.headers["x-ashmesh-error"], "peer_unavailable");
      t.match(r.body, /closed the connection \(its sidecar may refuse our certificate/);
    }
    t.same(
      backend.seen.map((s) => s.url),
      ["/before"],
      "nothing after the revocation reached the app",
    );
    t.ok(
      sample(await auth.metrics(), "mtls_handshake_failures", { direction: "inbound", reason: "revoked" }) >= 1,
      "auth refused the new handshakes as revoked",
    );
  });
