// Outbound resumes TLS sessions, so a new connection to a known peer skips the full handshake.
// A resumed session carries no server certificate on the client side (nodejs/node#35317): it is
// trusted because only sessions of servers that passed the full check are cached. A refused
// server gets that full check on every attempt.
import t from "tap";
import { app, eventually, pki, sample, sidecar, viaProxy } from "./lib/mesh.js";

t.test("new connections to a verified peer resume; a refused peer is checked in full every time", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url },
    outbound: { enabled: false },
    limits: { idleTimeoutMs: 100 }, // auth closes idle connections quickly: each call needs a new one
  });
  const gw = await sidecar(t, p, "gateway.ashchan.local", {
    inbound: { enabled: false },
    outbound: {
      resolve: {
        "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}`,
        // boards' name points at auth's sidecar: a server that must be refused, every time
        "boards.ashchan.local": `127.0.0.1:${auth.inboundPort}`,
      },
    },
  });
  for (let i = 0; i < 3; i++) {
    t.equal((await viaProxy(gw.outboundPort, "http://auth.ashchan.local/")).status, 200);
    // Past auth's idle timeout, so that the next call needs a new connection: wait until gateway saw it close.
    await eventually(
      async () => sample(await gw.metrics(), "mtls_open_connections", { direction: "outbound" }) === 0,
      10_000,
    );
  }
  const handshakes = gw.logs.events("mtls_handshake_complete").map((l) => l.resumed);
  t.same(handshakes, [false, true, true], "the first connection is a full handshake, the next ones resume");
  t.same(
    auth.logs.events("mtls_handshake_complete").map((l) => l.resumed),
    [false, true, true],
    "the server agrees",
  );

  for (let i = 0; i < 3; i++) {
    const res = await viaProxy(gw.outboundPort, "http://boards.ashchan.local/");
    t.equal(res.status, 502, "refused on every attempt");
    t.equal(res.headers["x-ashmesh-error"], "peer_identity_mismatch");
  }
  t.equal(
    sample(await gw.metrics(), "mtls_handshake_failures", { direction: "outbound", reason: "bad_san" }),
    3,
    "three full checks",
  );
  t.equal(backend.seen.length, 3, "only the verified calls reached the app");
});
