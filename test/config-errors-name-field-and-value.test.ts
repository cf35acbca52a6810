// A bad value stops the start with a message naming the field, the value and what is expected,
// and exit code 2; the seed's environment variables override the file.
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { ConfigError, loadConfig, parseConfig } from "../config/load.js";

const base = { service: { name: "auth-accounts", dnsName: "auth.ashchan.local" } };

function message(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    if (err instanceof ConfigError) return err.message;
    throw err;
  }
  throw new Error("expected a ConfigError");
}

t.test("defaults follow DESIGN §3", async (t) => {
  const c = parseConfig(base);
  t.same(c.inbound.listen, { host: "0.0.0.0", port: 8443 });
  t.equal(c.inbound.verifyClient, true);
  t.equal(c.tls.minVersion, "TLSv1.3");
  t.same(c.tls.ciphers, ["TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]);
  t.equal(c.tls.clientCert, c.tls.cert, "client cert defaults to the server cert");
  t.same(c.outbound.listen, { host: "127.0.0.1", port: 15001 }, "outbound on loopback by default");
  t.same(c.outbound.destinations, ["*.ashchan.local"], "destinations default to the service's own domain");
  t.equal(c.inbound.allow, undefined);
  t.equal(c.limits.drainTimeoutMs, 15000);
});

t.test("unknown keys are named, with their section", async (t) => {
  t.match(
    message(() => parseConfig({ ...base, inbound: { allw: [] } })),
    /unknown key "inbound\.allw"/,
  );
  t.match(
    message(() => parseConfig({ ...base, tsl: {} })),
    /unknown key "tsl"/,
  );
});

t.test("bad values name the field, the value and what is expected", async (t) => {
  t.match(
    message(() => parseConfig({ ...base, inbound: { listen: "0.0.0.0:99999" } })),
    /inbound\.listen="0\.0\.0\.0:99999" is not valid: expected "host:port"/,
  );
  t.match(
    message(() => parseConfig({ ...base, tls: { minVersion: "TLSv1.1" } })),
    /tls\.minVersion="TLSv1\.1" is not valid/,
  );
  t.match(
    message(() => parseConfig({ ...base, tls: { ciphers: ["RC4-MD5-NOPE"] } })),
    /tls\.ciphers\.0="RC4-MD5-NOPE" is not valid: expected a cipher suite/,
  );
  t.match(
    message(() => parseConfig({ ...base, inbound: { allow: ["*.*.x"] } })),
    /inbound\.allow\.0="\*\.\*\.x" is not valid/,
  );
  t.match(
    message(() => parseConfig({ ...base, limits: { drainTimeoutMs: 0 } })),
    /limits\.drainTimeoutMs=0 is not valid/,
  );
  t.match(
    message(() => parseConfig({ service: { name: "a" } })),
    /service\.dnsName is required/,
  );
  t.match(
    message(() => parseConfig({ ...base, tls: { minVersion: "TLSv1.2" } })),
    /every cipher is a TLS 1\.3 suite/,
  );
});

t.test("the outbound listener cannot bind beyond loopback", async (t) => {
  t.match(
    message(() => parseConfig({ ...base, outbound: { listen: "0.0.0.0:15001" } })),
    /must bind to a loopback address/,
  );
  t.match(
    message(() =>
      parseConfig({
        ...base,
        outbound: { upstreams: { auth: { listen: "10.0.0.1:1", target: "auth.ashchan.local:8443" } } },
      }),
    ),
    /outbound\.upstreams\.auth\.listen=.*loopback/,
  );
});

t.test("the seed's environment variables override the file", async (t) => {
  const c = parseConfig(
    { ...base, inbound: { listen: "127.0.0.1:8443" } },
    {
      env: {
        SERVICE_NAME: "boards-threads-posts",
        SERVICE_DNS_NAME: "boards.ashchan.local",
        MTLS_ENABLED: "false",
        MTLS_PORT: "9443",
        MTLS_CERT_FILE: "/c.crt",
        MTLS_KEY_FILE: "/c.key",
        MTLS_CA_FILE: "/ca.crt",
        MTLS_CLIENT_CERT_FILE: "/client.crt",
        MTLS_CLIENT_KEY_FILE: "/client.key",
        MTLS_VERIFY_CLIENT: "no",
        MTLS_MIN_TLS_VERSION: "TLSv1.3",
        MTLS_CRL_FILE: "/ca.crl",
        APP_URL: "http://127.0.0.1:9503",
        LOG_LEVEL: "WARN",
        MTLS_ALLOW: "gateway.ashchan.local, *.ops.ashchan.local",
      },
    },
  );
  t.equal(c.service.name, "boards-threads-posts");
  t.equal(c.service.dnsName, "boards.ashchan.local");
  t.equal(c.inbound.enabled, false);
  t.same(c.inbound.listen, { host: "127.0.0.1", port: 9443 }, "MTLS_PORT keeps the file's host");
  t.same(
    [c.tls.cert, c.tls.key, c.tls.ca, c.tls.clientCert, c.tls.clientKey, c.tls.crl],
    ["/c.crt", "/c.key", "/ca.crt", "/client.crt", "/client.key", "/ca.crl"],
  );
  t.equal(c.inbound.verifyClient, false);
  t.equal(c.inbound.app, "http://127.0.0.1:9503");
  t.equal(c.log.level, "warn");
  t.same(c.inbound.allow, ["gateway.ashchan.local", "*.ops.ashchan.local"]);
  t.same(parseConfig(base, { env: { MTLS_ALLOW: "" } }).inbound.allow, [], "set but empty: nobody");
});

t.test("a bad environment value is named by its variable", async (t) => {
  t.match(
    message(() => parseConfig(base, { env: { MTLS_PORT: "eighty" } })),
    /MTLS_PORT \(inbound\.listen\)="eighty" is not valid: expected a port number/,
  );
  t.match(
    message(() => parseConfig(base, { env: { MTLS_VERIFY_CLIENT: "maybe" } })),
    /MTLS_VERIFY_CLIENT \(inbound\.verifyClient\)="maybe" is not valid/,
  );
  t.match(
    message(() => parseConfig(base, { env: { APP_PROTOCOL: "h3" } })),
    /APP_PROTOCOL \(inbound\.appProtocol\)="h3" is not valid: .*"http1".*"h2c"/,
  );
  t.match(
    message(() => parseConfig(base, { env: { OUTBOUND_PEER_PROTOCOL: "http3" } })),
    /OUTBOUND_PEER_PROTOCOL \(outbound\.peerProtocol\)="http3" is not valid: .*"match".*"h2"/,
  );
  t.match(
    message(() => parseConfig(base, { env: { OUTBOUND_UPSTREAMS: '{search: {listen: "0.0.0.0:15005"}}' } })),
    /OUTBOUND_UPSTREAMS \(outbound\.upstreams\.search\.listen\)=.* is not valid: the outbound listener must bind to a loopback address/,
  );
});

t.test("APP_PROTOCOL and OUTBOUND_UPSTREAMS: a gRPC server's app, and a gRPC caller's mapped ports", async (t) => {
  const c = parseConfig(base, {
    env: {
      APP_PROTOCOL: "H2C",
      OUTBOUND_UPSTREAMS: '{search: {listen: "127.0.0.1:15005", target: "search.ashchan.local:8443"}}',
    },
  });
  t.equal(c.inbound.appProtocol, "h2c");
  t.equal(c.outbound.peerProtocol, "match", "HTTP/1.1 callers stay on HTTP/1.1 to the peer unless told");
  t.equal(parseConfig(base, { env: { OUTBOUND_PEER_PROTOCOL: "H2" } }).outbound.peerProtocol, "h2");
  t.match(c.outbound.upstreams, {
    search: { listen: { host: "127.0.0.1", port: 15005 }, target: "search.ashchan.local:8443" },
  });
  const json = parseConfig(base, {
    env: {
      OUTBOUND_UPSTREAMS: JSON.stringify({ auth: { listen: "127.0.0.1:15002", target: "auth.ashchan.local:8443" } }),
    },
  });
  t.same(Object.keys(json.outbound.upstreams), ["auth"], "JSON too");
});

t.test("files: YAML or JSON, paths relative to the file, unreadable and malformed files named", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-config-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, "a.yaml"), "service: {name: a, dnsName: a.ashchan.local}\ntls: {cert: certs/a.crt}\n");
  t.equal(loadConfig({ file: join(dir, "a.yaml") }).tls.cert, join(dir, "certs/a.crt"));
  writeFileSync(join(dir, "a.json"), JSON.stringify(base));
  t.equal(loadConfig({ file: join(dir, "a.json") }).service.name, "auth-accounts");
  writeFileSync(join(dir, "bad.yaml"), "service: [unclosed\n");
  t.match(
    message(() => loadConfig({ file: join(dir, "bad.yaml") })),
    /bad\.yaml: not valid YAML or JSON/,
  );
  writeFileSync(join(dir, "dup.yaml"), "service: {name: a, dnsName: a.b}\nservice: {name: b}\n");
  t.match(
    message(() => loadConfig({ file: join(dir, "dup.yaml") })),
    /not valid YAML/,
  );
  t.match(
    message(() => loadConfig({ file: join(dir, "missing.yaml") })),
    /missing\.yaml: cannot read the configuration file: no such file/,
  );
});

t.test("the CLI exits 2 and names the field (config) or the file (identity)", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-config-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const bad = join(dir, "bad.yaml");
  writeFileSync(bad, "service: {name: auth, dnsName: auth.ashchan.local}\ninbound: {listen: 'nope'}\n");
  const run = (args: string[], env: Record<string, string> = {}) =>
    spawnSync(process.execPath, ["--import", "tsx", "bin/ashmesh.ts", ...args], {
      encoding: "utf8",
      env: { ...process.env, ...env },
      timeout: 20_000,
    });
  const r1 = run(["proxy", "--config", bad]);
  t.equal(r1.status, 2);
  t.match(r1.stderr, /bad\.yaml:\n\s+inbound\.listen="nope" is not valid/);
  const good = join(dir, "good.yaml");
  writeFileSync(
    good,
    `service: {name: auth, dnsName: auth.ashchan.local}\ntls: {cert: ${dir}/none.crt, key: ${dir}/none.key, ca: ${dir}/ca.crt}\n`,
  );
  const r2 = run(["proxy", "--config", good]);
  t.equal(r2.status, 2);
  t.match(r2.stderr, /tls\.ca \(.*ca\.crt\): cannot read: no such file/);
  const r3 = run(["proxy", "--bogus"]);
  t.equal(r3.status, 2);
  t.match(r3.stderr, /Unknown option '--bogus'/);
  const r4 = run(["nonsense"]);
  t.equal(r4.status, 2);
});
