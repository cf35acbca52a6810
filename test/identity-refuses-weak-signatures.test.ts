// A certificate signed with SHA-1 (or MD5) chains and matches its key, and Node 24 even builds a
// TLS context with it, but TLS peers refuse it: every handshake would fail. The sidecar refuses it
// when it loads the identity, naming the file and the fix, rather than serving it.
import { X509Certificate } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { IdentityError, loadIdentity } from "../proxy/identity.js";
import { weakSignature } from "../proxy/x509.js";
import { hasOpenssl, NEW_P256_KEY, opensslOk } from "./lib/certs.js";
import { pki } from "./lib/mesh.js";

t.test(
  "a SHA-1-signed certificate is refused at load, naming the file",
  { skip: !hasOpenssl && "no openssl" },
  async (t) => {
    const p = await pki(t);
    const good = await p.identity("auth.ashchan.local");
    t.equal(weakSignature(new X509Certificate(readFileSync(good.cert))), null, "the dev CA signs with SHA-256");

    const dir = p.dir;
    const caFiles = p.ca.caFiles(p.ca.active);
    writeFileSync(join(dir, "ext"), "subjectAltName=DNS:auth.ashchan.local\nextendedKeyUsage=serverAuth,clientAuth\n");
    await opensslOk(
      ["req", ...NEW_P256_KEY, "-keyout", "weak.key", "-out", "weak.csr", "-subj", "/CN=auth.ashchan.local"],
      {
        cwd: dir,
      },
    );
    for (const digest of ["sha1", "sha256"]) {
      await opensslOk(
        [
          ...["x509", "-req", `-${digest}`, "-in", "weak.csr", "-CA", caFiles.cert, "-CAkey", caFiles.key],
          ...["-set_serial", "0x51", "-days", "10", "-extfile", "ext", "-out", `${digest}.crt`],
        ],
        { cwd: dir },
      );
    }
    t.equal(weakSignature(new X509Certificate(readFileSync(join(dir, "sha1.crt")))), "SHA-1");
    t.equal(weakSignature(new X509Certificate(readFileSync(join(dir, "sha256.crt")))), null);

    const paths = (cert: string) => ({
      cert,
      key: join(dir, "weak.key"),
      clientCert: cert,
      clientKey: join(dir, "weak.key"),
      ca: p.trust.ca,
      crl: null,
    });
    const sha1 = join(dir, "sha1.crt");
    const refused = await loadIdentity(paths(sha1), { dnsName: "auth.ashchan.local" }).then(
      () => null,
      (err: unknown) => err,
    );
    t.ok(refused instanceof IdentityError, "refused with an IdentityError");
    t.equal((refused as IdentityError).file, sha1, "naming the file");
    t.match((refused as IdentityError).message, /signed with SHA-1, which TLS peers refuse: reissue it with SHA-256/);
    const loaded = await loadIdentity(paths(join(dir, "sha256.crt")), { dnsName: "auth.ashchan.local" });
    t.equal(loaded.server.summary.serial, "51", "the same certificate signed with SHA-256 loads");
  },
);
