// Invariant 1: nothing reaches the app through inbound without a client certificate that chains
// to the configured CA, is inside its validity period and is not on the CRL — not one byte. Each
// refusal is counted under its reason and logged.
import t from "tap";
import { DevCa } from "../certs-dev/store.js";
import { app, GET, pki, rawTls, sample, sidecar } from "./lib/mesh.js";

t.test("refused clients never reach the app", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  await p.identity("gateway.ashchan.local");
  await p.identity("boards.ashchan.local");
  await p.identity("media.ashchan.local", { days: 1, notBefore: new Date(Date.now() - 3 * 86_400_000) });
  const stranger = await DevCa.init(`${p.dir}/other`, { commonName: "other-ca" });
  await stranger.issue("gateway.ashchan.local");
  await p.ca.revoke("boards.ashchan.local");
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url },
    outbound: { enabled: false },
  });

  const ca = p.read(p.trust.ca);
  const creds = (files: { cert: string; key: string }) => ({ cert: p.read(files.cert), key: p.read(files.key), ca });
  const cases = [
    { name: "no client certificate", options: { ca }, reason: "no_client_cert" },
    {
      name: "a certificate from another CA",
      options: creds(stranger.identityFiles("gateway.ashchan.local")),
      reason: "unknown_ca",
    },
    { name: "an expired certificate", options: creds(p.files("media.ashchan.local")), reason: "expired" },
    { name: "a revoked certificate", options: creds(p.files("boards.ashchan.local")), reason: "revoked" },
  ];
  for (const c of cases) {
    const result = await rawTls(auth.inboundPort, { ...c.options, servername: "auth.ashchan.local" }, GET);
    t.equal(result.data, "", `${c.name}: not one byte of an answer`);
    const line = auth.logs.events("mtls_handshake_failed").find((l) => l.reason === c.reason);
    t.ok(line, `${c.name}: logged with reason ${c.reason}`);
    t.type(line?.remote_addr, "string", "the log names the remote address");
  }
  t.equal(backend.connections, 0, "the app never saw a connection");
  t.same(backend.seen, [], "the app never saw a request");

  const metrics = await auth.metrics();
  for (const c of cases) {
    t.equal(
      sample(metrics, "mtls_handshake_failures", { direction: "inbound", reason: c.reason }),
      1,
      `counted: ${c.reason}`,
    );
  }
  t.equal(sample(metrics, "mtls_handshake_total", { direction: "inbound", result: "failed" }), cases.length);
  t.equal(
    sample(metrics, "mtls_revoked_connections", { direction: "inbound" }),
    1,
    "the revoked client is counted as such",
  );

  // The same sidecar serves a valid client: the refusals above are the certificate's, not a broken listener.
  const ok = await rawTls(
    auth.inboundPort,
    { ...creds(p.files("gateway.ashchan.local")), servername: "auth.ashchan.local" },
    GET,
  );
  t.match(ok.data, /^HTTP\/1\.1 200/);
  t.equal(backend.seen.length, 1);
  t.match(String(backend.seen[0]?.headers["x-forwarded-client-cert"]), /DNS=gateway\.ashchan\.local/);
});

t.test("a TCP connection that sends nothing is not counted as a failed handshake", async (t) => {
  const p = await pki(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", { outbound: { enabled: false } });
  const net = await import("node:net");
  await new Promise<void>((resolve) => {
    const s = net.connect(auth.inboundPort, "127.0.0.1", () => s.end());
    s.on("close", () => resolve());
  });
  await new Promise((r) => setTimeout(r, 100));
  t.equal(sample(await auth.metrics(), "mtls_handshake_total", { direction: "inbound", result: "failed" }), 0);
});
