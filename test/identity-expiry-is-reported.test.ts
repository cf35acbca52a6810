// The seed's failure mode "certificate expiration": alerts 30 days ahead. The sidecar publishes
// days-to-expiry at scrape time, logs cert_expiring under 30 days, and warns a day before its CRL
// passes nextUpdate (after which OpenSSL would refuse every peer of that CA).
import t from "tap";
import { pki, sample, sidecar } from "./lib/mesh.js";

t.test("a certificate with 10 days left and a CRL with 12 hours left are reported", async (t) => {
  const p = await pki(t);
  await p.identity("auth.ashchan.local", { days: 10 });
  await p.ca.writeCrl(0.5);
  const auth = await sidecar(t, p, "auth.ashchan.local", { outbound: { enabled: false } });
  const expiring = auth.logs.events("cert_expiring")[0];
  t.match(expiring, { subject: "CN=auth.ashchan.local", days_left: 9 });
  const crl = auth.logs.events("crl_expiring")[0];
  t.match(crl, { level: "warn", issuer: "CN=ashchan-ca,O=ashmesh development CA" });
  const metrics = await auth.metrics();
  const days = sample(metrics, "mtls_cert_expiry_days", { cert: "server", subject: "CN=auth.ashchan.local" });
  t.ok(days > 9.9 && days <= 10, `mtls_cert_expiry_days = ${days}`);
  const crlDays = sample(metrics, "mtls_crl_next_update_days", { issuer: "CN=ashchan-ca,O=ashmesh development CA" });
  t.ok(crlDays > 0.49 && crlDays <= 0.5, `mtls_crl_next_update_days = ${crlDays}`);
});

t.test("a healthy identity logs no expiry warning", async (t) => {
  const p = await pki(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", { outbound: { enabled: false } });
  t.same(auth.logs.events("cert_expiring"), []);
  t.same(auth.logs.events("crl_expiring"), []);
});
