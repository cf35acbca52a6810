// The CA roll end to end: two sidecars on real sockets, a steady 20 requests a second from the
// caller's app through its forward proxy to the callee, and the three phases run by the real
// `ashmesh certs rotate ca` command, each followed by the wait the procedure prescribes (every
// sidecar's /status shows the new state). Not one request may fail, and at the end new
// handshakes must chain to the new CA only.
import { readFileSync } from "node:fs";
import tls from "node:tls";
import t, { type Test } from "tap";
import { Client, request } from "undici";
import { DevCa } from "../certs-dev/store.js";
import { certsCli } from "./lib/certs.js";
import {
  app,
  eventually,
  GET,
  pki,
  type RunningSidecar,
  rawTls,
  sample,
  sidecar,
  sleep,
  viaProxy,
} from "./lib/mesh.js";

interface Status {
  identity: {
    server: { issuer: string; serial: string };
    ca: Array<{ serial: string }>;
    crl: Array<{ issuer: string }>;
  };
}

async function status(s: RunningSidecar): Promise<Status> {
  return (await (await request(`${s.adminUrl}/status`)).body.json()) as Status;
}

/** The operator's wait: poll every sidecar's /status (as `curl ADMIN/status` would) until `ok`. */
async function everySidecar(sidecars: RunningSidecar[], ok: (s: Status) => boolean): Promise<boolean> {
  return eventually(async () => (await Promise.all(sidecars.map(status))).every(ok), 10_000);
}

/** Connects to `port` presenting `client`, trusting only `ca`; resolves with the verify outcome. */
function handshake(port: number, ca: Buffer, client: { cert: Buffer; key: Buffer }): Promise<string> {
  return new Promise((resolve) => {
    const socket = tls.connect(
      { host: "127.0.0.1", port, servername: "auth.ashchan.local", ca, ...client, rejectUnauthorized: true },
      () => {
        const issuer = socket.getPeerX509Certificate()?.issuer ?? "";
        socket.end();
        resolve(`ok ${issuer.replaceAll("\n", ",")}`);
      },
    );
    socket.setTimeout(5_000, () => socket.destroy(new Error("timeout")));
    socket.on("error", (err: NodeJS.ErrnoException) => resolve(`error ${err.code ?? err.message}`));
  });
}

async function roll(t: Test, options: { crl: boolean; peerProtocol?: "match" | "h2" }) {
  const p = await pki(t);
  const backend = await app(t);
  const tlsOverride = options.crl ? {} : { crl: null };
  const callee = await sidecar(t, p, "auth.ashchan.local", {
    tls: tlsOverride,
    inbound: { app: backend.url, allow: ["gateway.ashchan.local"] },
    outbound: { enabled: false },
  });
  const caller = await sidecar(t, p, "gateway.ashchan.local", {
    tls: tlsOverride,
    inbound: { enabled: false },
    outbound: {
      peerProtocol: options.peerProtocol ?? "match",
      resolve: { "auth.ashchan.local": `127.0.0.1:${callee.inboundPort}` },
    },
  });
  const both = [callee, caller];
  const oldCa = p.ca.active;
  const oldCaPem = readFileSync(DevCa.paths(p.dir).caCert);
  const gatewayFiles = p.files("gateway.ashchan.local");
  const oldGateway = { cert: readFileSync(gatewayFiles.cert), key: readFileSync(gatewayFiles.key) };
  // A keep-alive connection made with the old CA's certificate: once that CA is no longer
  // trusted (finish), the callee must close it rather than serve it forever.
  let oldConnectionClosed = false;
  const oldConnection = new Client(`https://127.0.0.1:${callee.inboundPort}`, {
    connect: { ...oldGateway, ca: oldCaPem, servername: "auth.ashchan.local" },
  });
  oldConnection.on("disconnect", () => {
    oldConnectionClosed = true;
  });
  t.teardown(() => oldConnection.destroy());
  const first = await oldConnection.request({ path: "/old-connection", method: "GET" });
  t.equal(first.statusCode, 200, "a connection with the old CA's certificate works before the roll");
  await first.body.dump();

  // 20 requests a second, each on its own connection to the forward proxy (as an app with
  // HTTP_PROXY and no keep-alive), bounded to 40 s and 800 requests.
  const outcome = { ok: 0, failed: [] as string[] };
  let running = true;
  const traffic = (async () => {
    const inFlight = new Set<Promise<void>>();
    const end = Date.now() + 40_000;
    for (let i = 0; running && i < 800 && Date.now() < end; i++) {
      const sent = viaProxy(caller.outboundPort, `http://auth.ashchan.local/api/v1/verify?n=${i}`, {
        method: "POST",
        body: "{}",
      }).then(
        (r) => {
          if (r.status === 200) outcome.ok++;
          else outcome.failed.push(`#${i}: ${r.status} ${r.body.slice(0, 200)}`);
        },
        (err: Error) => {
          outcome.failed.push(`#${i}: ${err.message}`);
        },
      );
      inFlight.add(sent);
      void sent.finally(() => inFlight.delete(sent));
      await sleep(50);
    }
    await Promise.all(inFlight);
  })();
  const steady = async (label: string) => {
    const before = outcome.ok;
    await sleep(600);
    // On a slow machine no request may have finished in those 600 ms: wait for one, not for a time.
    t.ok(await eventually(() => outcome.ok > before, 10_000), `${label}: requests keep succeeding`);
  };

  await steady("before the roll");

  const begin = await certsCli(["rotate", "ca", "--phase", "begin", "--dir", p.dir]);
  t.equal(begin.code, 0, `begin: ${begin.err}`);
  const newCa = DevCa.open(p.dir).cas.find((c) => c.status === "next");
  t.ok(newCa, "begin made a next CA");
  const newSerial = newCa?.serial ?? "";
  t.ok(
    await everySidecar(both, (s) => s.identity.ca.map((c) => c.serial).join() === [oldCa.serial, newSerial].join()),
    "every sidecar trusts both CAs",
  );
  await steady("after begin");

  const sw = await certsCli(["rotate", "ca", "--phase", "switch", "--dir", p.dir]);
  t.equal(sw.code, 0, `switch: ${sw.err}`);
  t.match(sw.out, /reissued auth\.ashchan\.local/);
  t.match(sw.out, /reissued gateway\.ashchan\.local/);
  const newSubject = newCa?.subject ?? "";
  const current = (name: string) => DevCa.open(p.dir).latest(name)?.serial;
  t.ok(
    await everySidecar(
      both,
      (s) =>
        s.identity.server.issuer === newSubject &&
        [current("auth.ashchan.local"), current("gateway.ashchan.local")].includes(s.identity.server.serial),
    ),
    "every sidecar presents a certificate of the new CA",
  );
  await steady("after switch");

  const finish = await certsCli(["rotate", "ca", "--phase", "finish", "--dir", p.dir]);
  t.equal(finish.code, 0, `finish: ${finish.err}`);
  t.ok(
    await everySidecar(both, (s) => s.identity.ca.map((c) => c.serial).join() === newSerial),
    "every sidecar trusts the new CA only",
  );
  await steady("after finish");
  t.ok(
    await eventually(() => oldConnectionClosed, 2_000),
    "the old CA's open connection was closed once it was no longer trusted",
  );
  t.ok(callee.logs.events("mtls_connection_untrusted").length >= 1, "and that was logged");

  running = false;
  await traffic;
  t.same(outcome.failed, [], "not one request failed");
  t.ok(outcome.ok >= 40, `requests flowed throughout (${outcome.ok})`);
  t.equal(backend.seen.length, outcome.ok + 1, "each of them reached the app once (plus the old connection's one)");
  const metrics = await callee.metrics();
  t.equal(
    sample(metrics, "mtls_handshake_total", { direction: "inbound", result: "failed" }),
    0,
    "no inbound handshake failed during the roll",
  );
  for (const s of both) {
    t.comment(
      `${s === callee ? "callee" : "caller"} reloads: ok ${sample(await s.metrics(), "mtls_cert_reloads_total", { result: "ok" })}, failed ${sample(await s.metrics(), "mtls_cert_reloads_total", { result: "failed" })}`,
    );
  }

  // New handshakes chain to the new CA only.
  const newCaPem = readFileSync(DevCa.paths(p.dir).caCert);
  const gatewayNow = { cert: readFileSync(gatewayFiles.cert), key: readFileSync(gatewayFiles.key) };
  t.match(
    await handshake(callee.inboundPort, newCaPem, gatewayNow),
    /^ok .*OU=generation 2/,
    "the callee's certificate verifies against the new CA alone",
  );
  t.match(await handshake(callee.inboundPort, oldCaPem, gatewayNow), /^error /, "and not against the old CA alone");
  const refused = await rawTls(
    callee.inboundPort,
    { ...oldGateway, ca: newCaPem, servername: "auth.ashchan.local" },
    GET,
  );
  t.equal(refused.data, "", "a client certificate of the old CA, still in its validity period, is refused");
  const accepted = await rawTls(
    callee.inboundPort,
    { ...gatewayNow, ca: newCaPem, servername: "auth.ashchan.local" },
    GET,
  );
  t.match(accepted.data, /^HTTP\/1\.1 200/, "a client certificate of the new CA is accepted");
  t.ok(
    callee.logs.events("mtls_handshake_failed").some((l) => l.reason === "unknown_ca"),
    "the old-CA client is logged as an unknown CA",
  );
}

// The deployment's configuration: CRL checks on, so trust/ca.crl holds one CRL per CA.
t.test("with CRLs: the CA rolls (begin, switch, finish) under steady traffic without one failed request", (t) =>
  roll(t, { crl: true }),
);

// The procedure itself, with the CRL out of the way: what the phases and waits guarantee.
t.test("without CRLs: the CA rolls under steady traffic without one failed request", (t) => roll(t, { crl: false }));

// Every request over one HTTP/2 session to the peer: the roll must refresh the session as it does the pool.
t.test("with CRLs, over HTTP/2 to the peer: the CA rolls under steady traffic without one failed request", (t) =>
  roll(t, { crl: true, peerProtocol: "h2" }),
);
