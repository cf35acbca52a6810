// Hostile inputs, class outbound: what the local app (or anything on the host's loopback) can ask
// of the forward proxy, and what a server pretending to be a peer can present. Each row states
// the answer; a refused destination opens no connection at all (a trap server counts them).
import type net from "node:net";
import tls from "node:tls";
import t from "tap";
import { hasOpenssl } from "./lib/certs.js";
import { oddCertificate, statusLine, tcpExchange } from "./lib/hostile.js";
import { app, pki, sample, sidecar } from "./lib/mesh.js";
import { countingServer } from "./lib/tcp.js";

t.test("the forward proxy reaches destinations only", async (t) => {
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
      destinations: ["*.ashchan.local"],
      resolve: { "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}`, "example.com": trapAt, localhost: trapAt },
    },
  });
  const adminPort = new URL(gw.adminUrl).port;
  const rows: Array<{ input: string; head: string; status: number; code: string }> = [
    {
      input: "a mesh destination (control row)",
      head: "GET http://auth.ashchan.local/ HTTP/1.1",
      status: 200,
      code: "",
    },
    {
      input: "a host outside the mesh",
      head: "GET http://example.com/ HTTP/1.1",
      status: 403,
      code: "destination_not_allowed",
    },
    { input: "an IP literal", head: `GET http://${trapAt}/ HTTP/1.1`, status: 403, code: "destination_not_allowed" },
    { input: "localhost", head: "GET http://localhost/ HTTP/1.1", status: 403, code: "destination_not_allowed" },
    {
      input: "the sidecar's own admin port",
      head: `GET http://127.0.0.1:${adminPort}/metrics HTTP/1.1`,
      status: 403,
      code: "destination_not_allowed",
    },
    {
      input: "a mesh name as a prefix of another domain",
      head: "GET http://auth.ashchan.local.example.com/ HTTP/1.1",
      status: 403,
      code: "destination_not_allowed",
    },
    {
      input: "two labels under the wildcard",
      head: "GET http://a.auth.ashchan.local/ HTTP/1.1",
      status: 403,
      code: "destination_not_allowed",
    },
    {
      input: "credentials in the URL",
      head: "GET http://user:pw@auth.ashchan.local/ HTTP/1.1",
      status: 400,
      code: "bad_request",
    },
    { input: "an https:// target", head: "GET https://auth.ashchan.local/ HTTP/1.1", status: 400, code: "bad_request" },
    {
      input: "CONNECT to a mesh name (tunnels)",
      head: "CONNECT auth.ashchan.local:8443 HTTP/1.1",
      status: 200,
      code: "",
    },
    {
      input: "CONNECT to a host outside the mesh",
      head: "CONNECT example.com:443 HTTP/1.1",
      status: 403,
      code: "destination_not_allowed",
    },
    {
      input: "CONNECT to an IP literal",
      head: `CONNECT ${trapAt} HTTP/1.1`,
      status: 403,
      code: "destination_not_allowed",
    },
    {
      input: "CONNECT to localhost",
      head: "CONNECT localhost:80 HTTP/1.1",
      status: 403,
      code: "destination_not_allowed",
    },
    {
      input: "CONNECT to the admin port",
      head: `CONNECT 127.0.0.1:${adminPort} HTTP/1.1`,
      status: 403,
      code: "destination_not_allowed",
    },
    {
      input: "CONNECT with credentials",
      head: "CONNECT user:pw@auth.ashchan.local:8443 HTTP/1.1",
      status: 400,
      code: "bad_request",
    },
  ];
  for (const row of rows) {
    const host =
      row.head
        .split(" ")[1]
        ?.replace(/^https?:\/\//, "")
        .split("/")[0] ?? "x";
    const r = await tcpExchange(gw.outboundPort, `${row.head}\r\nHost: ${host}\r\nConnection: close\r\n\r\n`, {
      ms: 2_000, // a CONNECT tunnel stays open: its first line is all this row needs
    });
    t.match(statusLine(r.data), new RegExp(`^HTTP/1\\.1 ${row.status} `), `${row.input}: ${row.status}`);
    if (row.code) t.match(r.data, new RegExp(`x-ashmesh-error: ${row.code}`), `${row.input}: ${row.code}`);
  }
  t.equal(trap.connections, 0, "no refused destination was ever connected to");
});

t.test("servers that present what a peer must not", { skip: !hasOpenssl && "no openssl" }, async (t) => {
  const p = await pki(t);
  const ca = p.read(p.trust.ca);
  // A TLS server that asks for our certificate and presents an odd one of its own.
  const impostor = async (creds: { cert: Buffer; key: Buffer }) => {
    const server = tls.createServer({ ...creds, ca, requestCert: true, ciphers: "DEFAULT@SECLEVEL=0" }, (s) =>
      s.end("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"),
    );
    server.on("tlsClientError", () => undefined);
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    t.teardown(() => server.close());
    return `127.0.0.1:${(server.address() as net.AddressInfo).port}`;
  };
  const rows: Array<{
    input: string;
    creds: () => Promise<{ cert: Buffer; key: Buffer }>;
    code: string;
    reason: string;
  }> = [
    {
      input: "a CA certificate (CA:TRUE) naming auth",
      creds: () => oddCertificate(p, { subject: "/CN=auth.ashchan.local", san: "DNS:auth.ashchan.local", ca: true }),
      code: "peer_tls_failed",
      reason: "bad_certificate",
    },
    {
      input: "an RSA-1024 certificate naming auth",
      creds: () =>
        oddCertificate(p, { subject: "/CN=auth.ashchan.local", san: "DNS:auth.ashchan.local", rsaBits: 1024 }),
      code: "peer_tls_failed",
      reason: "bad_certificate",
    },
    {
      input: "CN auth.ashchan.local with another DNS SAN",
      creds: () => oddCertificate(p, { subject: "/CN=auth.ashchan.local", san: "DNS:evil.ashchan.local" }),
      code: "peer_identity_mismatch",
      reason: "bad_san",
    },
    {
      input: "CN auth.ashchan.local and no SAN (outbound wants the SAN)",
      creds: () => oddCertificate(p, { subject: "/CN=auth.ashchan.local", san: null }),
      code: "peer_identity_mismatch",
      reason: "bad_san",
    },
  ];
  for (const row of rows) {
    const at = await impostor(await row.creds());
    const gw = await sidecar(t, p, "gateway.ashchan.local", {
      inbound: { enabled: false },
      outbound: { destinations: ["auth.ashchan.local"], resolve: { "auth.ashchan.local": at } },
    });
    const r = await tcpExchange(
      gw.outboundPort,
      "GET http://auth.ashchan.local/ HTTP/1.1\r\nHost: auth.ashchan.local\r\nConnection: close\r\n\r\n",
    );
    t.match(statusLine(r.data), /^HTTP\/1\.1 502 /, `${row.input}: 502`);
    t.match(r.data, new RegExp(`x-ashmesh-error: ${row.code}`), `${row.input}: ${row.code}`);
    t.equal(
      sample(await gw.metrics(), "mtls_handshake_failures", { direction: "outbound", reason: row.reason }),
      1,
      `${row.input}: counted as ${row.reason}`,
    );
    await gw.sidecar.stop();
  }
});
