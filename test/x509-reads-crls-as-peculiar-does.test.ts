// The sidecar reads CRLs with a small DER reader of its own (proxy/x509.ts: @peculiar/x509 costs
// a sidecar's start ~100 ms and megabytes of heap). This holds it to what @peculiar reads from the
// same bytes, for CRLs of every shape the mesh meets: the dev CA's (ECDSA), OpenSSL's `ca -gencrl`
// with RSA, RSA-PSS and Ed25519 keys, empty and with entries, serials with a leading zero byte;
// and to which CA signed each, and which CAs may sign CRLs at all (key usage cRLSign).
import { X509Certificate } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { createCrl } from "../certs-dev/pki.js";
import { allowsCrlSigning, crlSignedBy, parseCrl, peculiar, pemBlocks } from "../proxy/x509.js";
import { hasOpenssl, opensslOk, tempDir } from "./lib/certs.js";
import { pki } from "./lib/mesh.js";

/** An OpenSSL CA of the key given (`-newkey` arguments), with `ca -gencrl` set up; revokes `serials`. */
async function opensslCa(dir: string, name: string, newkey: string[], serials: string[], sigopt: string[] = []) {
  const f = (x: string) => join(dir, `${name}.${x}`);
  writeFileSync(f("index"), "");
  writeFileSync(f("crlnumber"), "01\n");
  writeFileSync(f("ext"), "[v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n");
  await opensslOk([
    "req",
    "-x509",
    ...newkey,
    "-nodes",
    "-keyout",
    f("key"),
    "-out",
    f("crt"),
    "-subj",
    `/O=Test/OU=${name}/CN=${name}-ca`,
    "-days",
    "30",
    "-extensions",
    "v3",
    "-config",
    f("ext"),
  ]);
  writeFileSync(
    f("cnf"),
    `[ca]\ndefault_ca = dev\n[dev]\ndatabase = ${f("index")}\ncrlnumber = ${f("crlnumber")}\ndefault_md = ${newkey.includes("ed25519") ? "default" : "sha256"}\ndefault_crl_days = 7\ncertificate = ${f("crt")}\nprivate_key = ${f("key")}\n`,
  );
  // Revocations go straight into the CA's database, as `openssl ca -revoke` would write them.
  const lines = serials.map(
    (s) => `R\t301231000000Z\t250101000000Z,keyCompromise\t${s.toUpperCase()}\tunknown\t/CN=x\n`,
  );
  writeFileSync(f("index"), lines.join(""));
  await opensslOk(["ca", "-config", f("cnf"), "-gencrl", "-out", f("crl"), ...sigopt]);
  return { crl: readFileSync(f("crl"), "utf8"), ca: new X509Certificate(readFileSync(f("crt"))) };
}

t.test(
  "CRLs read like @peculiar reads them, and their signers found",
  { skip: !hasOpenssl && "no openssl" },
  async (t) => {
    const x509 = await peculiar();
    const dir = tempDir(t, "ashmesh-crl-");
    const p = await pki(t);
    const devCa = p.ca.signer();
    const dev = await createCrl(devCa, {
      number: 7,
      revoked: [
        { serial: "00ff", revokedAt: new Date("2026-01-02T03:04:05Z") },
        { serial: "1234abcd", revokedAt: new Date("2026-01-02T03:04:05Z") },
      ],
    });
    const cases: Array<{ name: string; crl: string; ca: X509Certificate }> = [
      { name: "dev CA (ECDSA P-256), two entries", crl: dev, ca: new X509Certificate(devCa.certPem) },
      { name: "OpenSSL, RSA 2048, empty", ...(await opensslCa(dir, "rsa-empty", ["-newkey", "rsa:2048"], [])) },
      {
        name: "OpenSSL, RSA 2048, entries",
        ...(await opensslCa(dir, "rsa", ["-newkey", "rsa:2048"], ["0a0b", "ff00ff00ff00ff00ff"])),
      },
      {
        name: "OpenSSL, RSA-PSS signature",
        ...(await opensslCa(dir, "pss", ["-newkey", "rsa:2048"], ["77"], ["-sigopt", "rsa_padding_mode:pss"])),
      },
      { name: "OpenSSL, Ed25519", ...(await opensslCa(dir, "ed", ["-newkey", "ed25519"], ["01"])) },
    ];
    for (const c of cases) {
      const ours = await parseCrl(c.crl);
      const theirs = new x509.X509Crl(pemBlocks(c.crl, "X509 CRL")[0]?.text ?? "");
      t.equal(ours.thisUpdate.getTime(), theirs.thisUpdate.getTime(), `${c.name}: thisUpdate`);
      t.equal(ours.nextUpdate?.getTime(), theirs.nextUpdate?.getTime(), `${c.name}: nextUpdate`);
      t.same(
        [...ours.revoked].sort(),
        theirs.entries.map((e) => e.serialNumber.toLowerCase().replace(/^0+(?=.)/, "")).sort(),
        `${c.name}: revoked serials`,
      );
      t.equal(
        ours.issuer,
        `CN=${new X509Certificate(c.ca.raw).subject
          .split("\n")
          .find((l) => l.startsWith("CN="))
          ?.slice(3)},${ours.issuer.split(",").slice(1).join(",")}`,
        `${c.name}: issuer, CN first`,
      );
      t.ok(await crlSignedBy(ours, c.ca), `${c.name}: signed by its CA`);
      for (const other of cases.filter((o) => o !== c)) {
        t.notOk(await crlSignedBy(ours, other.ca), `${c.name}: not by ${other.name}'s CA`);
      }
    }
    // A CRL whose signature was tampered with is signed by nobody.
    const der = Buffer.from((await parseCrl(dev)).der);
    der[der.length - 3] = (der[der.length - 3] ?? 0) ^ 0xff;
    t.notOk(
      await crlSignedBy(await parseCrl(der), new X509Certificate(devCa.certPem)),
      "a tampered signature verifies for no CA",
    );
  },
);

t.test("which CAs may sign CRLs (key usage cRLSign)", { skip: !hasOpenssl && "no openssl" }, async (t) => {
  const x509 = await peculiar();
  const dir = tempDir(t, "ashmesh-ku-");
  const rows: Array<[string, string | null, boolean]> = [
    ["keyCertSign and cRLSign", "critical,keyCertSign,cRLSign", true],
    ["keyCertSign only", "critical,keyCertSign", false],
    ["digitalSignature, keyCertSign, cRLSign", "digitalSignature,keyCertSign,cRLSign", true],
    ["no key usage extension", null, true],
  ];
  for (const [i, [name, usage, expected]] of rows.entries()) {
    writeFileSync(
      join(dir, `${i}.ext`),
      `[v3]\nbasicConstraints=critical,CA:TRUE\n${usage ? `keyUsage=${usage}\n` : ""}`,
    );
    await opensslOk([
      "req",
      "-x509",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:P-256",
      "-nodes",
      "-keyout",
      join(dir, `${i}.key`),
      "-out",
      join(dir, `${i}.crt`),
      "-subj",
      `/CN=ku-${i}`,
      "-days",
      "1",
      "-extensions",
      "v3",
      "-config",
      join(dir, `${i}.ext`),
    ]);
    const ca = new X509Certificate(readFileSync(join(dir, `${i}.crt`)));
    const extension = new x509.X509Certificate(new Uint8Array(ca.raw)).getExtension(x509.KeyUsagesExtension);
    const peculiarSays = !extension || (extension.usages & x509.KeyUsageFlags.cRLSign) !== 0;
    t.equal(await allowsCrlSigning(ca), expected, `${name}: ${expected ? "may" : "may not"} sign CRLs`);
    t.equal(peculiarSays, expected, `${name}: @peculiar agrees`);
  }
});
