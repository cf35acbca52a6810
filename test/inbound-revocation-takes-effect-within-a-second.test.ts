// A client revoked by a new CRL: within a second of the CRL write it is refused, it cannot
// resume a session it made earlier (ticket keys rotate on trust changes), and the keep-alive
// connection it already had is closed (a new secure context alone would leave it open).
import tls from "node:tls";
import t from "tap";
import { Client } from "undici";
import { app, eventually, GET, pki, rawTls, sample, sidecar, sleep } from "./lib/mesh.js";

t.test("revocation: refused, not resumed, connection closed", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const boards = await p.identity("boards.ashchan.local");
  const gw = await p.identity("gateway.ashchan.local");
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url },
    outbound: { enabled: false },
  });
  const ca = p.read(p.trust.ca);
  const boardsCreds = { cert: p.read(boards.cert), key: p.read(boards.key), ca, servername: "auth.ashchan.local" };

  // 1. A session to resume later, and a keep-alive connection that stays open.
  const session = await new Promise<Buffer>((resolve, reject) => {
    const s = tls.connect({ host: "127.0.0.1", port: auth.inboundPort, ...boardsCreds });
    s.once("session", (ticket: Buffer) => {
      resolve(ticket);
      s.end();
    });
    s.on("secureConnect", () => s.write(GET));
    s.on("data", () => undefined);
    s.on("error", reject);
  });
  const resumedBefore = await rawTls(auth.inboundPort, { ...boardsCreds, session }, GET);
  t.match(resumedBefore.data, /^HTTP\/1\.1 200/, "before revocation the session resumes and works");
  t.equal(auth.logs.events("mtls_handshake_complete").at(-1)?.resumed, true, "it was a resumed session");

  let closedByServer = false;
  const keepAlive = new Client(`https://127.0.0.1:${auth.inboundPort}`, { connect: boardsCreds });
  keepAlive.on("disconnect", () => {
    closedByServer = true;
  });
  t.teardown(() => keepAlive.destroy());
  const first = await keepAlive.request({ path: "/before", method: "GET" });
  t.equal(first.statusCode, 200);
  await first.body.dump();
  const seenBefore = backend.seen.length;

  // 2. Revoke; the sidecar sees the CRL file change by itself.
  const revokedAt = Date.now();
  await p.ca.revoke("boards.ashchan.local");
  t.ok(await eventually(() => closedByServer, 1_000), "the open connection is closed within a second");
  const closedAfterMs = Date.now() - revokedAt;
  t.ok(closedAfterMs < 1_000, `closed ${closedAfterMs} ms after the CRL write`);

  // 3. A new handshake is refused, and so is an attempt to resume the earlier session.
  const fresh = await rawTls(auth.inboundPort, boardsCreds, GET);
  t.equal(fresh.data, "", "a new connection gets nothing");
  const resumed = await rawTls(auth.inboundPort, { ...boardsCreds, session }, GET);
  t.equal(resumed.data, "", "resuming the earlier session gets nothing");
  const refusals = auth.logs.events("mtls_handshake_failed").filter((l) => l.reason === "revoked");
  t.equal(refusals.length, 2, "both refused as revoked: the resumption fell back to a full handshake");
  t.equal(backend.seen.length, seenBefore, "nothing more reached the app");

  const metrics = await auth.metrics();
  t.equal(
    sample(metrics, "mtls_revoked_connections", { direction: "inbound" }),
    3,
    "one closed connection and two refusals",
  );
  t.ok(auth.logs.events("mtls_connection_revoked").some((l) => l.identity === "boards.ashchan.local"));

  // Others are unaffected, and may still resume: only a trust change rotates ticket keys.
  const gwCreds = { cert: p.read(gw.cert), key: p.read(gw.key), ca, servername: "auth.ashchan.local" };
  t.match((await rawTls(auth.inboundPort, gwCreds, GET)).data, /^HTTP\/1\.1 200/);
  await sleep(10);
});

t.test("a plain certificate rotation keeps ticket keys: clients still resume", async (t) => {
  const p = await pki(t);
  const gw = await p.identity("gateway.ashchan.local");
  const auth = await sidecar(t, p, "auth.ashchan.local", { outbound: { enabled: false } });
  const creds = {
    cert: p.read(gw.cert),
    key: p.read(gw.key),
    ca: p.read(p.trust.ca),
    servername: "auth.ashchan.local",
  };
  const session = await new Promise<Buffer>((resolve) => {
    const s = tls.connect({ host: "127.0.0.1", port: auth.inboundPort, ...creds });
    s.once("session", (ticket: Buffer) => {
      resolve(ticket);
      s.end();
    });
    s.on("data", () => undefined);
    s.on("secureConnect", () => s.write(GET));
  });
  await p.ca.issue("auth.ashchan.local", { replace: true });
  await auth.sidecar.reload("test");
  await rawTls(auth.inboundPort, { ...creds, session }, GET);
  t.equal(auth.logs.events("mtls_handshake_complete").at(-1)?.resumed, true);
});
