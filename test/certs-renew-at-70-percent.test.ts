// `ashmesh certs renew`: certificates past 70 % of their lifetime are reissued, CRLs past half of
// their window re-signed, and nothing else is touched. The decision is a pure function of the
// index, the CRLs and `now`, tested here with fixed dates; the command is tested on real files.
import { spawn } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { createCrl } from "../certs-dev/pki.js";
import { type CrlState, dueAt } from "../certs-dev/renew.js";
import { type CaRecord, DevCa, type IssuedRecord } from "../certs-dev/store.js";
import { certs, hasOpenssl, openssl, tempDir } from "./lib/certs.js";

const DAY = 86_400_000;
const T0 = new Date("2030-01-01T00:00:00Z");
const at = (days: number) => new Date(T0.getTime() + days * DAY);

function record(name: string, fields: Partial<IssuedRecord> = {}): IssuedRecord {
  return {
    name,
    serial: `${name.length}abc`,
    commonName: name,
    dns: [name],
    ip: [],
    uri: [],
    notBefore: T0.toISOString(),
    notAfter: at(10).toISOString(),
    caSerial: "ca1",
    sha256: "",
    revokedAt: null,
    superseded: false,
    ...fields,
  };
}

const ca1: CaRecord = { serial: "ca1", subject: "CN=ca", notAfter: at(3650).toISOString(), status: "active" };
const freshCrl: CrlState = { caSerial: "ca1", thisUpdate: at(0), nextUpdate: at(7) };

t.test("dueAt: a certificate is due from 70 % of its lifetime", async (t) => {
  // No CA here, so that only certificates can be due.
  const state = (records: IssuedRecord[]) => ({ records, cas: [], crls: [] });
  const a = record("a.test");
  t.same(dueAt(at(6.99), state([a])), [], "at 69.9 %: not due");
  const due = dueAt(at(7), state([a]));
  t.equal(due.length, 1, "at 70 %: due");
  t.match(due[0], { kind: "certificate", record: { name: "a.test" }, used: 0.7 });
  t.equal(dueAt(at(12), state([a])).length, 1, "an expired certificate is due too");
  t.same(dueAt(at(9), state([record("b.test", { superseded: true })])), [], "a superseded one is not");
  t.same(dueAt(at(9), state([record("c.test", { revokedAt: at(1).toISOString() })])), [], "nor a revoked one");
  t.equal(dueAt(at(5), state([a]), 0.5).length, 1, "the threshold is a parameter");
  t.same(dueAt(at(4.9), state([a]), 0.5), []);
});

t.test("dueAt: a CRL is due past half of its window, or when a trusted CA has none", async (t) => {
  const state = (cas: CaRecord[], crls: CrlState[]) => ({ records: [], cas, crls });
  t.same(dueAt(at(3.49), state([ca1], [freshCrl])), [], "at 3.49 of 7 days: not due");
  t.match(dueAt(at(3.5), state([ca1], [freshCrl])), [{ kind: "crl", ca: { serial: "ca1" } }], "at half: due");
  const ca2: CaRecord = { ...ca1, serial: "ca2", status: "next" };
  t.match(
    dueAt(at(1), state([ca1, ca2], [freshCrl])),
    [{ kind: "crl", ca: { serial: "ca2" }, reason: /no CRL/ }],
    "during a CA roll the next CA needs its own CRL",
  );
  t.same(dueAt(at(1), state([ca1, { ...ca2, status: "retired" }], [freshCrl])), [], "a retired CA needs none");
  t.match(dueAt(at(1), state([ca1], [{ ...freshCrl, nextUpdate: null }])), [{ kind: "crl" }], "no nextUpdate: due");
});

t.test("renew reissues what is due, keeps the rest, and says so", async (t) => {
  const dir = tempDir(t);
  const ca = await DevCa.init(dir);
  const old = await ca.issue("old.ashchan.local", {
    days: 10,
    notBefore: new Date(Date.now() - 8 * DAY),
    ip: ["127.0.0.1"],
  });
  const young = await ca.issue("young.ashchan.local", { days: 10 });

  const first = await certs(["renew", "--dir", dir]);
  t.equal(first.code, 0, first.err);
  const lines = first.out.trim().split("\n");
  t.equal(lines.length, 1, `one line per action: ${first.out}`);
  t.match(lines[0], /^renewed old\.ashchan\.local: 80 % of its lifetime had passed/);
  const after = DevCa.open(dir);
  const renewed = after.latest("old.ashchan.local");
  t.not(renewed?.serial, old.serial, "a new certificate");
  t.same(renewed?.ip, ["127.0.0.1"], "with the same SANs");
  t.equal(Date.parse(renewed?.notAfter ?? "") - Date.parse(renewed?.notBefore ?? ""), 10 * DAY, "and lifetime");
  t.equal(after.latest("young.ashchan.local")?.serial, young.serial, "the young one is kept");
  if (hasOpenssl) {
    const files = after.identityFiles("old.ashchan.local");
    const verify = await openssl(["verify", "-CAfile", files.ca, "-crl_check", "-CRLfile", files.crl, files.cert]);
    t.equal(verify.code, 0, `openssl verify: ${verify.out}${verify.err}`);
  }

  const second = await certs(["renew", "--dir", dir]);
  t.equal(second.code, 0);
  t.match(second.out, /^nothing due: no current certificate is past 70 % of its lifetime, no CRL past half/);

  const all = await certs(["renew", "--threshold", "0", "--dir", dir]);
  t.equal(all.out.trim().split("\n").length, 2, "--threshold 0 renews every current certificate");
});

t.test("renew re-signs a CRL past half of its window", async (t) => {
  const dir = tempDir(t);
  const ca = await DevCa.init(dir);
  await ca.issue("gone.ashchan.local");
  await ca.revoke("gone.ashchan.local");
  const serial = ca.latest("gone.ashchan.local")?.serial ?? "";
  // A CRL made four days ago, valid for seven: past half.
  const crlPath = DevCa.paths(dir).trustCrl;
  const stale = await createCrl(ca.signer(), {
    number: 1,
    thisUpdate: new Date(Date.now() - 4 * DAY),
    nextUpdateDays: 7,
    revoked: [{ serial, revokedAt: new Date() }],
  });
  writeFileSync(crlPath, stale);
  const out = await certs(["renew", "--dir", dir]);
  t.equal(out.code, 0, out.err);
  t.match(
    out.out,
    /^re-signed the CRL of CN=ashchan-ca,O=ashmesh development CA \(serial \w+\): its CRL's nextUpdate is/,
  );
  t.notMatch(out.out, /renewed/, "no certificate was due");
  if (hasOpenssl) {
    const text = await openssl(["crl", "-in", crlPath, "-noout", "-text"]);
    const next = /Next Update: (.+)/.exec(text.out)?.[1] ?? "";
    t.ok(Date.parse(next) > Date.now() + 6 * DAY, `nextUpdate is a week ahead again (${next})`);
    t.match(text.out, new RegExp(serial.toUpperCase()), "and the revoked serial is still listed");
  }
  t.match((await certs(["renew", "--dir", dir])).out, /^nothing due/);
});

t.test("renew refuses bad options with exit code 2", async (t) => {
  const dir = tempDir(t);
  await DevCa.init(dir);
  for (const args of [
    ["--threshold", "1.5"],
    ["--threshold", "abc"],
    ["--threshold", ""],
    ["--interval", "10"],
    ["--watch", "--interval", "0"],
    ["some.name"],
  ]) {
    const r = await certs(["renew", ...args, "--dir", dir]);
    t.equal(r.code, 2, `${args.join(" ")}: ${r.err}`);
  }
  const missing = await certs(["renew", "--dir", join(dir, "nothing")]);
  t.equal(missing.code, 2);
  t.match(missing.err, /no development CA in .*nothing: run `ashmesh certs init --dir/);
});

t.test("renew takes over a lock left by a process that died", async (t) => {
  const dir = tempDir(t);
  await DevCa.init(dir);
  const dead = spawn(process.execPath, ["-e", ""]);
  await new Promise((resolve) => dead.on("exit", resolve));
  writeFileSync(join(dir, "ca", ".lock"), `${dead.pid}\n`);
  const r = await certs(["renew", "--dir", dir]);
  t.equal(r.code, 0, r.err);
  t.throws(() => readFileSync(join(dir, "ca", ".lock")), "and leaves no lock behind");
});

t.test("renew --watch repeats every interval until SIGTERM", async (t) => {
  const dir = tempDir(t);
  await DevCa.init(dir);
  const child = spawn(
    process.execPath,
    ["--import", "tsx", "bin/ashmesh.ts", "certs", "renew", "--watch", "--interval", "1", "--dir", dir],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  const kill = setTimeout(() => child.kill("SIGKILL"), 20_000);
  let out = "";
  let err = "";
  child.stderr.on("data", (d) => (err += d));
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  await new Promise<void>((resolve) => {
    child.stdout.on("data", (d) => {
      out += d;
      if ((out.match(/nothing due/g) ?? []).length >= 2) resolve();
    });
    void exited.then(() => resolve());
  });
  const sent = Date.now();
  child.kill("SIGTERM");
  const code = await exited;
  clearTimeout(kill);
  t.equal(code, 0, `exit code 0 on SIGTERM: ${err}`);
  t.ok(Date.now() - sent < 5_000, "stops at once, not after the interval");
  t.match(out, /^\d{4}-\d\d-\d\dT\S+ nothing due/m, "each line carries its time");
  t.match(out, /SIGTERM: stopped/);

  const bounded = await certs(["renew", "--watch", "--interval", "1", "--runs", "2", "--dir", dir]);
  t.equal(bounded.code, 0);
  t.equal((bounded.out.match(/nothing due/g) ?? []).length, 2, "--runs bounds the loop");
});
