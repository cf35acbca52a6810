// Hostile inputs, class configuration: what an operator (or a compromised deployment file) can
// hand the sidecar, and what it does: refuse to start (exit 2, naming the field and the file) or
// start with a config_warning. Each row states the answer.

import { writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { hasOpenssl } from "./lib/certs.js";
import { oddCertificate } from "./lib/hostile.js";
import { app, pki, sidecar } from "./lib/mesh.js";
import { ashmeshCli } from "./lib/run.js";
import { writeYaml } from "./lib/spawn.js";

t.test("configurations the sidecar refuses to start with", { skip: !hasOpenssl && "no openssl" }, async (t) => {
  const p = await pki(t);
  const auth = await p.identity("auth.ashchan.local");
  const own = (name: string, cert: { cert: Buffer; key: Buffer }) => {
    writeFileSync(join(p.dir, `${name}.crt`), cert.cert);
    writeFileSync(join(p.dir, `${name}.key`), cert.key, { mode: 0o600 });
    return { cert: join(p.dir, `${name}.crt`), key: join(p.dir, `${name}.key`) };
  };
  const caLeaf = own(
    "ca-leaf",
    await oddCertificate(p, { subject: "/CN=auth.ashchan.local", san: "DNS:auth.ashchan.local", ca: true }),
  );
  const weak = own(
    "weak",
    await oddCertificate(p, { subject: "/CN=auth.ashchan.local", san: "DNS:auth.ashchan.local", rsaBits: 1024 }),
  );
  const config = (extra: Record<string, unknown>, tlsFiles: { cert: string; key: string } = auth) => ({
    service: { name: "auth-accounts", dnsName: "auth.ashchan.local" },
    tls: { cert: tlsFiles.cert, key: tlsFiles.key, ca: p.trust.ca, crl: p.trust.crl },
    inbound: { listen: "127.0.0.1:0", app: "http://127.0.0.1:9" },
    outbound: { listen: "127.0.0.1:0" },
    admin: { listen: "127.0.0.1:0" },
    ...extra,
  });
  const rows: Array<{ input: string; config: Record<string, unknown>; env?: Record<string, string>; says: RegExp }> = [
    {
      input: "its own certificate is a CA certificate",
      config: config({}, caLeaf),
      says: /tls\.cert \(.*ca-leaf\.crt\): is a CA certificate \(basicConstraints CA:TRUE\)/,
    },
    {
      input: "its own key is RSA 1024",
      config: config({}, weak),
      says: /tls\.cert \(.*weak\.crt\): its key is too weak \(RSA 1024 bits is below the 2048-bit minimum\)/,
    },
    {
      input: "inbound.app carries credentials",
      config: config({ inbound: { listen: "127.0.0.1:0", app: "http://user:secret@127.0.0.1:9502" } }),
      says: /inbound\.app="http:\/\/user:secret@127\.0\.0\.1:9502" is not valid: expected http:\/\/host:port without credentials/,
    },
    {
      input: "APP_URL carries credentials",
      config: config({}),
      env: { APP_URL: "http://user:secret@127.0.0.1:9502" },
      says: /APP_URL \(inbound\.app\)=.* is not valid: expected http:\/\/host:port without credentials/,
    },
    {
      input: "outbound.resolve would redirect an upstream's identity away from its target",
      config: config({
        outbound: {
          listen: "127.0.0.1:0",
          resolve: { "auth.ashchan.local": "127.0.0.66:8443" },
          upstreams: {
            auth: { listen: "127.0.0.1:0", target: "10.0.0.9:8443", identity: "auth.ashchan.local" },
          },
        },
      }),
      says: /outbound\.resolve\.auth\.ashchan\.local and outbound\.upstreams\.auth disagree/,
    },
  ];
  for (const [i, row] of rows.entries()) {
    const file = writeYaml(join(p.dir, `bad-${i}.yaml`), row.config);
    const r = await ashmeshCli(["proxy", "--config", file], { env: row.env ?? {}, timeoutMs: 30_000 });
    t.equal(r.code, 2, `${row.input}: exit 2`);
    t.match(r.err, row.says, `${row.input}: the message names the field and the fix`);
  }
});

t.test("configurations the sidecar starts with, saying what is wrong", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  // 10.255.255.1 stands for an app on another host (nothing answers there; the warning is the point).
  const remote = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: "http://10.255.255.1:9502" },
    outbound: { enabled: false },
  });
  t.match(
    remote.logs.events("config_warning").map((l) => l.message),
    [/inbound\.app http:\/\/10\.255\.255\.1:9502 is not on loopback/],
    "a non-loopback app: warned",
  );
  const local = await sidecar(t, p, "boards.ashchan.local", {
    inbound: { app: backend.url, allow: [] },
    outbound: { enabled: false },
  });
  t.same(
    local.logs.events("config_warning").filter((l) => /not on loopback/.test(String(l.message))),
    [],
    "a loopback app: no warning",
  );
});
