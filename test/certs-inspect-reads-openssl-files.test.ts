// `ashmesh certs inspect`: what a person needs to know about a certificate, chain, CA bundle or
// CRL, read from files made by the openssl command (PEM and DER) as well as by our dev CA, and
// the same verdicts as `openssl verify` for the chain and the revocation status.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { begin } from "../certs-dev/ca-roll.js";
import { DevCa } from "../certs-dev/store.js";
import { certs, certsCli, hasOpenssl, NEW_P256_KEY, openssl, opensslOk, tempDir } from "./lib/certs.js";

const DAY = 86_400_000;

/** An openssl CA (RSA), a leaf (ECDSA P-256) with SANs and EKUs, and a CRL revoking the leaf. */
async function opensslPki(dir: string) {
  const f = (name: string) => join(dir, name);
  await opensslOk([
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-keyout",
    f("ca.key"),
    "-out",
    f("ca.crt"),
    "-days",
    "30",
    "-subj",
    "/O=Test/CN=openssl-ca",
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
  ]);
  await opensslOk([
    "req",
    ...NEW_P256_KEY,
    "-keyout",
    f("leaf.key"),
    "-out",
    f("leaf.csr"),
    "-subj",
    "/CN=svc.example.test",
  ]);
  writeFileSync(
    f("ext.cnf"),
    "subjectAltName=DNS:svc.example.test,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n",
  );
  await opensslOk([
    "x509",
    "-req",
    "-in",
    f("leaf.csr"),
    "-CA",
    f("ca.crt"),
    "-CAkey",
    f("ca.key"),
    "-set_serial",
    "0x00ab12cd34",
    "-days",
    "10",
    "-extfile",
    f("ext.cnf"),
    "-out",
    f("leaf.crt"),
  ]);
  await opensslOk(["x509", "-in", f("leaf.crt"), "-outform", "DER", "-out", f("leaf.der")]);
  writeFileSync(f("index.txt"), "");
  writeFileSync(f("crlnumber"), "1000\n");
  writeFileSync(
    f("ca.cnf"),
    `[ca]\ndefault_ca = dev\n[dev]\ndatabase = ${f("index.txt")}\ncrlnumber = ${f("crlnumber")}\ndefault_md = sha256\ndefault_crl_days = 7\n`,
  );
  const ca = ["-config", f("ca.cnf"), "-keyfile", f("ca.key"), "-cert", f("ca.crt")];
  await opensslOk(["ca", ...ca, "-gencrl", "-out", f("empty.crl")]);
  await opensslOk(["ca", ...ca, "-revoke", f("leaf.crt"), "-crl_reason", "keyCompromise"]);
  await opensslOk(["ca", ...ca, "-gencrl", "-out", f("ca.crl")]);
  return f;
}

t.test(
  "inspect reads openssl's certificate, CA and CRL",
  { skip: !hasOpenssl && "openssl is not installed" },
  async (t) => {
    const f = await opensslPki(tempDir(t));
    const serial = (await openssl(["x509", "-in", f("leaf.crt"), "-noout", "-serial"])).out.trim();
    const fingerprint = (await openssl(["x509", "-in", f("leaf.crt"), "-noout", "-fingerprint", "-sha256"])).out
      .trim()
      .split("=")[1];

    const leaf = await certsCli(["inspect", f("leaf.crt")]);
    t.equal(leaf.code, 0, `the real command: ${leaf.err}`);
    t.match(leaf.out, /^certificate 1 of 1 \(leaf\) in /);
    t.match(leaf.out, /subject: +CN=svc\.example\.test\n/);
    t.match(leaf.out, /SANs: +DNS:svc\.example\.test, IP:127\.0\.0\.1\n/);
    t.match(leaf.out, /issuer: +CN=openssl-ca,O=Test\n/);
    t.equal(serial, "serial=AB12CD34", "openssl's serial");
    t.match(leaf.out, /serial: +ab12cd34\n/, "the same serial");
    t.match(leaf.out, new RegExp(`SHA-256: +${fingerprint}\\n`), "the fingerprint openssl prints");
    t.match(leaf.out, /valid: +\S+ \S+ UTC to \S+ \S+ UTC: 9 day\(s\) left\n/);
    t.match(leaf.out, /key: +ECDSA P-256\n/);
    t.match(leaf.out, /key usage: digitalSignature\n/);
    t.match(leaf.out, /extended: +serverAuth, clientAuth\n/);
    t.match(leaf.out, /CA: +no\n/);
    t.notMatch(leaf.out, /chain|revocation/, "no checks unless asked");

    const der = await certs(["inspect", f("leaf.der")]);
    t.equal(der.code, 0);
    t.match(der.out, /serial: +ab12cd34/, "DER is read too");

    const ca = await certs(["inspect", f("ca.crt")]);
    t.match(ca.out, /^certificate 1 of 1 \(CA\)/);
    t.match(ca.out, /issuer: +CN=openssl-ca,O=Test \(self-signed\)/);
    t.match(ca.out, /key: +RSA 2048 bits/);
    t.match(ca.out, /key usage: keyCertSign, cRLSign/);
    t.match(ca.out, /CA: +yes/);

    const crl = await certs(["inspect", f("ca.crl"), "--ca", f("ca.crt")]);
    t.equal(crl.code, 0, crl.err);
    const text = (await openssl(["crl", "-in", f("ca.crl"), "-noout", "-text"])).out;
    t.match(text, /X509v3 CRL Number: \n\s+4097/, "openssl numbers it 4097");
    t.match(crl.out, /^CRL 1 of 1 in /);
    t.match(crl.out, /issuer: +CN=openssl-ca,O=Test\n/);
    t.match(crl.out, /CRL number: +4097\n/, "and so do we");
    t.match(crl.out, /next update: .*: 6 day\(s\) left\n/);
    t.match(crl.out, /revoked: +1 certificate\(s\)\n +ab12cd34 {2}on .* \(keyCompromise\)/);
    t.match(crl.out, /signed by: +CN=openssl-ca,O=Test \(serial \w+ in /);
  },
);

t.test(
  "inspect --ca and --crl give openssl verify's verdicts",
  { skip: !hasOpenssl && "openssl is not installed" },
  async (t) => {
    const f = await opensslPki(tempDir(t));
    const good = await certs(["inspect", f("leaf.crt"), "--ca", f("ca.crt"), "--crl", f("empty.crl")]);
    t.equal(good.code, 0, good.err);
    t.match(good.out, /chain: +OK: CN=svc\.example\.test → CN=openssl-ca,O=Test \(CA serial \w+ in /);
    t.match(good.out, /revocation: not revoked \(CRL of .*, signature checked\)/);
    const agree = await openssl([
      "verify",
      "-CAfile",
      f("ca.crt"),
      "-crl_check",
      "-CRLfile",
      f("empty.crl"),
      f("leaf.crt"),
    ]);
    t.equal(agree.code, 0, "openssl verify agrees");

    const revoked = await certs(["inspect", f("leaf.crt"), "--ca", f("ca.crt"), "--crl", f("ca.crl")]);
    t.equal(revoked.code, 1, "a revoked certificate fails the check: exit 1");
    t.match(revoked.out, /revocation: REVOKED on .* \(keyCompromise\) \(signature checked\)/);
    const agreeRevoked = await openssl([
      "verify",
      "-CAfile",
      f("ca.crt"),
      "-crl_check",
      "-CRLfile",
      f("ca.crl"),
      f("leaf.crt"),
    ]);
    t.not(agreeRevoked.code, 0);
    t.match(agreeRevoked.out + agreeRevoked.err, /certificate revoked/, "openssl verify agrees");

    const dev = tempDir(t);
    const devCa = await DevCa.init(dev);
    const trust = DevCa.paths(dev).trustCa;
    const foreign = await certs(["inspect", f("leaf.crt"), "--ca", trust]);
    t.equal(foreign.code, 1, "another CA's certificate fails the chain check");
    t.match(
      foreign.out,
      /chain: +FAILED: issuer CN=openssl-ca,O=Test of CN=svc\.example\.test is not in .*trust\/ca\.crt \(it holds: CN=ashchan-ca,O=ashmesh development CA\)/,
    );
    const noCrl = await certs(["inspect", f("leaf.crt"), "--ca", f("ca.crt"), "--crl", DevCa.paths(dev).trustCrl]);
    t.equal(noCrl.code, 1);
    t.match(noCrl.out, /revocation: UNKNOWN: .* has no CRL of CN=openssl-ca,O=Test/, "no CRL of the issuer: unknown");
    const crlOfOther = await certs(["inspect", f("ca.crl"), "--ca", trust]);
    t.equal(crlOfOther.code, 1);
    t.match(crlOfOther.out, /signed by: +NONE of the CAs in .*: a sidecar with that bundle refuses this CRL/);

    // Expired: made by the dev CA with a date in the past; openssl verify says the same.
    await devCa.issue("old.ashchan.local", { days: 1, notBefore: new Date(Date.now() - 3 * DAY) });
    const oldFiles = devCa.identityFiles("old.ashchan.local");
    const expired = await certs(["inspect", oldFiles.cert, "--ca", trust]);
    t.equal(expired.code, 1);
    t.match(expired.out, /valid: .*: EXPIRED 2 day\(s\) ago/);
    t.match(expired.out, /chain: +FAILED: CN=old\.ashchan\.local expired on /);
    const agreeExpired = await openssl(["verify", "-CAfile", trust, oldFiles.cert]);
    t.match(agreeExpired.out + agreeExpired.err, /certificate has expired/);
  },
);

t.test("inspect reads the dev CA's files, also two CAs and two CRLs during a CA roll", async (t) => {
  const dir = tempDir(t);
  const ca = await DevCa.init(dir);
  await ca.issue("auth.ashchan.local", { uri: ["spiffe://ashchan.local/auth"] });
  const files = ca.identityFiles("auth.ashchan.local");
  const both = join(dir, "both.pem");
  writeFileSync(both, readFileSync(files.cert, "utf8") + readFileSync(files.key, "utf8"));
  const withKey = await certs(["inspect", both]);
  t.match(withKey.out, /SANs: +DNS:auth\.ashchan\.local, URI:spiffe:\/\/ashchan\.local\/auth/);
  t.match(withKey.out, /private key: ECDSA P-256, matches CN=auth\.ashchan\.local \(the key itself is not shown\)/);
  t.notMatch(withKey.out, /BEGIN/, "no PEM is ever printed");

  await begin(DevCa.open(dir));
  const bundle = await certs(["inspect", files.ca]);
  t.match(bundle.out, /^certificate 1 of 2 \(CA\)/);
  t.match(
    bundle.out,
    /certificate 2 of 2 \(CA\)[\s\S]*subject: +CN=ashchan-ca,OU=generation 2,O=ashmesh development CA/,
  );
  const crls = await certs(["inspect", files.crl, "--ca", files.ca]);
  t.equal(crls.code, 0, crls.err);
  t.equal((crls.out.match(/^CRL \d of 2/gm) ?? []).length, 2, "one CRL per CA");
  t.equal((crls.out.match(/signed by: +CN=ashchan-ca/g) ?? []).length, 2, "each signed by a CA of the bundle");
  const chain = await certs(["inspect", files.cert, "--ca", files.ca, "--crl", files.crl]);
  t.equal(chain.code, 0, chain.err);
  t.match(chain.out, /chain: +OK: CN=auth\.ashchan\.local → CN=ashchan-ca,O=ashmesh development CA/);
  t.match(chain.out, /revocation: not revoked/);

  // @peculiar/x509 writes CRLs as "BEGIN CRL", which OpenSSL and Node do not read: say so.
  const peculiar = join(dir, "peculiar.crl");
  writeFileSync(peculiar, readFileSync(files.crl, "utf8").replaceAll("X509 CRL", "CRL"));
  t.match(
    (await certs(["inspect", peculiar])).out,
    /note: PEM block #1 is labelled CRL: OpenSSL and Node read only "X509 CRL"/,
  );
});

t.test("inspect names the file it cannot use, with exit code 2", async (t) => {
  const dir = tempDir(t);
  const missing = await certs(["inspect", join(dir, "nope.crt")]);
  t.equal(missing.code, 2);
  t.match(missing.err, /nope\.crt: cannot read it \(no such file: check the path\)/);
  writeFileSync(join(dir, "junk.txt"), "hello\n");
  const junk = await certs(["inspect", join(dir, "junk.txt")]);
  t.equal(junk.code, 2);
  t.match(junk.err, /junk\.txt: no certificate, CRL or private key in it \(PEM or DER\)/);
  const badCa = await certs(["inspect", join(dir, "junk.txt"), "--ca", join(dir, "none.crt")]);
  t.equal(badCa.code, 2);
  const none = await certs(["inspect"]);
  t.equal(none.code, 2);
  t.match(none.err, /takes one FILE/);
});
