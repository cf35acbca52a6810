// ACME against a real CA (Pebble): the sidecar orders its certificate at start, answering
// tls-alpn-01 on its own inbound port; renews once 70 % of the lifetime has passed (the clock is
// injected, so the test does not wait for it); while the CA is down it keeps the identity in use
// and retries with growing, jittered delays, then renews once the CA is back. A wrong directory
// URL, CA bundle or missing external account binding stops the start with exit code 2, naming
// the field; the EAB HMAC and the account key never appear in logs, /status or the state file.
import { X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t, { type Test } from "tap";
import { Agent, request } from "undici";
import { createCrl } from "../certs-dev/pki.js";
import { parseConfig } from "../config/load.js";
import { AcmeManager } from "../proxy/acme.js";
import { validateCrls } from "../proxy/identity.js";
import { Sidecar } from "../proxy/sidecar.js";
import { serialOf } from "../proxy/x509.js";
import { app, eventually, freePort, LogLines, pki, sample } from "./lib/mesh.js";
import { crlSigners, forwarder, infraCa, type Pebble, pebbleTool, startPebble } from "./lib/pebble.js";
import { ashmeshCli, run } from "./lib/run.js";
import { writeYaml } from "./lib/spawn.js";

const skip = pebbleTool.skip;
const NAME = "auth.ashchan.local";
const LIFETIME_S = 3_600;

interface Setup {
  pebble: Pebble;
  dir: string;
  tlsPort: number;
  /** tls.ca: Pebble's root, and the dev CA whose gateway certificate the test's client presents. */
  ca: string;
  client: { cert: Buffer; key: Buffer };
}

async function setup(t: Test, options: { eab?: Record<string, string> } = {}): Promise<Setup> {
  const infra = await infraCa(t);
  const tlsPort = await freePort();
  const pebble = await startPebble(t, infra, {
    tlsPort,
    validitySeconds: LIFETIME_S,
    ...(options.eab ? { eab: options.eab } : {}),
  });
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-acme-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const dev = await pki(t);
  const gateway = await dev.identity("gateway.ashchan.local");
  const ca = join(dir, "ca.crt");
  writeFileSync(ca, (await pebble.root()) + dev.read(dev.trust.ca).toString());
  return { pebble, dir, tlsPort, ca, client: { cert: dev.read(gateway.cert), key: dev.read(gateway.key) } };
}

function config(s: Setup, acme: Record<string, unknown> = {}, extra: Record<string, unknown> = {}) {
  return parseConfig(input(s, acme, extra));
}

/** The configuration as a file would hold it (`ashmesh check --config` reads it). */
function input(s: Setup, acme: Record<string, unknown> = {}, extra: Record<string, unknown> = {}) {
  return {
    service: { name: "auth-accounts", dnsName: NAME },
    tls: { cert: join(s.dir, "id", "server.crt"), key: join(s.dir, "id", "server.key"), ca: s.ca },
    inbound: {
      listen: `127.0.0.1:${s.tlsPort}`,
      app: (extra.app as string) ?? "http://127.0.0.1:9",
      allow: ["gateway.ashchan.local"],
    },
    outbound: { enabled: false },
    admin: { listen: "127.0.0.1:0" },
    acme: { directory: s.pebble.directory, caBundle: s.pebble.infra.bundle, ...acme },
    log: { level: "debug" },
  };
}

/** `ashmesh check --config` on the sidecar's configuration: exit code and output. */
async function check(s: Setup, acme: Record<string, unknown> = {}): Promise<{ code: number | null; out: string }> {
  const file = writeYaml(join(s.dir, `check-${Date.now()}.yaml`), input(s, acme));
  const r = await ashmeshCli(["check", "--config", file], { timeoutMs: 30_000 });
  return { code: r.code, out: r.out + r.err };
}

interface Running {
  sidecar: Sidecar;
  logs: LogLines;
  admin: string;
  /** The manager's clock: `now` when set, for the certificate `only` when set (the file holds it), else real time. */
  clock: { now: number | null; only?: string };
}

async function start(
  t: Test,
  s: Setup,
  acme: Record<string, unknown> = {},
  extra: Record<string, unknown> = {},
): Promise<Running> {
  if (!extra.app) extra.app = (await app(t)).url;
  const logs = new LogLines();
  const clock: Running["clock"] = { now: null };
  const certFile = join(s.dir, "id", "server.crt");
  const sidecar = await Sidecar.create(config(s, acme, extra), {
    logDestination: logs,
    processMetrics: false,
    // Time jumps for the certificate under test only: once a new one is on disk, time is real
    // again, so the renewal just made is not due at once.
    acme: {
      now: () =>
        clock.now !== null && (!clock.only || serialOfFile(certFile) === clock.only) ? clock.now : Date.now(),
      random: () => 0,
    },
  });
  t.teardown(() => sidecar.stop());
  const listening = await sidecar.start();
  return { sidecar, logs, admin: `http://127.0.0.1:${listening.admin?.port}`, clock };
}

/** A request over mTLS as gateway; the serial of the certificate the sidecar presented. */
async function call(s: Setup): Promise<{ status: number; serial: string }> {
  let serial = "";
  const dispatcher = new Agent({
    connect: {
      ca: await s.pebble.root(),
      ...s.client,
      servername: NAME,
      checkServerIdentity: (_host, cert) => {
        serial = cert.serialNumber.toLowerCase().replace(/^0+/, "");
        return undefined;
      },
    },
  });
  try {
    const r = await request(`https://127.0.0.1:${s.tlsPort}/hello`, { dispatcher });
    await r.body.dump();
    return { status: r.statusCode, serial };
  } finally {
    await dispatcher.close();
  }
}

/** The bytes of the first TLS record Node's client sends with `options`: a real ClientHello. */
async function captureClientHello(options: import("node:tls").ConnectionOptions): Promise<Buffer> {
  const net = await import("node:net");
  const tls = await import("node:tls");
  return new Promise((resolve, reject) => {
    const server = net.createServer((socket) => {
      socket.once("data", (chunk: Buffer) => {
        resolve(chunk);
        socket.destroy();
        server.close();
      });
    });
    server.listen(0, "127.0.0.1", () => {
      const client = tls.connect({
        host: "127.0.0.1",
        port: (server.address() as { port: number }).port,
        rejectUnauthorized: false,
        ...options,
      });
      client.on("error", () => client.destroy());
    });
    server.on("error", reject);
  });
}

/**
 * Sends `hello` in two TCP writes 50 ms apart; resolves with the first TLS record type the server
 * answers (0x16: a handshake, its ServerHello; 0x15: an alert), or null when it only closes.
 */
async function sendSplit(port: number, hello: Buffer): Promise<number | null> {
  const net = await import("node:net");
  return new Promise<number | null>((resolve) => {
    const socket = net.connect({ host: "127.0.0.1", port, noDelay: true }, () => {
      socket.write(hello.subarray(0, 40));
      setTimeout(() => socket.write(hello.subarray(40)), 50);
    });
    const done = (answer: number | null) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(answer);
    };
    const timer = setTimeout(() => done(null), 5_000);
    socket.once("data", (d: Buffer) => done(d[0] ?? null));
    socket.on("error", () => done(null));
    socket.on("close", () => done(null));
  });
}

const serialOfFile = (file: string) => serialOf(new X509Certificate(readFileSync(file)));

t.test("orders at start over tls-alpn-01 on the inbound port; no challenge reaches the app", { skip }, async (t) => {
  const s = await setup(t);
  const backend = await app(t);
  const r = await start(t, s, {}, { app: backend.url });
  const cert = join(s.dir, "id", "server.crt");
  const key = join(s.dir, "id", "server.key");

  const started = r.logs.events("acme_order_started");
  t.equal(started.length, 1, "one order at start");
  t.match(String(started[0]?.reason), /no such file/, "because the certificate file is missing");
  t.ok(
    r.logs.events("acme_challenge_answered").some((l) => l.type === "tls-alpn-01" && l.name === NAME),
    "Pebble validated tls-alpn-01 on the inbound port",
  );
  const issued = r.logs.events("acme_certificate_issued")[0];
  t.equal(issued?.serial, serialOfFile(cert), "the certificate issued is the one written");
  t.equal(issued?.renewal, false);

  const leaf = new X509Certificate(readFileSync(cert));
  t.match(leaf.subjectAltName, `DNS:${NAME}`, "it names the service");
  t.match(leaf.issuer, /Pebble Intermediate CA/, "Pebble issued it");
  t.equal(leaf.publicKey.asymmetricKeyDetails?.namedCurve, "prime256v1", "ECDSA P-256 by default");
  t.equal(statSync(key).mode & 0o777, 0o600, "the key is 0600");
  t.equal(statSync(cert).mode & 0o777, 0o644, "the certificate is 0644");
  t.equal(statSync(join(s.dir, "id", "acme-account.key")).mode & 0o777, 0o600, "the account key is 0600");

  const answer = await call(s);
  t.equal(answer.status, 200, "the normal mTLS path serves a peer with the ACME certificate");
  t.equal(answer.serial, leaf.serialNumber.toLowerCase().replace(/^0+/, ""), "and presents it");
  t.equal(backend.seen.length, 1, "only that request reached the app");

  const metrics = await (await request(`${r.admin}/metrics`)).body.text();
  const directory = { directory: s.pebble.directory };
  t.equal(
    sample(metrics, "mtls_acme_orders_total", { ...directory, result: "ok" }),
    1,
    "mtls_acme_orders_total{result=ok} 1",
  );
  t.equal(sample(metrics, "mtls_acme_consecutive_failures", directory), 0);
  t.ok(sample(metrics, "mtls_acme_challenges_total", { type: "tls-alpn-01", result: "answered" }) >= 1);
  const due =
    (new Date(leaf.validFrom).getTime() +
      0.7 * (new Date(leaf.validTo).getTime() - new Date(leaf.validFrom).getTime())) /
    1000;
  t.ok(
    Math.abs(sample(metrics, "mtls_acme_next_renewal_timestamp_seconds", directory) - due) < 1,
    "next renewal at 70 % of the lifetime",
  );
  const ratio = sample(metrics, "mtls_acme_cert_lifetime_remaining_ratio", { ...directory, cert: "server" });
  t.ok(ratio > 0.9 && ratio <= 1, `lifetime remaining ratio ${ratio}`);

  const status = (await (await request(`${r.admin}/status`)).body.json()) as { acme: Record<string, unknown> };
  t.equal((status.acme.certificate as { serial: string }).serial, serialOfFile(cert), "/status shows the certificate");
  t.equal((status.acme.last_order as { result: string }).result, "ok", "/status shows the last order");
  t.same(
    AcmeManager.readState({ tls: { key } } as never)?.certificate,
    status.acme.certificate,
    "the state file beside the key says the same",
  );

  const checked = await check(s);
  t.equal(checked.code, 0, "ashmesh check --config passes", { output: checked.out });
  t.match(checked.out, /√ ACME directory https:\/\/\S+ answers/, "check: the directory answers");
  t.match(checked.out, new RegExp(`√ last order \\S+: ok \\(serial ${serialOfFile(cert)}\\)`), "check: the last order");
  t.match(checked.out, /√ next renewal \d{4}-/, "check: the next renewal");

  // A ClientHello offering acme-tls/1 for a name with no challenge pending gets no certificate at all.
  const tls = await import("node:tls");
  const stray = await new Promise<string>((resolve) => {
    const socket = tls.connect({
      host: "127.0.0.1",
      port: s.tlsPort,
      servername: NAME,
      ALPNProtocols: ["acme-tls/1"],
      rejectUnauthorized: false,
    });
    socket.on("secureConnect", () => resolve("handshake"));
    socket.on("error", (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
  });
  t.not(stray, "handshake", `an acme-tls/1 connection without a pending challenge is refused (${stray})`);
  t.ok(
    await eventually(() => r.logs.events("acme_challenge_unknown").length > 0),
    "and logged as acme_challenge_unknown",
  );
  t.equal(backend.connections, 1, "no challenge connection ever reached the app");

  // A ClientHello split over TCP segments is read whole before it is routed: the same acme-tls/1
  // hello, sent in two writes, still reaches the challenge server (and is refused there).
  const hello = await captureClientHello({ servername: NAME, ALPNProtocols: ["acme-tls/1"] });
  const unknownBefore = r.logs.events("acme_challenge_unknown").length;
  t.not(await sendSplit(s.tlsPort, hello), 0x16, "a split acme-tls/1 ClientHello gets no ServerHello (no certificate)");
  t.ok(
    await eventually(() => r.logs.events("acme_challenge_unknown").length > unknownBefore),
    "by the challenge server (no challenge pending for the name)",
  );
  // And a split ClientHello of an ordinary client still reaches the mTLS server: a ServerHello.
  t.equal(
    await sendSplit(s.tlsPort, await captureClientHello({ servername: NAME })),
    0x16,
    "a split ordinary ClientHello gets the mTLS server's ServerHello",
  );
  t.equal(backend.connections, 1, "and neither reached the app");

  const text = r.logs.lines.map((l) => JSON.stringify(l)).join("\n");
  t.notMatch(text, /PRIVATE KEY/, "no key in the logs");
  t.notMatch(
    text,
    readFileSync(join(s.dir, "id", "acme-account.key"), "utf8").split("\n")[1] ?? "x",
    "not the account key either",
  );
});

t.test("renews once 70 % of the lifetime has passed, answering on the running listener", { skip }, async (t) => {
  const s = await setup(t);
  const r = await start(t, s);
  const cert = join(s.dir, "id", "server.crt");
  const leaf = new X509Certificate(readFileSync(cert));
  const first = serialOf(leaf);
  const notBefore = new Date(leaf.validFrom).getTime();
  const lifetime = new Date(leaf.validTo).getTime() - notBefore;
  const due = Math.floor(notBefore + 0.7 * lifetime);
  t.equal(r.sidecar.acme?.status.next_renewal, new Date(due).toISOString(), "scheduled at 70 % (no jitter here)");

  r.clock.now = due - 60_000;
  await r.sidecar.acme?.check();
  t.equal(r.logs.events("acme_order_started").length, 1, "a minute before 70 %: no order");
  t.equal(serialOfFile(cert), first, "the certificate is kept");

  const answeredBefore = r.logs.events("acme_challenge_answered").length;
  r.clock.now = due + 1;
  r.clock.only = first;
  await r.sidecar.acme?.check();
  r.clock.now = null;
  const started = r.logs.events("acme_order_started");
  t.equal(started.length, 2, "at 70 %: an order");
  t.match(String(started[1]?.reason), /renewal due \(70 %/);
  t.equal(started[1]?.renewal, true);
  t.ok(
    r.logs.events("acme_challenge_answered").length > answeredBefore,
    "the running inbound listener answered tls-alpn-01",
  );
  const second = serialOfFile(cert);
  t.not(second, first, "a new certificate was written");
  t.ok(
    await eventually(() => r.sidecar.identity.current.server.summary.serial === second, 10_000),
    "the identity store took it into use through its watcher",
  );
  t.ok(
    r.logs.events("cert_reloaded").some((l) => l.serial === second),
    "cert_reloaded names the new serial",
  );
  t.equal((await call(s)).serial, second, "peers now see the new certificate");
  t.equal(r.logs.events("acme_order_started").length, 2, "and the new certificate is not due again");
});

t.test("CA down during a renewal: the identity is kept, retries back off, then it renews", { skip }, async (t) => {
  const s = await setup(t);
  const ca = await forwarder(t, { host: s.pebble.host, port: s.pebble.port });
  const directory = `https://127.0.0.1:${ca.port}/dir`;
  const r = await start(t, s, { directory, retryMinMs: 400, retryMaxMs: 20_000 });
  const cert = join(s.dir, "id", "server.crt");
  const pem = readFileSync(cert);
  const first = serialOfFile(cert);

  await ca.down();
  const leaf = new X509Certificate(pem);
  r.clock.now = new Date(leaf.validTo).getTime() - 0.29 * LIFETIME_S * 1000;
  r.clock.only = first;
  await r.sidecar.acme?.check();
  // The manager retries on its own now: wait for three failures in all.
  t.ok(await eventually(() => r.logs.events("acme_renewal_failed").length >= 3, 20_000), "three failed attempts");
  const failures = r.logs.events("acme_renewal_failed").slice(0, 3);
  for (const [i, f] of failures.entries()) {
    const full = 400 * 2 ** i;
    t.equal(f.attempt, i + 1, `attempt ${i + 1}`);
    t.ok(
      Number(f.retry_in_ms) >= full / 2 && Number(f.retry_in_ms) <= full,
      `retry ${i + 1} in ${f.retry_in_ms} ms: within [${full / 2}, ${full}]`,
    );
    t.equal(f.kept_serial, first, "the identity in use is kept");
    t.match(String(f.reason), /ECONNREFUSED|connect|socket hang up|ECONNRESET/, `the reason says why: ${f.reason}`);
  }
  t.ok(Number(failures[2]?.retry_in_ms) > Number(failures[0]?.retry_in_ms), "the delay grows");
  t.same(readFileSync(cert), pem, "the certificate file is untouched");
  t.equal(r.sidecar.identity.current.server.summary.serial, first, "the sidecar still uses it");
  t.equal((await call(s)).status, 200, "and still serves peers");
  const metrics = await (await request(`${r.admin}/metrics`)).body.text();
  t.ok(
    sample(metrics, "mtls_acme_consecutive_failures", { directory }) >= 3,
    "mtls_acme_consecutive_failures counts them",
  );
  t.ok(sample(metrics, "mtls_acme_orders_total", { directory, result: "failed" }) >= 3);
  const status = (await (await request(`${r.admin}/status`)).body.json()) as {
    acme: { last_error: { reason: string }; next_retry: string };
  };
  t.match(status.acme.last_error.reason, /ECONNREFUSED|connect/, "/status shows the last error");
  t.ok(status.acme.next_retry, "and when the next attempt is");
  const checked = await check(s, { directory });
  t.equal(checked.code, 1, "ashmesh check --config fails while the CA is down");
  t.match(checked.out, /× the ACME directory does not answer/, "check: the directory is down");
  t.match(checked.out, /× last order \S+ failed \(\d+ in a row\): /, "check: the last order failed, and why");

  await ca.up();
  t.ok(
    await eventually(() => r.logs.events("acme_certificate_issued").length >= 2, 30_000),
    "once the CA is back, a retry renews",
  );
  r.clock.now = null;
  const second = serialOfFile(cert);
  t.not(second, first);
  t.ok(
    await eventually(() => r.sidecar.identity.current.server.summary.serial === second, 10_000),
    "and the sidecar takes it",
  );
  t.equal(r.sidecar.acme?.status.consecutive_failures, 0, "failures reset");
});

t.test("a certificate the sidecar would refuse is never written", { skip }, async (t) => {
  const s = await setup(t);
  const r = await start(t, s);
  const cert = join(s.dir, "id", "server.crt");
  const pem = readFileSync(cert);
  // Another Pebble is another CA: its certificates do not chain to tls.ca.
  const other = await startPebble(t, s.pebble.infra, { tlsPort: s.tlsPort });
  const responder = r.sidecar.acme?.responder;
  if (!responder) throw new Error("no ACME responder");
  // A second manager for the same files, pointed at the other CA, answering on the same listener.
  const manager = new AcmeManager(
    config(s, { directory: other.directory, retryMinMs: 60_000 }),
    r.sidecar.logger,
    responder,
    {
      now: () => Date.now() + LIFETIME_S * 1000,
      random: () => 0,
    },
  );
  t.teardown(() => manager.stop());
  await manager.check();
  await manager.stop();
  const failed = r.logs.events("acme_renewal_failed").at(-1);
  t.match(
    String(failed?.reason),
    /would refuse.*does not chain to any CA in tls\.ca.*add the ACME CA's root to tls\.ca/,
    `refused before writing: ${failed?.reason}`,
  );
  t.same(readFileSync(cert), pem, "the certificate file is untouched");
  t.equal((await call(s)).status, 200, "the sidecar serves on with its certificate");
});

t.test("start errors name the field and exit 2; the EAB HMAC is never shown", { skip }, async (t) => {
  const hmac = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
  const s = await setup(t, { eab: { "kid-1": hmac } });
  const base = {
    service: { name: "auth-accounts", dnsName: NAME },
    tls: { cert: join(s.dir, "id", "server.crt"), key: join(s.dir, "id", "server.key"), ca: s.ca },
    inbound: { listen: `127.0.0.1:${s.tlsPort}` },
    outbound: { enabled: false },
    admin: { listen: "127.0.0.1:0" },
  };
  const file = (name: string, acme: Record<string, unknown>) =>
    writeYaml(join(s.dir, `${name}.yaml`), { ...base, acme });
  const cases: Array<{ what: string; file: string; env?: Record<string, string>; expect: RegExp }> = [
    {
      what: "a URL that is no ACME directory",
      file: file("no-directory", {
        directory: `${s.pebble.managementUrl}/nothing-here`,
        caBundle: s.pebble.infra.bundle,
      }),
      expect: /acme\.directory \(ACME_DIRECTORY\) https:\/\/\S+ is not an ACME directory: it answered HTTP 404/,
    },
    {
      what: "not https",
      file: file("http", { directory: "http://127.0.0.1:1/dir" }),
      expect: /acme\.directory="http:\/\/127\.0\.0\.1:1\/dir" is not valid: expected an https:\/\/ URL/,
    },
    {
      what: "from the environment",
      file: file("env", { directory: s.pebble.directory }),
      env: { ACME_DIRECTORY: "not a url" },
      expect: /ACME_DIRECTORY \(acme\.directory\)="not a url" is not valid/,
    },
    {
      what: "a server the CA bundle does not trust",
      file: file("untrusted", { directory: s.pebble.directory }),
      expect: /not trusted .*acme\.caBundle \(ACME_CA_BUNDLE\)/,
    },
    {
      what: "a host name that does not resolve",
      file: file("nxdomain", { directory: "https://acme.invalid/dir" }),
      expect: /acme\.directory \(ACME_DIRECTORY\) https:\/\/acme\.invalid\/dir: the host name does not resolve/,
    },
    {
      what: "an external account binding the CA requires",
      file: file("no-eab", { directory: s.pebble.directory, caBundle: s.pebble.infra.bundle }),
      expect: /requires an external account binding: set ACME_EAB_KID and ACME_EAB_HMAC/,
    },
    {
      what: "a malformed HMAC, not shown",
      file: file("bad-hmac", { directory: s.pebble.directory, caBundle: s.pebble.infra.bundle }),
      env: { ACME_EAB_KID: "kid-1", ACME_EAB_HMAC: "secret value!" },
      expect: /ACME_EAB_HMAC \(acme\.eab\.hmac\) \(secret, not shown\) is not valid/,
    },
  ];
  for (const c of cases) {
    const result = await ashmeshCli(["proxy", "--config", c.file], {
      env: { ...process.env, ...c.env },
      timeoutMs: 30_000,
    });
    t.equal(result.code, 2, `${c.what}: exit 2`, { stderr: result.err });
    t.match(result.err, c.expect, `${c.what}: ${result.err.trim().split("\n").slice(0, 3).join(" | ")}`);
    t.notMatch(result.err + result.out, "secret value!", `${c.what}: the HMAC is not echoed`);
  }

  // With the binding, the account is made and the certificate ordered; the HMAC appears nowhere.
  const r = await start(t, s, { eab: { kid: "kid-1", hmac } });
  t.ok(r.logs.events("acme_account_ready").length === 1, "account bound and registered");
  t.ok(r.logs.events("acme_certificate_issued").length === 1, "certificate issued");
  const everything = [
    r.logs.lines.map((l) => JSON.stringify(l)).join("\n"),
    await (await request(`${r.admin}/status`)).body.text(),
    await (await request(`${r.admin}/metrics`)).body.text(),
    readFileSync(AcmeManager.statePath({ tls: { key: join(s.dir, "id", "server.key") } } as never), "utf8"),
  ].join("\n");
  t.notMatch(everything, hmac, "no EAB HMAC in logs, /status, /metrics or the state file");
  t.notMatch(everything, /PRIVATE KEY/, "no private key either");
});

t.test("a CRL of a CA without cRLSign (Pebble's own) is refused, as OpenSSL refuses it", { skip }, async (t) => {
  const s = await setup(t);
  await start(t, s);
  const leafFile = join(s.dir, "id", "server.crt");
  const [leaf, intermediate] = readFileSync(leafFile, "utf8").split(/(?=-----BEGIN CERTIFICATE-----)/);
  const original = { root: await s.pebble.root(), intermediate: await s.pebble.intermediate() };
  const signers = await crlSigners(s.pebble);
  const files = (name: string, ca: string, crls: string[]) => {
    writeFileSync(join(s.dir, `${name}.ca`), ca);
    writeFileSync(join(s.dir, `${name}.crl`), crls.join(""));
    return { ca: join(s.dir, `${name}.ca`), crl: join(s.dir, `${name}.crl`) };
  };
  writeFileSync(join(s.dir, "leaf.pem"), leaf as string);
  writeFileSync(join(s.dir, "chain.pem"), intermediate as string);
  const crlsOf = async (root: string, inter: string) => [
    await createCrl({ certPem: root, keyPem: signers.root.keyPem }, { revoked: [], number: 1 }),
    await createCrl({ certPem: inter, keyPem: signers.intermediate.keyPem }, { revoked: [], number: 1 }),
  ];
  const cases = [
    {
      name: "pebble",
      ca: original.root + original.intermediate,
      crls: await crlsOf(original.root, original.intermediate),
      ok: false,
    },
    {
      name: "recertified",
      ca: signers.root.certPem + signers.intermediate.certPem,
      crls: await crlsOf(signers.root.certPem, signers.intermediate.certPem),
      ok: true,
    },
  ];
  for (const c of cases) {
    const f = files(c.name, c.ca, c.crls);
    const verdict = await validateCrls(f, readFileSync(f.ca), readFileSync(f.crl));
    const openssl = await run("openssl", [
      "verify",
      "-crl_check_all",
      "-CAfile",
      f.ca,
      "-CRLfile",
      f.crl,
      "-untrusted",
      join(s.dir, "chain.pem"),
      join(s.dir, "leaf.pem"),
    ]);
    t.equal(
      openssl.code === 0,
      c.ok,
      `${c.name}: openssl verify ${c.ok ? "accepts" : "refuses"} (${(openssl.out + openssl.err).trim().split("\n").pop()})`,
    );
    t.equal(!verdict.failed, c.ok, `${c.name}: the sidecar's validator agrees`);
    if (!c.ok) {
      const error = verdict.findings.find((x) => x.level === "error");
      t.match(error?.message, /key usage does not include cRLSign/, `${c.name}: ${error?.message}`);
    }
  }
});

t.test("http-01 on its own port: answered there, never by the app; unknown tokens get 404", { skip }, async (t) => {
  const infra = await infraCa(t);
  const httpPort = await freePort();
  const tlsPort = await freePort();
  const pebble = await startPebble(t, infra, { tlsPort, httpPort, validitySeconds: LIFETIME_S });
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-acme-http-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const ca = join(dir, "ca.crt");
  writeFileSync(ca, await pebble.root());
  const s: Setup = { pebble, dir, tlsPort, ca, client: { cert: Buffer.alloc(0), key: Buffer.alloc(0) } };
  const backend = await app(t);
  const r = await start(t, s, { challenge: "http-01", http01Listen: `127.0.0.1:${httpPort}` }, { app: backend.url });
  t.ok(
    r.logs.events("acme_challenge_answered").some((l) => l.type === "http-01"),
    "Pebble validated http-01",
  );
  t.notOk(
    r.logs.events("acme_challenge_answered").some((l) => l.type === "tls-alpn-01"),
    "and not tls-alpn-01",
  );
  t.equal(r.logs.events("acme_certificate_issued").length, 1, "the certificate was issued");
  const unknown = await request(`http://127.0.0.1:${httpPort}/.well-known/acme-challenge/nope`);
  t.equal(unknown.statusCode, 404, "an unknown token: 404");
  await unknown.body.dump();
  const other = await request(`http://127.0.0.1:${httpPort}/api/v1/verify`);
  t.equal(other.statusCode, 404, "any other path: 404, nothing is proxied");
  await other.body.dump();
  t.equal(backend.connections, 0, "the app saw nothing");
  const metrics = await (await request(`${r.admin}/metrics`)).body.text();
  t.ok(sample(metrics, "mtls_acme_challenges_total", { type: "http-01", result: "answered" }) >= 1);
  t.equal(sample(metrics, "mtls_acme_challenges_total", { type: "http-01", result: "unknown" }), 1);
});

t.test("the acme section's own rules, each naming the field", async (t) => {
  const base = {
    service: { name: "auth-accounts", dnsName: NAME },
    tls: { cert: "/x/server.crt", key: "/x/server.key", ca: "/x/ca.crt" },
  };
  const cases: Array<[string, Record<string, unknown>, RegExp]> = [
    [
      "names without service.dnsName",
      { ...base, acme: { directory: "https://ca/dir", names: ["other.ashchan.local"] } },
      /acme\.names=\["other\.ashchan\.local"\] is not valid: it must include service\.dnsName auth\.ashchan\.local/,
    ],
    [
      "http-01 without a listener",
      { ...base, acme: { directory: "https://ca/dir", challenge: "http-01" } },
      /acme\.challenge="http-01" is not valid: set acme\.http01Listen/,
    ],
    [
      "tls-alpn-01 without inbound",
      { ...base, inbound: { enabled: false }, acme: { directory: "https://ca/dir" } },
      /acme\.challenge="tls-alpn-01" is not valid: it is answered on the inbound listener, which is disabled/,
    ],
    [
      "a separate client certificate",
      { ...base, tls: { ...base.tls, clientCert: "/x/c.crt" }, acme: { directory: "https://ca/dir" } },
      /with acme, the one certificate the CA issues serves both directions/,
    ],
    [
      "renewAt outside (0, 1)",
      { ...base, acme: { directory: "https://ca/dir", renewAt: 1 } },
      /acme\.renewAt=1 is not valid/,
    ],
    [
      "crlUrl without tls.crl",
      { ...base, tls: { ...base.tls, crlUrl: "https://ca/crl" } },
      /tls\.crlUrl is set but tls\.crl is not/,
    ],
    [
      "a crlUrl that is no URL",
      { ...base, tls: { ...base.tls, crl: "/x/ca.crl", crlUrl: "ftp://ca/crl" } },
      /tls\.crlUrl.* is not valid: expected an https:\/\/ \(or http:\/\/\) URL/,
    ],
  ];
  for (const [what, raw, expect] of cases) {
    t.throws(() => parseConfig(raw), { code: "ASHMESH_BAD_CONFIG", message: expect }, what);
  }
  const env = parseConfig(base, {
    env: {
      ACME_DIRECTORY: "https://ca/dir",
      ACME_CA_BUNDLE: "/x/acme.crt",
      ACME_EAB_KID: "k",
      ACME_EAB_HMAC: "aGk",
      MTLS_CRL_URL: "https://a/1.crl, http://b/2.crl",
      MTLS_CRL_FILE: "/x/ca.crl",
    },
  });
  t.same(
    {
      directory: env.acme?.directory,
      caBundle: env.acme?.caBundle,
      eab: env.acme?.eab,
      names: env.acme?.names,
      accountKey: env.acme?.accountKey,
    },
    {
      directory: "https://ca/dir",
      caBundle: "/x/acme.crt",
      eab: { kid: "k", hmac: "aGk" },
      names: [NAME],
      accountKey: "/x/acme-account.key",
    },
    "the environment turns the section on; defaults: names [service.dnsName], the account key beside tls.key",
  );
  t.same(env.tls.crlUrl, ["https://a/1.crl", "http://b/2.crl"], "MTLS_CRL_URL is a list");
  t.equal(parseConfig(base).acme, null, "no acme section: null");
});
