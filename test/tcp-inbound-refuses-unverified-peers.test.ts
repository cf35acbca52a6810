// A tcp.inbound passes nothing to its target from a peer it does not accept: no client
// certificate, another CA's, an expired or revoked one, plain TCP, a trusted identity that is not
// on `allow`, or anyone at all on a listener whose `allow` is []. The target never even sees a TCP
// connection: a counting server says so, and so does a real redis-server's
// total_connections_received. Each refusal is counted and logged with the listener's name.
import net from "node:net";
import t from "tap";
import { DevCa } from "../certs-dev/store.js";
import { pki, rawTls, sample, sidecar } from "./lib/mesh.js";
import { countingServer, redisInfo, redisSkip, startRedis, tlsSendAndEnd } from "./lib/tcp.js";

const PING = "*1\r\n$4\r\nPING\r\n";

t.test("refused peers never reach the target", async (t) => {
  const p = await pki(t);
  await p.identity("boards.ashchan.local");
  await p.identity("search.ashchan.local");
  await p.identity("media.ashchan.local", { days: 1, notBefore: new Date(Date.now() - 3 * 86_400_000) });
  await p.identity("gone.ashchan.local");
  await p.ca.revoke("gone.ashchan.local");
  const stranger = await DevCa.init(`${p.dir}/other`, { commonName: "other-ca" });
  await stranger.issue("boards.ashchan.local");
  const target = await countingServer(t);
  const side = await sidecar(t, p, "redis.ashchan.local", {
    inbound: { enabled: false },
    outbound: { enabled: false },
    tcp: {
      inbound: [
        { name: "kv", listen: "127.0.0.1:0", target: target.target, allow: ["boards.ashchan.local"] },
        { name: "closed", listen: "127.0.0.1:0", target: target.target, allow: [] },
      ],
    },
  });
  const kv = side.tcpPorts.kv as number;
  const ca = p.read(p.trust.ca);
  const creds = (files: { cert: string; key: string }) => ({ cert: p.read(files.cert), key: p.read(files.key), ca });
  const tlsOf = (options: Record<string, unknown>) => ({ ...options, servername: "redis.ashchan.local" });

  const handshakeRefusals = [
    { name: "no client certificate", options: { ca }, reason: "no_client_cert" },
    {
      name: "a certificate from another CA",
      options: creds(stranger.identityFiles("boards.ashchan.local")),
      reason: "unknown_ca",
    },
    { name: "an expired certificate", options: creds(p.files("media.ashchan.local")), reason: "expired" },
    { name: "a revoked certificate", options: creds(p.files("gone.ashchan.local")), reason: "revoked" },
  ];
  for (const c of handshakeRefusals) {
    const r = await rawTls(kv, tlsOf(c.options), PING);
    t.equal(r.data, "", `${c.name}: not one byte back`);
    t.ok(
      side.logs.events("mtls_handshake_failed").some((l) => l.reason === c.reason && l.listener === "kv"),
      `${c.name}: logged as ${c.reason} with listener kv`,
    );
  }

  // Plain TCP on the mTLS port: closed before TLS, nothing forwarded.
  const plain = await new Promise<string>((resolve) => {
    let data = "";
    const s = net.connect(kv, "127.0.0.1", () => s.write(PING));
    s.on("data", (d: Buffer) => {
      data += d.toString("latin1");
    });
    s.on("error", () => undefined);
    s.on("close", () => resolve(data));
  });
  t.equal(plain, "", "plain TCP: nothing back");

  // Trusted identities that the listener's allow-list does not name.
  const search = await rawTls(kv, tlsOf(creds(p.files("search.ashchan.local"))), PING);
  t.ok(search.handshake, "search's certificate verifies (TLS 1.3: the handshake completes)");
  t.equal(search.data, "", "search is not on kv's allow-list: not one byte back");
  const nobody = await rawTls(side.tcpPorts.closed as number, tlsOf(creds(p.files("boards.ashchan.local"))), PING);
  t.equal(nobody.data, "", "allow: [] lets nobody through, boards included");

  t.equal(target.connections, 0, "the target never saw a TCP connection");
  t.equal(target.bytes, 0, "nor a byte");

  const metrics = await side.metrics();
  for (const c of handshakeRefusals) {
    t.equal(sample(metrics, "mtls_handshake_failures", { direction: "inbound", reason: c.reason }), 1, c.reason);
  }
  t.equal(sample(metrics, "mtls_handshake_failures", { direction: "inbound", reason: "not_tls" }), 1, "not_tls");
  t.equal(sample(metrics, "mtls_authz_denied_total", { identity: "search.ashchan.local", route: "kv" }), 1);
  t.equal(sample(metrics, "mtls_authz_denied_total", { identity: "boards.ashchan.local", route: "closed" }), 1);
  t.equal(
    sample(metrics, "mtls_requests_total", {
      direction: "inbound",
      peer: "search.ashchan.local",
      code: "403",
      protocol: "tcp",
    }),
    1,
    "the refused tunnel counts as a 403 in the request series",
  );
  t.match(
    side.logs.events("authz_denied"),
    [
      { listener: "kv", identity: "search.ashchan.local", route: "kv", reason: "not_allowed" },
      { listener: "closed", identity: "boards.ashchan.local", route: "closed" },
    ],
    "one authz_denied line per refused tunnel, naming the listener",
  );
  t.equal(sample(metrics, "mtls_open_connections", { direction: "inbound", protocol: "tcp" }), 0);

  // The same listener carries an allowed peer: the refusals above are the peers', not a broken listener.
  const ok = await tlsSendAndEnd(kv, tlsOf(creds(p.files("boards.ashchan.local"))), PING);
  t.equal(ok.data.toString("latin1"), PING, "boards (allowed) gets its bytes echoed by the target");
  t.equal(target.connections, 1, "and that is the target's first connection");
});

t.test("a real redis-server sees no connection from refused peers", { skip: redisSkip }, async (t) => {
  const p = await pki(t);
  await p.identity("search.ashchan.local");
  await p.identity("boards.ashchan.local");
  const stranger = await DevCa.init(`${p.dir}/other`, { commonName: "other-ca" });
  await stranger.issue("boards.ashchan.local");
  const redis = await startRedis(t);
  const side = await sidecar(t, p, "redis.ashchan.local", {
    inbound: { enabled: false },
    outbound: { enabled: false },
    tcp: {
      inbound: [
        { name: "redis", listen: "127.0.0.1:0", target: `127.0.0.1:${redis.port}`, allow: ["boards.ashchan.local"] },
      ],
    },
  });
  const port = side.tcpPorts.redis as number;
  const ca = p.read(p.trust.ca);
  const creds = (files: { cert: string; key: string }) => ({
    cert: p.read(files.cert),
    key: p.read(files.key),
    ca,
    servername: "redis.ashchan.local",
  });
  // Each INFO is itself a connection: the second one counts exactly one more.
  const before = await redisInfo(redis.port, "total_connections_received");
  for (const options of [
    { ca, servername: "redis.ashchan.local" },
    creds(stranger.identityFiles("boards.ashchan.local")),
    creds(p.files("search.ashchan.local")),
  ]) {
    t.equal((await rawTls(port, options, PING)).data, "", "refused: nothing back");
  }
  t.equal(
    await redisInfo(redis.port, "total_connections_received"),
    before + 1,
    "redis-server accepted no connection but our own INFO",
  );
  const allowed = await rawTls(port, creds(p.files("boards.ashchan.local")), `${PING}*1\r\n$4\r\nQUIT\r\n`);
  t.equal(allowed.data, "+PONG\r\n+OK\r\n", "boards (allowed) reaches redis-server");
});
