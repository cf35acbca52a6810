// Hostile inputs, class TLS: what a client can present at the inbound listener, and what it gets.
// Each row states the expected answer; "refused" means not one byte of HTTP back, nothing at the
// app, and the handshake counted under the reason given.
import net from "node:net";
import t from "tap";
import { hasOpenssl } from "./lib/certs.js";
import { clientHello, oddCertificate, tcpExchange } from "./lib/hostile.js";
import { app, eventually, GET, pki, rawTls, sample, sidecar } from "./lib/mesh.js";

const CALLER = "gateway.ashchan.local";

t.test("client certificates: what each presents, what it gets", { skip: !hasOpenssl && "no openssl" }, async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url, allow: [CALLER] },
    outbound: { enabled: false },
  });
  const ca = p.read(p.trust.ca);
  const good = p.files(await p.identity(CALLER).then(() => CALLER));
  const rows: Array<{
    input: string;
    creds: () => Promise<{ cert?: Buffer; key?: Buffer; maxVersion?: "TLSv1.2"; ciphers?: string }>;
    expect: { status: string } | { refused: string };
  }> = [
    {
      input: "the caller's own certificate",
      creds: async () => ({ cert: p.read(good.cert), key: p.read(good.key) }),
      expect: { status: "HTTP/1.1 200" },
    },
    {
      input: "a CA certificate (CA:TRUE) of the mesh CA naming the caller",
      creds: () => oddCertificate(p, { subject: `/CN=${CALLER}`, san: `DNS:${CALLER}`, ca: true }),
      expect: { refused: "bad_certificate" },
    },
    {
      input: "an RSA-1024 certificate of the mesh CA naming the caller",
      // The client's own OpenSSL would refuse to send so small a key at its default level.
      creds: async () => ({
        ...(await oddCertificate(p, { subject: `/CN=${CALLER}`, san: `DNS:${CALLER}`, rsaBits: 1024 })),
        ciphers: "DEFAULT@SECLEVEL=0",
      }),
      expect: { refused: "bad_certificate" },
    },
    {
      input: "a certificate for servers only (EKU serverAuth) naming the caller",
      creds: () =>
        oddCertificate(p, { subject: `/CN=${CALLER}`, san: `DNS:${CALLER}`, extendedKeyUsage: "serverAuth" }),
      expect: { refused: "bad_certificate" },
    },
    {
      input: "CN gateway.ashchan.local with DNS SAN evil.ashchan.local",
      creds: () => oddCertificate(p, { subject: `/CN=${CALLER}`, san: "DNS:evil.ashchan.local" }),
      expect: { status: "HTTP/1.1 403" },
    },
    {
      input: "CN gateway.ashchan.local with only a URI SAN",
      creds: () => oddCertificate(p, { subject: `/CN=${CALLER}`, san: "URI:spiffe://ashchan.local/evil" }),
      expect: { status: "HTTP/1.1 403" },
    },
    {
      input: "CN gateway.ashchan.local and no SAN at all (the CN names it)",
      creds: () => oddCertificate(p, { subject: `/CN=${CALLER}`, san: null }),
      expect: { status: "HTTP/1.1 200" },
    },
    { input: "no certificate", creds: async () => ({}), expect: { refused: "no_client_cert" } },
    {
      input: "TLS 1.2 with the caller's certificate",
      creds: async () => ({ cert: p.read(good.cert), key: p.read(good.key), maxVersion: "TLSv1.2" }),
      expect: { refused: "protocol" },
    },
  ];
  for (const row of rows) {
    const before = { seen: backend.seen.length, metrics: await auth.metrics() };
    const creds = await row.creds();
    const r = await rawTls(auth.inboundPort, { ca, servername: "auth.ashchan.local", ...creds }, GET);
    if ("status" in row.expect) {
      t.match(r.data, new RegExp(`^${row.expect.status}`), `${row.input}: ${row.expect.status}`);
      continue;
    }
    const reason = row.expect.refused;
    t.equal(r.data, "", `${row.input}: refused, not one byte of HTTP`);
    t.equal(backend.seen.length, before.seen, `${row.input}: nothing reached the app`);
    const counted = await eventually(
      async () =>
        sample(await auth.metrics(), "mtls_handshake_failures", { direction: "inbound", reason }) ===
        sample(before.metrics, "mtls_handshake_failures", { direction: "inbound", reason }) + 1,
      10_000,
    );
    t.ok(counted, `${row.input}: counted as mtls_handshake_failures{reason="${reason}"}`, {
      failures: auth.logs.events("mtls_handshake_failed").slice(-2),
    });
  }
  // The 403s name the SAN identity, never the CN that the certificate also carries.
  const denied = auth.logs.events("authz_denied").map((l) => l.identity);
  t.same(denied, ["evil.ashchan.local", "spiffe://ashchan.local/evil"], "the identity is the SAN, not the CN");
});

t.test("connections that are not mTLS handshakes", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url, allow: [CALLER] },
    outbound: { enabled: false },
  });
  const failures = async (reason: string) =>
    sample(await auth.metrics(), "mtls_handshake_failures", { direction: "inbound", reason });

  // Plain HTTP on the mTLS port: closed without an answer, counted and logged as not TLS.
  const plain = await tcpExchange(auth.inboundPort, GET);
  t.equal(plain.data, "", "plain HTTP: closed without an answer");
  t.ok(await eventually(async () => (await failures("not_tls")) === 1, 10_000), "counted as not_tls");
  t.match(auth.logs.events("mtls_handshake_failed").at(-1), { reason: "not_tls", detail: /plain HTTP/ });

  // A full ClientHello, then the client goes away (FIN, and RST): a handshake that failed, not a probe.
  const hello = await clientHello("auth.ashchan.local");
  for (const how of ["end", "reset"] as const) {
    const socket = net.connect(auth.inboundPort, "127.0.0.1");
    await new Promise<void>((resolve) => socket.once("connect", () => resolve()));
    socket.write(hello);
    // The server answers a ClientHello with its ServerHello: the handshake is under way.
    await new Promise<void>((resolve) => socket.once("data", () => resolve()));
    if (how === "end") socket.end();
    else socket.resetAndDestroy();
    socket.on("error", () => undefined);
  }
  t.ok(
    await eventually(async () => (await failures("aborted")) === 2, 10_000),
    "a ClientHello followed by FIN or RST counts as aborted (twice)",
    { failures: auth.logs.events("mtls_handshake_failed").slice(1) },
  );

  // A TCP connection that sends nothing and closes is a probe (health check, port scan): not counted.
  const before = await auth.metrics();
  const probe = net.connect(auth.inboundPort, "127.0.0.1");
  await new Promise<void>((resolve) => probe.once("connect", () => resolve()));
  probe.end();
  await new Promise<void>((resolve) => probe.once("close", () => resolve()));
  // The probe's close is seen by the sidecar before a second connection it accepts after it.
  await rawTls(auth.inboundPort, { servername: "auth.ashchan.local" }, GET);
  t.equal(
    sample(await auth.metrics(), "mtls_handshake_total", { direction: "inbound", result: "failed" }),
    sample(before, "mtls_handshake_total", { direction: "inbound", result: "failed" }) + 1,
    "only the second connection (no certificate) counted, not the probe",
  );
  t.equal(backend.seen.length, 0, "none of this reached the app");
});
