// `ashmesh certs issue-all --mesh FILE`: one certificate per service and TCP server of the mesh
// file, the CA made (with the mesh's caName) when missing; run again it keeps what is current and
// issues only what is missing, expired or revoked; it never overwrites files it did not make.
import { X509Certificate } from "node:crypto";
import { mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { DevCa } from "../certs-dev/store.js";
import { loadMesh } from "../config/mesh.js";
import { certs, certsCli, hasOpenssl, openssl, tempDir } from "./lib/certs.js";

const MESH = "compose/mesh.yaml";

t.test("issue-all makes the CA and every service's certificate, then is idempotent", async (t) => {
  const dir = join(tempDir(t), "pki");
  const mesh = loadMesh(MESH);
  const names = [...mesh.services, ...mesh.tcp].map((s) => s.dnsName);

  const first = await certsCli(["issue-all", "--mesh", MESH, "--dir", dir]);
  t.equal(first.code, 0, `the real command: ${first.err}`);
  t.match(first.out, new RegExp(`^created CA CN=${mesh.caName},O=ashmesh development CA \\(serial \\w+\\) in ${dir}`));
  for (const name of names)
    t.match(first.out, new RegExp(`^issued ${name.replaceAll(".", "\\.")} \\(it has none\\)`, "m"));
  const ca = DevCa.open(dir);
  for (const name of names) {
    const f = ca.identityFiles(name);
    const cert = new X509Certificate(readFileSync(f.cert));
    t.match(cert.subjectAltName, `DNS:${name}`, `${name}: its DNS SAN`);
    t.equal(statSync(f.key).mode & 0o777, 0o600, `${name}: key 0600`);
    if (hasOpenssl) {
      const verify = await openssl(["verify", "-CAfile", f.ca, "-crl_check", "-CRLfile", f.crl, f.cert]);
      t.equal(verify.code, 0, `openssl verify ${name}: ${verify.err}`);
    }
  }
  const serials = names.map((n) => ca.latest(n)?.serial);

  const second = await certs(["issue-all", "--mesh", MESH, "--dir", dir]);
  t.equal(second.code, 0, second.err);
  t.notMatch(second.out, /created|issued/, "second run: nothing made");
  t.equal((second.out.match(/^kept {3}/gm) ?? []).length, names.length, "every certificate kept");
  t.same(
    names.map((n) => DevCa.open(dir).latest(n)?.serial),
    serials,
    "with the same serials",
  );

  // One expired, one revoked, one whose files were lost.
  const store = DevCa.open(dir);
  await store.issue("auth.ashchan.local", { days: 1, notBefore: new Date(Date.now() - 3 * 86_400_000), replace: true });
  await store.revoke("media.ashchan.local");
  rmSync(store.identityFiles("search.ashchan.local").key);
  const third = await certs(["issue-all", "--mesh", MESH, "--dir", dir]);
  t.equal(third.code, 0, third.err);
  t.match(third.out, /^issued auth\.ashchan\.local \(serial \w+ expired on /m);
  t.match(third.out, /^issued media\.ashchan\.local \(serial \w+ is revoked\)/m);
  t.match(third.out, /^issued search\.ashchan\.local \(.*server\.key is missing\)/m);
  t.equal((third.out.match(/^kept {3}/gm) ?? []).length, names.length - 3, "the others kept");
  const auth = new X509Certificate(readFileSync(store.identityFiles("auth.ashchan.local").cert));
  t.ok(Date.parse(auth.validTo) > Date.now() + 300 * 86_400_000, "a reissued certificate gets the default year");
});

t.test("issue-all uses the mesh's caName, and never overwrites files it did not make", async (t) => {
  const base = tempDir(t);
  const dir = join(base, "pki");
  const file = join(base, "mesh.yaml");
  writeFileSync(
    file,
    [
      "domain: shop.test",
      "caName: shop-ca",
      "entry: { service: web, path: / }",
      "services:",
      "  web: { serviceName: web, appPort: 9601, local: 127.0.20.1, calls: [{ to: api, path: /v1 }] }",
      "  api: { serviceName: api, appPort: 9602, local: 127.0.20.2 }",
      "",
    ].join("\n"),
  );
  // A certificate someone put there by hand, unknown to the index.
  const foreign = join(dir, "api.shop.test", "server.crt");
  mkdirSync(join(dir, "api.shop.test"), { recursive: true });
  writeFileSync(foreign, "not ours\n");
  const r = await certs(["issue-all", "--mesh", file, "--days", "30", "--dir", dir]);
  t.equal(r.code, 2, "refused");
  t.match(r.err, /api\.shop\.test\/server\.crt already exists: use `ashmesh certs rotate api\.shop\.test`/);
  t.equal(readFileSync(foreign, "utf8"), "not ours\n", "the foreign file is untouched");
  t.match(r.out, /^created CA CN=shop-ca,/, "the CA is named after the mesh's caName");
  t.match(r.out, /^issued web\.shop\.test/m, "what came before the refusal was done and said");
  t.equal(DevCa.open(dir).active.subject, "CN=shop-ca,O=ashmesh development CA");
  const web = new X509Certificate(readFileSync(join(dir, "web.shop.test", "server.crt")));
  t.equal(Math.round((Date.parse(web.validTo) - Date.parse(web.validFrom)) / 86_400_000), 30, "--days applies");
});

t.test("issue-all names the problem in its usage errors", async (t) => {
  const dir = tempDir(t);
  const none = await certs(["issue-all", "--dir", dir]);
  t.equal(none.code, 2);
  t.match(none.err, /takes --mesh FILE/);
  const missing = await certs(["issue-all", "--mesh", join(dir, "nope.yaml"), "--dir", dir]);
  t.equal(missing.code, 2);
  t.match(missing.err, /nope\.yaml: cannot read the mesh file: ENOENT/);
});
