// Invariant 2: TLS below the configured minimum (1.3 by default) and cipher suites outside the
// configured list are refused, counted with reason "protocol", and never reach the app.
import t from "tap";
import { app, GET, type Pki, pki, rawTls, sample, sidecar } from "./lib/mesh.js";

/** What the gateway presents when it calls auth: its certificate and key, the CA, auth's name. */
async function gatewayCredentials(p: Pki) {
  const gw = await p.identity("gateway.ashchan.local");
  return { cert: p.read(gw.cert), key: p.read(gw.key), ca: p.read(p.trust.ca), servername: "auth.ashchan.local" };
}

t.test("TLS 1.2 and unlisted TLS 1.3 suites are refused", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const creds = await gatewayCredentials(p);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url },
    outbound: { enabled: false },
  });

  const tls12 = await rawTls(auth.inboundPort, { ...creds, maxVersion: "TLSv1.2" }, GET);
  t.equal(tls12.handshake, false, "no TLS 1.2 handshake");
  t.match(String(tls12.error), /PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL|alert/i);

  const aes128 = await rawTls(auth.inboundPort, { ...creds, ciphers: "TLS_AES_128_GCM_SHA256" }, GET);
  t.equal(aes128.handshake, false, "no handshake with a suite outside tls.ciphers");

  const chacha = await rawTls(auth.inboundPort, { ...creds, ciphers: "TLS_CHACHA20_POLY1305_SHA256" }, GET);
  t.match(chacha.data, /^HTTP\/1\.1 200/, "a listed suite works");

  t.equal(backend.seen.length, 1, "only the listed suite reached the app");
  const metrics = await auth.metrics();
  t.equal(sample(metrics, "mtls_handshake_failures", { direction: "inbound", reason: "protocol" }), 2);
  const failed = auth.logs.events("mtls_handshake_failed");
  t.equal(failed.length, 2);
  t.ok(failed.every((l) => l.reason === "protocol" && typeof l.detail === "string"));
});

t.test("tls.ciphers narrows the suites", async (t) => {
  const p = await pki(t);
  const creds = await gatewayCredentials(p);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    tls: { ciphers: ["TLS_CHACHA20_POLY1305_SHA256"] },
    outbound: { enabled: false },
  });
  const aes256 = await rawTls(auth.inboundPort, { ...creds, ciphers: "TLS_AES_256_GCM_SHA384" }, GET);
  t.equal(aes256.handshake, false);
});
