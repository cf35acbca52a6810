// `ashmesh check`: every check is a ✔/× line, exit 1 on any ×. --mesh passes on a healthy running
// mesh and fails, naming the service, when one sidecar stops requiring client certificates;
// --config names the file and the fix.
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { parse, stringify } from "yaml";
import { ensurePki, startLocalMesh } from "../bin/local-mesh.js";
import { loadMesh } from "../config/mesh.js";
import { ashmeshCli } from "./lib/run.js";

/** `ashmesh ARGS` as a real process, given a minute: `check --mesh` connects to every sidecar. */
const ashmesh = (args: string[]) => ashmeshCli(args, { timeoutMs: 60_000 });

/** compose/mesh.yaml on other loopback addresses (127.0.21.x), so it can run beside `up` tests. */
function testMesh(dir: string): string {
  const doc = parse(readFileSync("compose/mesh.yaml", "utf8")) as {
    services: Record<string, { local: string }>;
    tcp: Record<string, { local: string }>;
  };
  for (const s of [...Object.values(doc.services), ...Object.values(doc.tcp)])
    s.local = s.local.replace("127.0.10.", "127.0.21.");
  const file = join(dir, "mesh.yaml");
  writeFileSync(file, stringify(doc));
  return file;
}

t.test("check --mesh: √ on a healthy mesh, × naming the sidecar that accepts anonymous clients", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-check-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const meshFile = testMesh(dir);
  const mesh = loadMesh(meshFile);
  const pki = join(dir, "pki");
  mkdirSync(join(dir, "logs"));
  await ensurePki(mesh, pki, () => undefined);

  const healthy = await startLocalMesh(mesh, pki, { logDir: join(dir, "logs") });
  const ok = await ashmesh(["check", "--mesh", meshFile, "--dir", pki]);
  await healthy.stop();
  t.equal(ok.code, 0, ok.code === 0 ? "exit 0" : ok.out + ok.err);
  t.match(ok.out, /√ gateway → auth: TLS with auth\.ashchan\.local verified, gateway\.ashchan\.local allowed/);
  t.match(ok.out, /√ boards → moderation/);
  // search's app speaks h2c (it serves gRPC): check's HTTP/1.1 probe still gets its answer.
  t.match(
    ok.out,
    /√ boards → search: TLS with search\.ashchan\.local verified, boards\.ashchan\.local allowed \(HTTP 200\)/,
  );
  t.match(ok.out, /√ auth: a client without a certificate is refused/);
  t.match(ok.out, /√ auth: boards \(not a caller\) gets 403/);
  t.match(ok.out, /Status check results are √/);
  t.notMatch(ok.out, /×/);

  const broken = await startLocalMesh(mesh, pki, {
    logDir: join(dir, "logs"),
    adjust: (key, input) => (key === "auth" ? { ...input, inbound: { ...input.inbound, verifyClient: false } } : input),
  });
  const bad = await ashmesh(["check", "--mesh", meshFile, "--dir", pki]);
  await broken.stop();
  t.equal(bad.code, 1);
  t.match(bad.out, /× auth: auth\.ashchan\.local:8443 answered HTTP \d+ to a client without a certificate/);
  t.match(bad.out, /see: the sidecar of auth does not require client certificates: set MTLS_VERIFY_CLIENT=true/);
  t.match(bad.out, /√ boards: a client without a certificate is refused/, "the others still pass");

  const down = await ashmesh(["check", "--mesh", meshFile, "--dir", pki, "--timeout", "500"]);
  t.equal(down.code, 1, "nothing running: every edge fails");
  t.match(down.out, /× gateway → auth: no TLS handshake with auth\.ashchan\.local:8443/);
});

t.test("check --config: files, permissions, SAN, EKU, CRL freshness", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-check-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const pki = join(dir, "pki");
  const mesh = loadMesh(testMesh(dir));
  await ensurePki(mesh, pki, () => undefined);
  const config = join(dir, "auth.yaml");
  const write = (extra: Record<string, unknown> = {}) =>
    writeFileSync(
      config,
      stringify({
        service: { name: "auth-accounts", dnsName: "auth.ashchan.local" },
        tls: {
          cert: `${pki}/auth.ashchan.local/server.crt`,
          key: `${pki}/auth.ashchan.local/server.key`,
          ca: `${pki}/trust/ca.crt`,
          crl: `${pki}/trust/ca.crl`,
        },
        inbound: { allow: ["gateway.ashchan.local"] },
        ...extra,
      }),
    );
  write();
  const ok = await ashmesh(["check", "--config", config]);
  t.equal(ok.code, 0, ok.code === 0 ? "exit 0" : ok.out);
  for (const line of [
    /√ configuration is valid/,
    /√ key matches the certificate/,
    /√ certificate chains to a CA in tls\.ca/,
    /√ SAN includes service\.dnsName auth\.ashchan\.local/,
    /√ EKU allows serverAuth and clientAuth/,
    /√ CRL of CN=ashchan-ca.* is fresh/,
    /√ key .* is private \(mode 0600\)/,
  ]) {
    t.match(ok.out, line);
  }

  chmodSync(`${pki}/auth.ashchan.local/server.key`, 0o644);
  write({ service: { name: "auth-accounts", dnsName: "boards.ashchan.local" }, inbound: { verifyClient: false } });
  const bad = await ashmesh(["check", "--config", config]);
  t.equal(bad.code, 1);
  // The sidecar's own validator speaks here: the same words as its identity_warning and refusal.
  t.match(
    bad.out,
    /× tls\.key \(.*server\.key\): the private key is readable by group or others \(mode 0644\)\n\s+see: run chmod 600/,
  );
  t.match(
    bad.out,
    /× tls\.cert \(.*server\.crt\): no DNS SAN for service\.dnsName boards\.ashchan\.local \(the certificate names: auth\.ashchan\.local\)/,
  );
  t.match(bad.out, /× inbound\.verifyClient is false/);
  t.match(bad.out, /× inbound\.allow is not set/);
});
