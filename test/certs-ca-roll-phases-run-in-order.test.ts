// `ashmesh certs rotate ca --phase begin|switch|finish`: what each phase writes (checked with
// openssl), that each refuses to run out of order and names the phase that comes next, that
// revocations during the overlap land on the CRL of the CA that issued the certificate, and that
// an interrupted switch is caught and can be run again.
import { X509Certificate } from "node:crypto";
import { copyFileSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { DevCa } from "../certs-dev/store.js";
import { certs, certsCli, hasOpenssl, openssl, pemBlocks, tempDir } from "./lib/certs.js";

const roll = (dir: string, phase: string) => certs(["rotate", "ca", "--phase", phase, "--dir", dir]);

/** Each CRL of trust/ca.crl through `openssl crl -text` (it reads only the first block of a file). */
async function crlTexts(dir: string, work: string): Promise<string[]> {
  const out: string[] = [];
  for (const [i, block] of pemBlocks(readFileSync(DevCa.paths(dir).trustCrl, "utf8"), "X509 CRL").entries()) {
    const file = join(work, `crl-${i}.pem`);
    writeFileSync(file, block);
    const r = await openssl(["crl", "-in", file, "-noout", "-text", "-CAfile", DevCa.paths(dir).trustCa]);
    out.push(r.out + r.err);
  }
  return out;
}

async function verify(dir: string, cert: string, caFile = DevCa.paths(dir).trustCa) {
  const p = DevCa.paths(dir);
  const r = await openssl(["verify", "-CAfile", caFile, "-crl_check_all", "-CRLfile", p.trustCrl, cert]);
  return { code: r.code, text: r.out + r.err };
}

t.test("the three phases, checked with openssl", { skip: !hasOpenssl && "openssl is not installed" }, async (t) => {
  const work = tempDir(t);
  const dir = join(work, "pki");
  const p = DevCa.paths(dir);
  const ca = await DevCa.init(dir);
  for (const name of ["auth.ashchan.local", "gateway.ashchan.local"]) await ca.issue(name);
  const old = ca.active;
  const oldCaFile = join(work, "old-ca.crt");
  copyFileSync(p.caCert, oldCaFile);
  const oldAuth = join(work, "old-auth.crt");
  copyFileSync(ca.identityFiles("auth.ashchan.local").cert, oldAuth);

  // Out of order before anything began.
  for (const phase of ["switch", "finish"]) {
    const r = await certsCli(["rotate", "ca", "--phase", phase, "--dir", dir]);
    t.equal(r.code, 2, `${phase} first: exit 2`);
    t.match(r.err, /no CA roll is in progress; start one with `ashmesh certs rotate ca --phase begin --dir /);
  }
  const noPhase = await certs(["rotate", "ca", "--dir", dir]);
  t.equal(noPhase.code, 2);
  t.match(noPhase.err, /takes --phase begin, switch or finish, in that order\nno CA roll is in progress/);

  // begin
  const begin = await roll(dir, "begin");
  t.equal(begin.code, 0, begin.err);
  t.match(begin.out, /^CA roll, phase 1 of 3 \(begin\) done\./);
  t.match(begin.out, /wait until every sidecar trusts both CAs/);
  t.match(begin.out, /curl -s http:\/\/ADMIN\/status \| jq -r '\.identity\.ca\[\]\.serial'/);
  t.match(begin.out, /Then run: ashmesh certs rotate ca --phase switch --dir /);
  const afterBegin = DevCa.open(dir);
  const next = afterBegin.cas.find((c) => c.status === "next");
  t.ok(next, "the index has a next CA");
  t.match(afterBegin.cas, [{ serial: old.serial, status: "active" }, { status: "next" }]);
  t.equal(readFileSync(p.caCert, "utf8"), readFileSync(oldCaFile, "utf8"), "the old CA still signs (ca/ca.crt)");
  t.equal(statSync(join(dir, "ca", old.serial, "ca.key")).mode & 0o777, 0o600, "a copy of the old CA is kept, 0600");
  t.equal(statSync(join(dir, "ca", next?.serial ?? "", "ca.key")).mode & 0o777, 0o600, "the new CA's key is 0600");
  t.equal(statSync(p.trustCa).mode & 0o777, 0o644);
  t.equal(pemBlocks(readFileSync(p.trustCa, "utf8"), "CERTIFICATE").length, 2, "trust/ca.crt: old + new");
  const crlsBegin = await crlTexts(dir, work);
  t.equal(crlsBegin.length, 2, "trust/ca.crl: one CRL per CA");
  t.match(crlsBegin[0], /Issuer: O = ashmesh development CA, CN = ashchan-ca\n/);
  t.match(crlsBegin[1], /Issuer: O = ashmesh development CA, OU = generation 2, CN = ashchan-ca\n/);
  for (const text of crlsBegin) t.match(text, /verify OK/, "each CRL verifies against the bundle");
  t.equal((await verify(dir, oldAuth)).code, 0, "old certificates verify against the bundle, CRLs checked");
  t.equal((await roll(dir, "begin")).code, 2, "begin twice: refused");
  t.match(
    (await roll(dir, "begin")).err,
    /a CA roll is already in progress: phase begin is done; the next phase is switch/,
  );
  const early = await roll(dir, "finish");
  t.equal(early.code, 2);
  t.match(early.err, /cannot finish yet: phase switch comes first: `ashmesh certs rotate ca --phase switch --dir /);
  // Issued during the overlap: still by the old CA.
  t.equal((await certs(["issue", "media.ashchan.local", "--dir", dir])).code, 0);
  const media = DevCa.open(dir).identityFiles("media.ashchan.local").cert;
  t.equal((await verify(dir, media, oldCaFile)).code, 0, "a certificate issued after begin is the old CA's");

  // switch
  const sw = await roll(dir, "switch");
  t.equal(sw.code, 0, sw.err);
  t.match(sw.out, /^CA roll, phase 2 of 3 \(switch\): the new CA signs from now on/);
  for (const name of ["auth", "gateway", "media"])
    t.match(sw.out, new RegExp(`reissued ${name}\\.ashchan\\.local: serial \\w+ → \\w+ \\(new CA\\)`));
  t.match(sw.out, /wait until every sidecar presents a certificate of the new CA/);
  t.match(sw.out, /Then run: ashmesh certs rotate ca --phase finish --dir /);
  const afterSwitch = DevCa.open(dir);
  t.match(afterSwitch.cas, [
    { serial: old.serial, status: "previous" },
    { serial: next?.serial, status: "active" },
  ]);
  t.equal(
    new X509Certificate(readFileSync(p.caCert)).serialNumber.toLowerCase(),
    next?.serial,
    "ca/ca.crt is the new CA",
  );
  const newCaFile = join(work, "new-ca.crt");
  copyFileSync(p.caCert, newCaFile);
  for (const name of ["auth.ashchan.local", "gateway.ashchan.local", "media.ashchan.local"]) {
    const cert = afterSwitch.identityFiles(name).cert;
    t.equal((await verify(dir, cert, newCaFile)).code, 0, `${name} is the new CA's`);
    t.equal((await verify(dir, cert)).code, 0, `${name} verifies against the bundle, CRLs checked`);
  }
  t.equal((await verify(dir, oldAuth)).code, 0, "the old certificates still do");
  const twice = await roll(dir, "switch");
  t.equal(twice.code, 2);
  t.match(
    twice.err,
    /cannot switch again: phase switch is done; the next phase is finish: `ashmesh certs rotate ca --phase finish/,
  );

  // Revocations during the overlap land on the CRL of the issuing CA.
  const oldSerial = new X509Certificate(readFileSync(oldAuth)).serialNumber;
  const newGateway = afterSwitch.latest("gateway.ashchan.local")?.serial ?? "";
  t.equal((await certs(["revoke", oldSerial, "--dir", dir])).code, 0);
  t.equal((await certs(["revoke", newGateway, "--dir", dir])).code, 0);
  const [oldCrl, newCrl] = await crlTexts(dir, work);
  t.match(oldCrl, new RegExp(`Serial Number: ${oldSerial}`), "the old certificate is on the old CA's CRL");
  t.notMatch(oldCrl, new RegExp(newGateway.toUpperCase()));
  t.match(newCrl, new RegExp(`Serial Number: ${newGateway.toUpperCase()}`), "the new one on the new CA's CRL");
  t.notMatch(newCrl, new RegExp(oldSerial));
  t.match((await verify(dir, oldAuth)).text, /certificate revoked/, "openssl refuses the revoked old certificate");
  t.match(
    (await verify(dir, afterSwitch.identityFiles("gateway.ashchan.local").cert)).text,
    /certificate revoked/,
    "and the revoked new one",
  );
  const reissue = await certs(["rotate", "gateway.ashchan.local", "--dir", dir]);
  t.equal(reissue.code, 0, reissue.err);

  // finish
  const fin = await roll(dir, "finish");
  t.equal(fin.code, 0, fin.err);
  t.match(fin.out, /^CA roll, phase 3 of 3 \(finish\) done\./);
  t.match(fin.out, new RegExp(`retired CN=ashchan-ca,O=ashmesh development CA, serial ${old.serial}`));
  t.match(fin.out, /trusts only the new CA/);
  const afterFinish = DevCa.open(dir);
  t.match(afterFinish.cas, [
    { serial: old.serial, status: "retired" },
    { serial: next?.serial, status: "active" },
  ]);
  t.equal(readFileSync(p.trustCa, "utf8"), readFileSync(newCaFile, "utf8"), "trust/ca.crt: the new CA only");
  const crlsFinish = await crlTexts(dir, work);
  t.equal(crlsFinish.length, 1, "trust/ca.crl: the new CA's CRL only");
  t.match(crlsFinish[0], /OU = generation 2/);
  t.match(crlsFinish[0], new RegExp(`Serial Number: ${newGateway.toUpperCase()}`), "still listing what it revoked");
  t.ok(statSync(join(dir, "ca", old.serial, "ca.key")).isFile(), "the retired CA's key is kept");
  t.equal((await verify(dir, media)).code, 0, "current certificates verify");
  const stale = await verify(dir, oldAuth);
  t.match(stale.text, /unable to get local issuer certificate/, "certificates of the retired CA no longer do");
  const after = await roll(dir, "finish");
  t.equal(after.code, 2);
  t.match(after.err, /cannot finish: no CA roll is in progress; start one with/);

  // Life goes on: renew and a second roll.
  t.match((await certs(["renew", "--dir", dir])).out, /^nothing due/);
  const second = await roll(dir, "begin");
  t.equal(second.code, 0, second.err);
  t.match(second.out, /OU=generation 3/);
});

t.test("finish refuses while a current certificate is still the old CA's", async (t) => {
  const dir = tempDir(t);
  const ca = await DevCa.init(dir);
  await ca.issue("auth.ashchan.local");
  t.equal((await roll(dir, "begin")).code, 0);
  // A switch that stopped after the CA switched, before every certificate was reissued.
  const store = DevCa.open(dir);
  store.update((index) => {
    for (const c of index.cas) c.status = c.status === "active" ? "previous" : "active";
  });
  const next = store.active;
  copyFileSync(join(dir, "ca", next.serial, "ca.key"), DevCa.paths(dir).caKey);
  copyFileSync(join(dir, "ca", next.serial, "ca.crt"), DevCa.paths(dir).caCert);
  const fin = await roll(dir, "finish");
  t.equal(fin.code, 2);
  t.match(
    fin.err,
    /auth\.ashchan\.local: still signed by the old CA, whose trust finish would end; run `ashmesh certs rotate ca --phase switch/,
  );
  const resume = await roll(dir, "switch");
  t.equal(resume.code, 0, resume.err);
  t.match(resume.out, /switch\), again: 1 certificate\(s\) still to reissue\.\n +reissued auth\.ashchan\.local/);
  t.equal((await roll(dir, "finish")).code, 0);
});

t.test("a switch interrupted between ca/ca.key and the index is caught, and runs again", async (t) => {
  const dir = tempDir(t);
  const ca = await DevCa.init(dir);
  await ca.issue("auth.ashchan.local");
  t.equal((await roll(dir, "begin")).code, 0);
  const next = DevCa.open(dir).cas.find((c) => c.status === "next");
  // As if switch stopped right after writing the new key: ca.key new, ca.crt and index old.
  copyFileSync(join(dir, "ca", next?.serial ?? "", "ca.key"), DevCa.paths(dir).caKey);
  const issue = await certs(["issue", "media.ashchan.local", "--dir", dir]);
  t.equal(issue.code, 2, "nothing is signed with a mixed pair");
  t.match(
    issue.err,
    /are not the active CA of .*index\.json .*: a CA roll was interrupted; run `ashmesh certs rotate ca --phase switch --dir .*` again/,
  );
  const sw = await roll(dir, "switch");
  t.equal(sw.code, 0, sw.err);
  t.equal((await certs(["issue", "media.ashchan.local", "--dir", dir])).code, 0, "after it, the CA signs again");
});
