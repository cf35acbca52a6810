// `ashmesh certs revoke`: by name as before, and by a serial in whatever form openssl prints it
// (`serial=ABCD…` from -serial, `ab:cd:…` from -text, any case); the CRL that results is read
// back with `openssl crl` and enforced by `openssl verify -crl_check`.
import t from "tap";
import { DevCa } from "../certs-dev/store.js";
import { certs, certsCli, hasOpenssl, openssl, tempDir } from "./lib/certs.js";

t.test(
  "revoke takes openssl's serial forms, and openssl sees the result",
  { skip: !hasOpenssl && "openssl is not installed" },
  async (t) => {
    const dir = tempDir(t);
    const ca = await DevCa.init(dir);
    const names = ["auth.ashchan.local", "boards.ashchan.local", "media.ashchan.local", "search.ashchan.local"];
    for (const name of names) await ca.issue(name);
    const file = (name: string) => ca.identityFiles(name).cert;

    // `openssl x509 -serial`: serial=UPPERCASE
    const printed = (await openssl(["x509", "-in", file("auth.ashchan.local"), "-noout", "-serial"])).out.trim();
    t.match(printed, /^serial=[0-9A-F]+$/);
    // `openssl x509 -text`: lower-case pairs with colons, on their own line
    const text = (await openssl(["x509", "-in", file("boards.ashchan.local"), "-noout", "-text"])).out;
    const colons = /Serial Number:\s*\n\s*([0-9a-f:]+)/.exec(text)?.[1] ?? "";
    t.match(colons, /^[0-9a-f]{2}(:[0-9a-f]{2})+$/);
    const upper = (ca.latest("media.ashchan.local")?.serial ?? "").toUpperCase();

    for (const [form, name] of [
      [printed, "auth.ashchan.local"],
      [colons, "boards.ashchan.local"],
      [upper, "media.ashchan.local"],
    ] as const) {
      const r = await certs(["revoke", form, "--dir", dir]);
      t.equal(r.code, 0, `${form}: ${r.err}`);
      t.match(r.out, new RegExp(`^revoked ${name.replaceAll(".", "\\.")} {2}serial `), `${form} names ${name}`);
    }

    const crl = (await openssl(["crl", "-in", ca.identityFiles("x").crl, "-noout", "-text"])).out;
    for (const name of names.slice(0, 3)) {
      const serial = DevCa.open(dir).records.find((r) => r.name === name)?.serial ?? "";
      t.match(crl, new RegExp(`Serial Number: ${serial.toUpperCase()}`), `openssl crl lists ${name}`);
    }
    t.notMatch(crl, new RegExp(ca.latest("search.ashchan.local")?.serial.toUpperCase() ?? "-"), "and not the fourth");
    const f = ca.identityFiles("auth.ashchan.local");
    const verify = await openssl(["verify", "-CAfile", f.ca, "-crl_check", "-CRLfile", f.crl, f.cert]);
    t.not(verify.code, 0);
    t.match(verify.out + verify.err, /certificate revoked/, "openssl verify refuses a revoked certificate");
    const s = ca.identityFiles("search.ashchan.local");
    t.equal((await openssl(["verify", "-CAfile", s.ca, "-crl_check", "-CRLfile", s.crl, s.cert])).code, 0);

    // By name, as before: through the real command.
    const byName = await certsCli(["revoke", "search.ashchan.local", "--dir", dir]);
    t.equal(byName.code, 0, byName.err);
    t.match(byName.out, /^revoked search\.ashchan\.local/);
    t.match(byName.out, /wrote .*trust\/ca\.crl: sidecars watching it refuse these within a second/);
  },
);

t.test("revoke says what is wrong: already revoked, or unknown", async (t) => {
  const dir = tempDir(t);
  const ca = await DevCa.init(dir);
  const r = await ca.issue("auth.ashchan.local");
  await ca.revoke("auth.ashchan.local");
  const again = await certs(["revoke", r.serial.toUpperCase().replace(/(..)(?!$)/g, "$1:"), "--dir", dir]);
  t.equal(again.code, 2);
  t.match(again.err, /: already revoked \(see `ashmesh certs inspect .*trust\/ca\.crl`\)/);
  const unknown = await certsCli(["revoke", "serial=0BADC0DE", "--dir", dir]);
  t.equal(unknown.code, 2, "the real command exits 2");
  t.match(
    unknown.err,
    /serial=0BADC0DE: no certificate of that name or serial in .*index\.json; `ashmesh certs inspect FILE` shows a certificate's serial/,
  );
  const none = await certs(["revoke", "--dir", dir]);
  t.equal(none.code, 2);
});
