// Security property 7 for the files other than the certificate: a broken key (garbage, or a good
// key that is not the certificate's), CA bundle (garbage, empty) or CRL (garbage, empty, signed
// by another CA) written on a running sidecar is refused. The sidecar keeps serving, logs
// `cert_reload_failed` naming the field and the file, counts mtls_cert_reloads_total{result="failed"},
// /status shows the failure and the identity version in use, and the trust in force stays the
// last good one: a client of the mesh CA is still accepted, a client of a foreign CA still
// refused, a client revoked by the last good CRL still refused. A good file written afterwards is
// taken into use (and, to show that it is, it differs from the last good one). Files are written
// both ways operators write them: in place, and by rename (certs-dev/store.ts writeAtomic).
// The outbound side too: a sidecar whose key breaks keeps calling its peer with its old identity.
import { generateKeyPairSync } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import tls from "node:tls";
import t, { type Test } from "tap";
import { request } from "undici";
import { DevCa, writeAtomic } from "../certs-dev/store.js";
import { hasOpenssl, opensslOk } from "./lib/certs.js";
import {
  app,
  eventually,
  GET,
  type Pki,
  pki,
  type RunningSidecar,
  rawTls,
  sample,
  sidecar,
  viaProxy,
} from "./lib/mesh.js";

type How = "in place" | "by rename";

/** Writes a file as an operator does: `>` (truncate and write) or write-beside-then-rename. */
function write(path: string, data: string | Buffer, how: How, mode = 0o644): void {
  if (how === "by rename") writeAtomic(path, data, mode);
  else writeFileSync(path, data);
}

interface Status {
  identity: {
    version: number;
    server: { serial: string };
    client: { serial: string; sha256: string };
    ca: Array<{ subject: string }>;
  };
  last_reload: { result: string; trigger: string; error?: string } | null;
}

async function status(s: RunningSidecar): Promise<Status> {
  return (await (await request(`${s.adminUrl}/status`)).body.json()) as Status;
}

const failedReloads = async (s: RunningSidecar) =>
  sample(await s.metrics(), "mtls_cert_reloads_total", { result: "failed" });
const okReloads = async (s: RunningSidecar) => sample(await s.metrics(), "mtls_cert_reloads_total", { result: "ok" });

/**
 * Writes a broken file with `breakIt` and checks the refusal: logged naming `field` and `file`
 * with a reason matching `reason`, counted, shown in /status, and the identity in use unchanged.
 */
async function expectRefused(
  t: Test,
  s: RunningSidecar,
  what: string,
  expected: { field: string; file: string; reason: RegExp },
  breakIt: () => void,
): Promise<void> {
  const logsBefore = s.logs.events("cert_reload_failed").length;
  const failedBefore = await failedReloads(s);
  const before = await status(s);
  breakIt();
  const line = () =>
    s.logs
      .events("cert_reload_failed")
      .slice(logsBefore)
      .find((l) => l.field === expected.field && l.file === expected.file && expected.reason.test(String(l.reason)));
  t.ok(
    await eventually(() => !!line(), 3_000),
    `${what}: cert_reload_failed names ${expected.field} (${expected.file})`,
  );
  t.equal(line()?.kept_serial, before.identity.server.serial, `${what}: the log names the serial kept in use`);
  t.ok((await failedReloads(s)) > failedBefore, `${what}: counted as mtls_cert_reloads_total{result="failed"}`);
  const after = await status(s);
  t.equal(after.last_reload?.result, "failed", `${what}: /status last_reload says failed`);
  t.match(after.last_reload?.error, expected.file, `${what}: /status last_reload names the file`);
  t.equal(after.identity.version, before.identity.version, `${what}: the identity in use is still the same version`);
  t.equal(after.identity.server.serial, before.identity.server.serial, `${what}: and the same certificate`);
}

/** A client's credentials, read now (later writes to the files do not change them). */
function client(files: { cert: string; key: string }, ca: Buffer) {
  return { cert: readFileSync(files.cert), key: readFileSync(files.key), ca, servername: "auth.ashchan.local" };
}

/** A full handshake (no session) and one request: the status line, or "" when refused. */
async function statusLine(port: number, creds: tls.ConnectionOptions): Promise<string> {
  return (await rawTls(port, creds, GET)).data.split("\r\n")[0] ?? "";
}

/** The serial the server presents to a new handshake. */
function presentedSerial(port: number, creds: tls.ConnectionOptions): Promise<string> {
  return new Promise((resolve) => {
    const s = tls.connect({ host: "127.0.0.1", port, ...creds }, () => {
      resolve(s.getPeerX509Certificate()?.serialNumber.toLowerCase() ?? "none");
      s.end();
    });
    s.setTimeout(5_000, () => s.destroy(new Error("timeout")));
    s.on("error", () => resolve("error"));
  });
}

const GARBAGE_KEY = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END PRIVATE KEY-----\n";
const GARBAGE_CERT = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
const GARBAGE_CRL = "-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n";

function otherKey(): string {
  return generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey.export({
    type: "pkcs8",
    format: "pem",
  }) as string;
}

async function authWithApp(t: Test, p: Pki) {
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url },
    outbound: { enabled: false },
    log: { level: "info" },
  });
  return { backend, auth };
}

/** Runs `change` and waits until the sidecar took a new CA bundle or CRL into use, counted as ok. */
async function trustReloaded(t: Test, auth: RunningSidecar, what: string, change: () => unknown): Promise<void> {
  const okBefore = await okReloads(auth);
  const reloadedBefore = auth.logs.events("cert_reloaded").length;
  await change();
  t.ok(
    await eventually(
      () =>
        auth.logs
          .events("cert_reloaded")
          .slice(reloadedBefore)
          .some((l) => l.trust_changed === true),
      3_000,
    ),
    `${what} is reloaded (trust changed)`,
  );
  t.ok((await okReloads(auth)) > okBefore, 'counted as mtls_cert_reloads_total{result="ok"}');
}

t.test("a broken key is refused: the last good identity keeps serving, the next rotation is taken", async (t) => {
  const p = await pki(t);
  const ca = p.read(p.trust.ca);
  const gw = client(await p.identity("gateway.ashchan.local"), ca);
  const authFiles = await p.identity("auth.ashchan.local");
  const { backend, auth } = await authWithApp(t, p);
  const serial = await presentedSerial(auth.inboundPort, gw);
  t.match(await statusLine(auth.inboundPort, gw), /^HTTP\/1\.1 200/, "before: a mesh client gets 200");

  const variants: Array<{ what: string; how: How; data: string; reason: RegExp }> = [
    { what: "garbage key", how: "in place", data: GARBAGE_KEY, reason: /not a readable private key/ },
    {
      what: "a valid key that is not the certificate's",
      how: "by rename",
      data: otherKey(),
      reason: /does not match the certificate/,
    },
  ];
  for (const v of variants) {
    await expectRefused(t, auth, `${v.what} written ${v.how}`, { field: "tls.key", file: authFiles.key, ...v }, () =>
      write(authFiles.key, v.data, v.how, 0o600),
    );
    const seen = backend.seen.length;
    t.match(await statusLine(auth.inboundPort, gw), /^HTTP\/1\.1 200/, `${v.what}: a new connection still gets 200`);
    t.equal(backend.seen.length, seen + 1, `${v.what}: and the request reached the app`);
    t.equal(await presentedSerial(auth.inboundPort, gw), serial, `${v.what}: new handshakes present the old serial`);
  }

  // A good pair again (key first, then certificate, each by rename): taken into use.
  const okBefore = await okReloads(auth);
  const rotated = await p.ca.issue("auth.ashchan.local", { replace: true });
  t.ok(
    await eventually(async () => (await presentedSerial(auth.inboundPort, gw)) === rotated.serial, 3_000),
    "after a good key and certificate, new handshakes present the new serial",
  );
  t.ok((await okReloads(auth)) > okBefore, 'counted as mtls_cert_reloads_total{result="ok"}');
  t.not((await status(auth)).last_reload?.result, "failed", "/status last_reload no longer says failed");
  t.match(await statusLine(auth.inboundPort, gw), /^HTTP\/1\.1 200/, "and a mesh client still gets 200");
});

t.test("a broken CA bundle is refused: the mesh CA stays trusted, a foreign CA stays refused", async (t) => {
  const p = await pki(t);
  const ca = p.read(p.trust.ca);
  const gw = client(await p.identity("gateway.ashchan.local"), ca);
  const foreign = await DevCa.init(`${p.dir}/foreign`, { commonName: "foreign-ca" });
  await foreign.issue("rogue.ashchan.local");
  const rogue = client(foreign.identityFiles("rogue.ashchan.local"), ca);
  const foreignCa = readFileSync(DevCa.paths(foreign.dir).trustCa, "utf8");
  // The CRL file carries the foreign CA's CRL from the start (ignored while that CA is not in the
  // bundle), so that adding the foreign CA to the bundle is, on its own, a good change.
  const crl = `${readFileSync(p.trust.crl, "utf8")}${readFileSync(DevCa.paths(foreign.dir).trustCrl, "utf8")}`;
  writeAtomic(p.trust.crl, crl, 0o644);
  const { backend, auth } = await authWithApp(t, p);

  const mesh = async (what: string) => {
    const seen = backend.seen.length;
    t.match(await statusLine(auth.inboundPort, gw), /^HTTP\/1\.1 200/, `${what}: a client of the mesh CA gets 200`);
    t.equal(backend.seen.length, seen + 1, `${what}: and its request reached the app`);
  };
  const stranger = async (what: string) => {
    const seen = backend.seen.length;
    t.equal(await statusLine(auth.inboundPort, rogue), "", `${what}: a client of the foreign CA gets nothing`);
    t.equal(auth.logs.events("mtls_handshake_failed").at(-1)?.reason, "unknown_ca", `${what}: refused as unknown_ca`);
    t.equal(backend.seen.length, seen, `${what}: nothing reached the app`);
  };
  await mesh("before");
  await stranger("before");

  const variants: Array<{ what: string; how: How; data: string; reason: RegExp }> = [
    { what: "a garbage CA bundle", how: "in place", data: GARBAGE_CERT, reason: /certificate #1 does not parse/ },
    { what: "an empty CA bundle", how: "by rename", data: "", reason: /no PEM certificate/ },
  ];
  for (const v of variants) {
    const what = `${v.what} written ${v.how}`;
    await expectRefused(t, auth, what, { field: "tls.ca", file: p.trust.ca, ...v }, () =>
      write(p.trust.ca, v.data, v.how),
    );
    const s = await status(auth);
    t.equal(s.identity.ca.length, 1, `${what}: /status still shows the one mesh CA`);
    await mesh(what);
    await stranger(what);
  }

  // A good bundle again, written in place: the mesh CA and the foreign one. Taken into use: the
  // foreign client, refused under the last good bundle, is now accepted.
  await trustReloaded(t, auth, "the good bundle", () =>
    write(p.trust.ca, `${ca.toString("utf8").trim()}\n${foreignCa}`, "in place"),
  );
  t.equal((await status(auth)).identity.ca.length, 2, "/status shows both CAs");
  t.match(await statusLine(auth.inboundPort, rogue), /^HTTP\/1\.1 200/, "the foreign CA's client is now accepted");
  await mesh("after the good bundle");
});

t.test("a broken CRL is refused: a certificate revoked by the last good CRL stays refused", async (t) => {
  const p = await pki(t);
  const ca = p.read(p.trust.ca);
  const gw = client(await p.identity("gateway.ashchan.local"), ca);
  const boards = client(await p.identity("boards.ashchan.local"), ca);
  const search = client(await p.identity("search.ashchan.local"), ca);
  await p.ca.revoke("boards.ashchan.local");
  // Same CA name as the mesh CA, another key: only the signature tells its CRL apart.
  const foreign = await DevCa.init(`${p.dir}/foreign`);
  const foreignCrl = readFileSync(DevCa.paths(foreign.dir).trustCrl, "utf8");
  const { backend, auth } = await authWithApp(t, p);

  const check = async (what: string, revoked: { search: boolean }) => {
    const seen = backend.seen.length;
    t.match(await statusLine(auth.inboundPort, gw), /^HTTP\/1\.1 200/, `${what}: a valid client gets 200`);
    t.equal(
      await statusLine(auth.inboundPort, boards),
      "",
      `${what}: the client revoked by the last good CRL gets nothing`,
    );
    t.equal(auth.logs.events("mtls_handshake_failed").at(-1)?.reason, "revoked", `${what}: refused as revoked`);
    if (revoked.search) {
      t.equal(await statusLine(auth.inboundPort, search), "", `${what}: the newly revoked client gets nothing`);
      t.equal(auth.logs.events("mtls_handshake_failed").at(-1)?.reason, "revoked", `${what}: refused as revoked`);
    } else {
      t.match(await statusLine(auth.inboundPort, search), /^HTTP\/1\.1 200/, `${what}: another valid client gets 200`);
    }
    t.equal(backend.seen.length, seen + (revoked.search ? 1 : 2), `${what}: only the valid clients reached the app`);
  };
  await check("before", { search: false });

  const variants: Array<{ what: string; how: How; data: string; reason: RegExp }> = [
    { what: "a garbage CRL", how: "in place", data: GARBAGE_CRL, reason: /CRL #1 does not parse/ },
    { what: "an empty CRL file", how: "by rename", data: "", reason: /no PEM CRL/ },
    {
      what: "a CRL signed by another CA of the same name",
      how: "in place",
      data: foreignCrl,
      reason: /no CRL for CA/,
    },
  ];
  for (const v of variants) {
    const what = `${v.what} written ${v.how}`;
    await expectRefused(t, auth, what, { field: "tls.crl", file: p.trust.crl, ...v }, () =>
      write(p.trust.crl, v.data, v.how),
    );
    await check(what, { search: false });
  }

  // A good CRL again (the dev CA revokes search and writes its CRL by rename): taken into use.
  await trustReloaded(t, auth, "the good CRL", () => p.ca.revoke("search.ashchan.local"));
  await check("after the good CRL", { search: true });
});

t.test("outbound: a sidecar whose key breaks keeps calling its peer with its old identity", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const gwFiles = await p.identity("gateway.ashchan.local");
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url },
    outbound: { enabled: false },
    limits: { idleTimeoutMs: 100 }, // auth closes idle connections quickly: each call needs a new one
    log: { level: "info" },
  });
  const gw = await sidecar(t, p, "gateway.ashchan.local", {
    inbound: { enabled: false },
    outbound: { resolve: { "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}` } },
  });
  const call = async () => {
    const res = await viaProxy(gw.outboundPort, "http://auth.ashchan.local/");
    const xfcc = res.status === 200 ? String(JSON.parse(res.body).xfcc) : "";
    return { status: res.status, hash: /Hash=([0-9a-f]+)/.exec(xfcc)?.[1] ?? "" };
  };
  const oldHash = (await status(gw)).identity.client.sha256;
  t.same(await call(), { status: 200, hash: oldHash }, "before: the call carries gateway's certificate");

  await expectRefused(
    t,
    gw,
    "garbage key written by rename",
    { field: "tls.key", file: gwFiles.key, reason: /not a readable private key/ },
    () => write(gwFiles.key, GARBAGE_KEY, "by rename", 0o600),
  );
  // Past auth's idle timeout: the next call needs a new connection. Wait until gateway saw it close.
  t.ok(
    await eventually(
      async () => sample(await gw.metrics(), "mtls_open_connections", { direction: "outbound" }) === 0,
      10_000,
    ),
    "auth closed the idle connection",
  );
  const handshakes = gw.logs.events("mtls_handshake_complete").length;
  t.same(await call(), { status: 200, hash: oldHash }, "the next call succeeds with the old certificate");
  t.equal(gw.logs.events("mtls_handshake_complete").length, handshakes + 1, "over a new connection");

  const rotated = await p.ca.issue("gateway.ashchan.local", { replace: true });
  t.ok(
    await eventually(async () => (await status(gw)).identity.client.serial === rotated.serial, 3_000),
    "a good key and certificate are taken into use",
  );
  const newHash = (await status(gw)).identity.client.sha256;
  t.not(newHash, oldHash);
  t.same(await call(), { status: 200, hash: newHash }, "and the next call carries the new certificate");
});

// A key that parses and matches its certificate but that OpenSSL refuses in a secure context
// ("ee key too small" for RSA 512) must be refused like any broken file. It once passed
// validation and was taken half-way (recorded, then refused by inbound's setSecureContext), which
// held back every later change, a CRL included; tls.ts assertUsable now checks what OpenSSL takes.

t.test(
  "a key OpenSSL refuses is refused on reload, and does not hold back a later CRL",
  { skip: hasOpenssl ? false : "openssl is not installed" },
  async (t) => {
    const p = await pki(t);
    const ca = p.read(p.trust.ca);
    const gw = client(await p.identity("gateway.ashchan.local"), ca);
    const boards = client(await p.identity("boards.ashchan.local"), ca);
    const authFiles = await p.identity("auth.ashchan.local");
    const { auth } = await authWithApp(t, p);
    const serial = await presentedSerial(auth.inboundPort, gw);

    // An RSA 512 key and its certificate, signed by the mesh CA: parses, matches, chains.
    const dir = join(p.dir, "weak");
    mkdirSync(dir);
    writeFileSync(join(dir, "ext"), "subjectAltName=DNS:auth.ashchan.local\nextendedKeyUsage=serverAuth,clientAuth\n");
    const caFiles = p.ca.caFiles(p.ca.active);
    await opensslOk(["genrsa", "-out", "weak.key", "512"], { cwd: dir });
    await opensslOk(["req", "-new", "-key", "weak.key", "-out", "weak.csr", "-subj", "/CN=auth.ashchan.local"], {
      cwd: dir,
    });
    await opensslOk(
      [
        ...["x509", "-req", "-sha256", "-in", "weak.csr", "-CA", caFiles.cert, "-CAkey", caFiles.key],
        ...["-set_serial", "0x4242", "-days", "10", "-extfile", "ext", "-out", "weak.crt"],
      ],
      { cwd: dir },
    );
    writeAtomic(authFiles.key, readFileSync(join(dir, "weak.key")), 0o600);
    writeAtomic(authFiles.cert, readFileSync(join(dir, "weak.crt")), 0o644);
    t.ok(
      await eventually(() => auth.logs.events("cert_reload_failed").length > 0, 10_000),
      "the unusable key is reported as a failed reload",
    );
    t.equal(await presentedSerial(auth.inboundPort, gw), serial, "new handshakes present the old serial");
    t.equal((await status(auth)).identity.server.serial, serial, "/status shows the certificate in use");

    await p.ca.revoke("boards.ashchan.local");
    t.ok(
      await eventually(async () => (await statusLine(auth.inboundPort, boards)) === "", 1_500),
      "a client revoked afterwards is refused within a second and a half",
    );
  },
);
