// Invariant 6: outbound verifies the server's certificate against the identity the request was
// meant for (and the SPKI pin, when set); a mismatch is a 502 that names it.
import { execFileSync } from "node:child_process";
import t from "tap";
import { DevCa } from "../certs-dev/store.js";
import { app, pki, sample, sidecar, viaProxy } from "./lib/mesh.js";

function pinOf(certFile: string): string {
  // curl's --pinnedpubkey recipe, with openssl: sha256 of the DER SubjectPublicKeyInfo.
  const spki = execFileSync("sh", [
    "-c",
    `openssl x509 -in '${certFile}' -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64`,
  ]);
  return `sha256//${spki.toString().trim()}`;
}

t.test(
  "the server must present the expected identity, chain to our CA, match the pin and not be revoked",
  async (t) => {
    const p = await pki(t);
    const backend = await app(t);
    const auth = await sidecar(t, p, "auth.ashchan.local", {
      inbound: { app: backend.url },
      outbound: { enabled: false },
    });
    const boards = await sidecar(t, p, "boards.ashchan.local", {
      inbound: { app: backend.url },
      outbound: { enabled: false },
    });
    const foreign = await DevCa.init(`${p.dir}/foreign`, { commonName: "foreign-ca" });
    await foreign.issue("search.ashchan.local");
    const foreignFiles = foreign.identityFiles("search.ashchan.local");
    const impostor = await sidecar(t, p, "moderation.ashchan.local", {
      // a sidecar of another CA claiming search.ashchan.local
      service: { dnsName: "search.ashchan.local" },
      tls: { cert: foreignFiles.cert, key: foreignFiles.key, ca: foreignFiles.ca, crl: foreignFiles.crl },
      inbound: { app: backend.url },
      outbound: { enabled: false },
    });
    const authPin = pinOf(p.files("auth.ashchan.local").cert);
    const gw = await sidecar(t, p, "gateway.ashchan.local", {
      inbound: { enabled: false },
      outbound: {
        resolve: {
          "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}`,
          // media's name points at boards' sidecar: a server with the wrong identity
          "media.ashchan.local": `127.0.0.1:${boards.inboundPort}`,
          "search.ashchan.local": `127.0.0.1:${impostor.inboundPort}`,
        },
        upstreams: {
          pinned: { listen: "127.0.0.1:0", target: "auth.ashchan.local:8443", pin: authPin },
          wrongpin: {
            listen: "127.0.0.1:0",
            target: "auth.ashchan.local:8443",
            pin: pinOf(p.files("boards.ashchan.local").cert),
          },
        },
      },
    });
    const status = gw.sidecar.status() as { listeners: { outbound: Array<{ name: string; address: string }> } };
    const portOf = (name: string) =>
      Number(
        status.listeners.outbound
          .find((l) => l.name === name)
          ?.address.split(":")
          .pop(),
      );

    const good = await viaProxy(gw.outboundPort, "http://auth.ashchan.local/api/v1/verify");
    t.equal(good.status, 200);

    const wrongName = await viaProxy(gw.outboundPort, "http://media.ashchan.local/api/v1/media/abc123");
    t.equal(wrongName.status, 502);
    t.equal(wrongName.headers["x-ashmesh-error"], "peer_identity_mismatch");
    t.match(
      JSON.parse(wrongName.body).message,
      /presented a certificate for boards\.ashchan\.local, not for media\.ashchan\.local/,
    );

    const otherCa = await viaProxy(gw.outboundPort, "http://search.ashchan.local/api/v1/index");
    t.equal(otherCa.status, 502);
    t.equal(otherCa.headers["x-ashmesh-error"], "peer_tls_failed");
    t.match(JSON.parse(otherCa.body).message, /unknown_ca/);

    const pinned = await viaProxy(portOf("upstream pinned"), "http://127.0.0.1/x");
    t.equal(pinned.status, 200, "the pin of auth's key matches");
    const wrongPin = await viaProxy(portOf("upstream wrongpin"), "http://127.0.0.1/x");
    t.equal(wrongPin.status, 502);
    t.equal(wrongPin.headers["x-ashmesh-error"], "peer_identity_mismatch");
    t.match(JSON.parse(wrongPin.body).message, /SPKI pin/);

    t.equal(backend.seen.length, 2, "only the two verified requests reached an app");
    const metrics = await gw.metrics();
    t.equal(sample(metrics, "mtls_handshake_failures", { direction: "outbound", reason: "bad_san" }), 1);
    t.equal(sample(metrics, "mtls_handshake_failures", { direction: "outbound", reason: "unknown_ca" }), 1);
    t.equal(sample(metrics, "mtls_handshake_failures", { direction: "outbound", reason: "bad_pin" }), 1);
    t.equal(
      sample(metrics, "mtls_requests_total", { direction: "outbound", peer: "media.ashchan.local", code: "502" }),
      1,
    );

    // Revocation of the server: the caller's CRL names auth's certificate.
    await p.ca.revoke("auth.ashchan.local");
    await gw.sidecar.reload("test");
    const revoked = await viaProxy(gw.outboundPort, "http://auth.ashchan.local/api/v1/verify");
    t.equal(revoked.status, 502);
    t.equal(revoked.headers["x-ashmesh-error"], "peer_revoked");
    t.equal(sample(await gw.metrics(), "mtls_revoked_connections", { direction: "outbound" }), 1);
  },
);
