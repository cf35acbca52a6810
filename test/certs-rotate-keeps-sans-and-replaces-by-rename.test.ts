// `ashmesh certs rotate NAME`: a new key and certificate with the SANs and lifetime of the
// current one, written by rename (new inodes, no temporary file left), modes 0600/0644; the old
// certificate is superseded, not revoked.
import { X509Certificate } from "node:crypto";
import { chownSync, readdirSync, readFileSync, statSync } from "node:fs";
import t from "tap";
import { DevCa } from "../certs-dev/store.js";
import { certs, certsCli, hasOpenssl, openssl, tempDir } from "./lib/certs.js";

const DAY = 86_400_000;

t.test("rotate replaces key and certificate, keeping SANs and lifetime", async (t) => {
  const dir = tempDir(t);
  t.equal((await certs(["init", "--dir", dir])).code, 0);
  const issued = await certs([
    "issue",
    "auth.ashchan.local",
    "--dns",
    "auth,auth.internal",
    "--ip",
    "127.0.0.1,::1",
    "--uri",
    "spiffe://ashchan.local/auth",
    "--days",
    "30",
    "--dir",
    dir,
  ]);
  t.equal(issued.code, 0, issued.err);
  const files = DevCa.open(dir).identityFiles("auth.ashchan.local");
  const before = {
    cert: new X509Certificate(readFileSync(files.cert)),
    key: readFileSync(files.key, "utf8"),
    certInode: statSync(files.cert).ino,
    keyInode: statSync(files.key).ino,
  };

  const rotated = await certs(["rotate", "auth.ashchan.local", "--dir", dir]);
  t.equal(rotated.code, 0, rotated.err);
  t.match(rotated.out, /^rotated auth\.ashchan\.local {2}serial [0-9a-f]+/);
  t.match(rotated.out, new RegExp(`replaced serial ${before.cert.serialNumber.toLowerCase()}`));
  t.match(rotated.out, /if its key leaked, also run `ashmesh certs revoke [0-9a-f]+ --dir /);

  const after = new X509Certificate(readFileSync(files.cert));
  t.not(after.serialNumber, before.cert.serialNumber, "a new serial");
  t.not(readFileSync(files.key, "utf8"), before.key, "a new key");
  t.ok(after.checkPrivateKey((await import("node:crypto")).createPrivateKey(readFileSync(files.key))), "that matches");
  t.equal(after.subjectAltName, before.cert.subjectAltName, `the same SANs (${after.subjectAltName})`);
  t.equal(after.subject, before.cert.subject);
  t.equal(Date.parse(after.validTo) - Date.parse(after.validFrom), 30 * DAY, "the same 30-day lifetime");
  t.not(statSync(files.cert).ino, before.certInode, "the certificate was renamed into place");
  t.not(statSync(files.key).ino, before.keyInode, "so was the key");
  t.equal(statSync(files.key).mode & 0o777, 0o600, "key 0600");
  t.equal(statSync(files.cert).mode & 0o777, 0o644, "certificate 0644");
  t.same(readdirSync(files.dir).sort(), ["server.crt", "server.key"], "no temporary file is left beside them");

  const ca = DevCa.open(dir);
  const records = ca.records.filter((r) => r.name === "auth.ashchan.local");
  t.equal(records.length, 2);
  t.match(records[0], { superseded: true, revokedAt: null }, "the old one is superseded, not revoked");
  t.match(records[1], { superseded: false, revokedAt: null, ip: ["127.0.0.1", "::1"] });
  if (hasOpenssl) {
    const verify = await openssl(["verify", "-CAfile", files.ca, "-crl_check", "-CRLfile", files.crl, files.cert]);
    t.equal(verify.code, 0, `openssl verify: ${verify.out}${verify.err}`);
  }

  const longer = await certs(["rotate", "auth.ashchan.local", "--days", "90", "--rsa", "--dir", dir]);
  t.equal(longer.code, 0, longer.err);
  const rsa = new X509Certificate(readFileSync(files.cert));
  t.equal(Date.parse(rsa.validTo) - Date.parse(rsa.validFrom), 90 * DAY, "--days overrides the lifetime");
  t.equal(rsa.publicKey.asymmetricKeyType, "rsa", "--rsa the key type");
  const again = await certs(["rotate", "auth.ashchan.local", "--dir", dir]);
  t.equal(
    new X509Certificate(readFileSync(files.cert)).publicKey.asymmetricKeyType,
    "rsa",
    `without --rsa the key type stays (${again.err})`,
  );
});

t.test("a revoked certificate can be rotated: the new one is not revoked", async (t) => {
  const dir = tempDir(t);
  const ca = await DevCa.init(dir);
  await ca.issue("media.ashchan.local");
  await ca.revoke("media.ashchan.local");
  const r = await certs(["rotate", "media.ashchan.local", "--dir", dir]);
  t.equal(r.code, 0, r.err);
  t.match(DevCa.open(dir).latest("media.ashchan.local"), { revokedAt: null, superseded: false });
  if (hasOpenssl) {
    const f = ca.identityFiles("media.ashchan.local");
    const verify = await openssl(["verify", "-CAfile", f.ca, "-crl_check", "-CRLfile", f.crl, f.cert]);
    t.equal(verify.code, 0, `${verify.out}${verify.err}`);
  }
});

t.test("rotate refuses what it cannot do, with exit code 2 and the next step", async (t) => {
  const dir = tempDir(t);
  await DevCa.init(dir);
  const unknown = await certsCli(["rotate", "nobody.ashchan.local", "--dir", dir]);
  t.equal(unknown.code, 2, "the real command exits 2");
  t.match(
    unknown.err,
    /nobody\.ashchan\.local: no certificate of that name in .*index\.json; issue one with `ashmesh certs issue nobody\.ashchan\.local`/,
  );
  const none = await certs(["rotate", "--dir", dir]);
  t.equal(none.code, 2);
  t.match(none.err, /takes one NAME/);
  const phase = await certs(["rotate", "auth.ashchan.local", "--phase", "begin", "--dir", dir]);
  t.equal(phase.code, 2);
  t.match(phase.err, /--phase belongs to `ashmesh certs rotate ca` only/);
  const days = await certs(["rotate", "auth.ashchan.local", "--days", "0", "--dir", dir]);
  t.equal(days.code, 2);
  t.match(days.err, /--days=0/);
});

t.test(
  "rotate keeps the owner of the files it replaces, so a sidecar running as another user can still read its key",
  { skip: process.getuid?.() === 0 ? false : "needs root to give files to another user" },
  async (t) => {
    const dir = tempDir(t);
    t.equal((await certs(["init", "--dir", dir])).code, 0);
    t.equal((await certs(["issue", "auth.ashchan.local", "--dir", dir])).code, 0);
    const files = DevCa.open(dir).identityFiles("auth.ashchan.local");
    // What the Podman mesh does: the container's user 10001 owns its identity files.
    chownSync(files.key, 10001, 10001);
    chownSync(files.cert, 10001, 10001);
    const rotated = await certs(["rotate", "auth.ashchan.local", "--dir", dir]);
    t.equal(rotated.code, 0, rotated.err);
    for (const [file, mode] of [
      [files.key, 0o600],
      [files.cert, 0o644],
    ] as const) {
      const st = statSync(file);
      t.same(
        [st.uid, st.gid, st.mode & 0o777],
        [10001, 10001, mode],
        `${file}: still 10001:10001, mode ${mode.toString(8)}`,
      );
    }
  },
);
