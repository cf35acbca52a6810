// The systemd units pass `systemd-analyze verify` (which also fails on a misspelt key, a bad value
// or a missing binary, as the negative cases show), keep their hardening, tie the sidecar's
// environment to its credentials, and auth.env is the mesh's own environment for auth: loaded the
// way systemd would, with the certificate and key in a credentials directory, it starts a sidecar
// that serves the gateway and refuses anyone else.
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t, { type Test } from "tap";
import { request } from "undici";
import { ENV_VARS, parseConfig } from "../config/load.js";
import { containerSidecarEnv, loadMesh } from "../config/mesh.js";
import { app, mtlsAgent, pki } from "./lib/mesh.js";
import { at, parseEnvFile, parseUnit, run, timeSpanMs, tool, type Unit, unitValue, unitValues } from "./lib/ops.js";
import { ashmesh, portOf } from "./lib/spawn.js";

const analyze = tool("systemd-analyze", "systemd");
const DIR = at("compose/systemd");
const UNITS = [
  "ashmesh@.service",
  "ashmesh@.socket",
  "ashmesh-renew.service",
  "ashmesh-renew.timer",
  "ashmesh-acme@.service",
];
const BIN = "/usr/local/bin/ashmesh";
const REFRESH = "/usr/local/libexec/ashmesh-refresh-sidecars";
const text = (name: string) => readFileSync(join(DIR, name), "utf8");
const sidecar: Unit = parseUnit(text("ashmesh@.service"));
const renew: Unit = parseUnit(text("ashmesh-renew.service"));
const timer: Unit = parseUnit(text("ashmesh-renew.timer"));
const acmeSidecar: Unit = parseUnit(text("ashmesh-acme@.service"));
const authEnv = parseEnvFile(text("auth.env"));

type Tap = Test;

/**
 * Copies of the units in a fresh directory whose Exec paths point at executables that exist
 * there (systemd-analyze verify refuses a missing binary): a stub `ashmesh` and the real
 * refresh script. Nothing else changes. `edit` may break a copy on purpose.
 */
function copies(t: Tap, edit: (name: string, text: string) => string = (_n, s) => s): string {
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-units-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  mkdirSync(join(dir, "bin"));
  writeFileSync(join(dir, "bin", "ashmesh"), "#!/bin/sh\nexit 0\n", { mode: 0o755 });
  copyFileSync(join(DIR, "ashmesh-refresh-sidecars"), join(dir, "bin", "ashmesh-refresh-sidecars"));
  chmodSync(join(dir, "bin", "ashmesh-refresh-sidecars"), 0o755);
  for (const name of UNITS) {
    const original = text(name);
    const rewritten = original
      .replaceAll(BIN, join(dir, "bin", "ashmesh"))
      .replaceAll(REFRESH, join(dir, "bin", "ashmesh-refresh-sidecars"));
    writeFileSync(join(dir, name), edit(name, rewritten));
  }
  return dir;
}

/** systemd-analyze verify: exit 0 is not enough, it only warns about unknown keys and bad values. */
async function verify(dir: string): Promise<{ clean: boolean; output: string }> {
  const result = await run(analyze.path as string, [
    "verify",
    "--man=no",
    join(dir, "ashmesh@auth.service"),
    join(dir, "ashmesh@auth.socket"),
    join(dir, "ashmesh-renew.service"),
    join(dir, "ashmesh-renew.timer"),
    join(dir, "ashmesh-acme@auth.service"),
  ]);
  return { clean: result.code === 0 && result.output.trim() === "", output: result.output };
}

t.test("the Exec paths are the only thing the test copies change", async (t) => {
  const exec = [...unitValues(sidecar, "Service", "ExecStart"), ...unitValues(renew, "Service", "ExecStart")];
  t.ok(
    exec.every((line) => line.startsWith(`${BIN} `)),
    `ExecStart lines run ${BIN}`,
  );
  t.same(unitValues(renew, "Service", "ExecStartPost"), [REFRESH]);
  const all = UNITS.map(text).join("\n");
  const execLines = all.split("\n").filter((l) => /^Exec\w*=/.test(l));
  const otherPaths = execLines.filter(
    (l) => !l.includes(BIN) && !l.includes(REFRESH) && !l.startsWith("ExecReload=/bin/kill "),
  );
  t.same(otherPaths, [], "no other executable to stub");
});

t.test("systemd-analyze verify accepts the units", { skip: analyze.skip }, async (t) => {
  const result = await verify(copies(t));
  t.ok(result.clean, "no error and no warning", { output: result.output });
});

t.test("systemd-analyze verify catches a real mistake in a unit", { skip: analyze.skip }, async (t) => {
  const broken: Array<[string, string, (s: string) => string]> = [
    ["a misspelt key", "ashmesh@.service", (s) => s.replace(/^NoNewPrivileges=yes$/m, "NoNewPrivilege=yes")],
    ["a bad time span", "ashmesh@.service", (s) => s.replace(/^TimeoutStopSec=.*$/m, "TimeoutStopSec=soon")],
    ["a bad restart policy", "ashmesh@.service", (s) => s.replace(/^Restart=on-failure$/m, "Restart=on-falure")],
    ["a missing binary", "ashmesh@.service", (s) => s.replace(/^ExecStart=\S+/m, "ExecStart=/nonexistent/ashmesh")],
    ["a bad calendar spec", "ashmesh-renew.timer", (s) => s.replace(/^OnCalendar=daily$/m, "OnCalendar=dayly")],
    [
      "a misspelt socket key",
      "ashmesh@.socket",
      (s) => s.replace(/^FileDescriptorName=inbound$/m, "FileDescriptorNam=inbound"),
    ],
    ["a bad listen address", "ashmesh@.socket", (s) => s.replace(/^ListenStream=8443$/m, "ListenStream=99999")],
    [
      "a key in the wrong section",
      "ashmesh-renew.timer",
      (s) => s.replace(/^\[Timer\]$/m, "[Timer]\nExecStart=/bin/true"),
    ],
  ];
  for (const [what, unit, edit] of broken) {
    t.not(edit(text(unit)), text(unit), `${what}: the edit applies to ${unit}`);
    const result = await verify(copies(t, (name, s) => (name === unit ? edit(s) : s)));
    t.notOk(result.clean, `${what} in ${unit} fails`, { output: result.output });
  }
});

// `systemd-analyze security --offline` came with systemd 250; older ones cannot rate a unit file.
const analyzeVersion = analyze.path
  ? Number(/systemd (\d+)/.exec((await run(analyze.path, ["--version"])).stdout)?.[1] ?? 0)
  : 0;
const securitySkip =
  analyze.skip ||
  (analyzeVersion < 250
    ? `systemd-analyze ${analyzeVersion} has no security --offline (250+): exposure not rated`
    : false);

t.test("systemd-analyze security rates the sidecar units' exposure at most 2.0", { skip: securitySkip }, async (t) => {
  const dir = copies(t);
  for (const unit of ["ashmesh@auth.service", "ashmesh-acme@auth.service"]) {
    // --threshold is in tenths: 20 = an exposure of 2.0 ("OK"); above it, exit code 1.
    const result = await run(analyze.path as string, ["security", "--offline=yes", "--threshold=20", join(dir, unit)]);
    const level = /Overall exposure level for \S+: ([\d.]+)/.exec(result.output)?.[1];
    t.equal(result.code, 0, `${unit}: exposure ${level} is at most 2.0`, {
      output: result.output
        .split("\n")
        .filter((l) => l.includes("✗"))
        .join("\n"),
    });
  }
});

t.test("the ACME sidecar unit: the sidecar's unit, with a state directory instead of credentials", async (t) => {
  const svc = (key: string) => unitValues(acmeSidecar, "Service", key);
  t.same(svc("LoadCredential"), [], "no credentials: the sidecar writes its certificate itself");
  t.same(svc("StateDirectory"), ["ashmesh/%i"], "a state directory per instance");
  t.same(svc("StateDirectoryMode"), ["0700"]);
  t.same(
    svc("Environment"),
    ["MTLS_CERT_FILE=%S/ashmesh/%i/server.crt MTLS_KEY_FILE=%S/ashmesh/%i/server.key"],
    "certificate and key in the state directory",
  );
  // Everything else, hardening included, is the sidecar unit's.
  const rest = (unit: Unit) =>
    Object.fromEntries(
      [...(unit.get("Service") ?? new Map<string, string[]>())].filter(
        ([key]) => !["LoadCredential", "StateDirectory", "StateDirectoryMode", "Environment"].includes(key),
      ),
    );
  t.same(rest(acmeSidecar), rest(sidecar), "the same [Service] otherwise");
  t.match(
    text("ashmesh-acme@.service"),
    /ashmesh-renew\.timer is not needed/,
    "it says the renewal timer is not needed",
  );
});

t.test("the sidecar unit: hardening, signals, timeouts, credentials", async (t) => {
  const svc = (key: string) => unitValue(sidecar, "Service", key);
  t.equal(svc("ExecStart"), `${BIN} proxy`);
  t.equal(svc("ExecReload"), "/bin/kill -HUP $MAINPID", "systemctl reload sends SIGHUP (re-reads the identity files)");
  t.equal(svc("KillSignal"), "SIGTERM", "systemctl stop drains");
  t.equal(svc("Restart"), "on-failure");
  t.equal(svc("EnvironmentFile"), "/etc/ashmesh/%i.env");
  t.equal(svc("NoNewPrivileges"), "yes");
  t.equal(svc("ProtectSystem"), "strict");
  t.equal(svc("ProtectHome"), "yes");
  t.equal(svc("PrivateTmp"), "yes");
  t.equal(svc("CapabilityBoundingSet"), "", "no capability: every port is above 1024");
  t.equal(svc("AmbientCapabilities"), "");
  t.ok(svc("DynamicUser") === "yes" || (svc("User") ?? "root") !== "root", "not root");

  // TimeoutStopSec must leave the drain (limits.drainTimeoutMs) time to finish before SIGKILL.
  const config = parseConfig(
    {},
    { env: { ...authEnv, MTLS_CERT_FILE: "/x/server.crt", MTLS_KEY_FILE: "/x/server.key" } },
  );
  const stopMs = timeSpanMs(svc("TimeoutStopSec") ?? "90s");
  t.ok(
    stopMs >= config.limits.drainTimeoutMs + 5000,
    `TimeoutStopSec ${stopMs} ms > drainTimeoutMs ${config.limits.drainTimeoutMs} ms + 5 s`,
  );

  // Every credential is used through %d, and the environment points at credentials that exist.
  const credentials = new Map(
    unitValues(sidecar, "Service", "LoadCredential").map((v) => {
      const [name, source] = v.split(/:(.*)/s) as [string, string];
      return [name, source];
    }),
  );
  t.same([...credentials.keys()].sort(), ["server.crt", "server.key"]);
  t.equal(credentials.get("server.key"), "/etc/mtls/%i/server.key");
  t.equal(credentials.get("server.crt"), "/etc/mtls/%i/server.crt");
  const env = Object.fromEntries(
    unitValues(sidecar, "Service", "Environment")
      .flatMap((v) => v.split(/\s+/))
      .map((kv) => kv.split(/=(.*)/s) as [string, string]),
  );
  t.equal(env.MTLS_KEY_FILE, "%d/server.key", "MTLS_KEY_FILE=%d/server.key");
  t.equal(env.MTLS_CERT_FILE, "%d/server.crt", "MTLS_CERT_FILE=%d/server.crt");
  for (const [name, value] of Object.entries(env)) {
    t.ok(name in ENV_VARS, `${name} is a variable the sidecar reads`);
    const cred = /^%d\/(.+)$/.exec(value)?.[1];
    if (cred) t.ok(credentials.has(cred), `${name} names a loaded credential (${cred})`);
  }
});

t.test("the renewal units: daily, randomized, catching up; renew at 70 % then refresh", async (t) => {
  t.equal(unitValue(timer, "Timer", "OnCalendar"), "daily");
  t.ok(timeSpanMs(unitValue(timer, "Timer", "RandomizedDelaySec") ?? "0") > 0, "RandomizedDelaySec");
  t.equal(unitValue(timer, "Timer", "Persistent"), "true");
  t.equal(unitValue(timer, "Install", "WantedBy"), "timers.target");
  t.equal(unitValue(renew, "Service", "Type"), "oneshot");
  const exec = unitValue(renew, "Service", "ExecStart") ?? "";
  t.equal(exec, `${BIN} certs renew --threshold 0.7 --dir /etc/mtls`);
  const dir = /--dir (\S+)/.exec(exec)?.[1];
  t.ok(
    unitValues(renew, "Service", "ReadWritePaths").includes(dir ?? "?"),
    `${dir} is writable under ProtectSystem=strict`,
  );
  t.equal(unitValue(renew, "Service", "ProtectSystem"), "strict");
  // The sidecar's credentials come from <dir>/<instance>: the same tree the renewal writes.
  t.match(unitValues(sidecar, "Service", "LoadCredential").join(" "), new RegExp(`${dir}/%i/`));
});

t.test("auth.env is the mesh's environment for auth, minus what the unit sets", async (t) => {
  const expected: Record<string, string> = containerSidecarEnv(loadMesh(at("compose/mesh.yaml")), "auth");
  delete expected.MTLS_CERT_FILE;
  delete expected.MTLS_KEY_FILE;
  t.same(authEnv, expected, 'same variables and values as containerSidecarEnv(mesh, "auth")');
  for (const name of ["MTLS_CERT_FILE", "MTLS_KEY_FILE", "MTLS_CLIENT_CERT_FILE", "MTLS_CLIENT_KEY_FILE"]) {
    t.notOk(name in authEnv, `${name} is not set (it would override the unit's credential path)`);
  }
  for (const name of Object.keys(authEnv)) t.ok(name in ENV_VARS, `${name} is a variable the sidecar reads`);
});

t.test("auth.env with credentials as systemd passes them starts a sidecar that serves only the gateway", async (t) => {
  const p = await pki(t);
  const files = await p.identity("auth.ashchan.local");
  await p.identity("gateway.ashchan.local");
  await p.identity("media.ashchan.local");
  const backend = await app(t);

  // What systemd does: copy the credentials into a directory of their own, read-only, 0400.
  const credentials = join(p.dir, "credentials");
  mkdirSync(credentials);
  copyFileSync(files.cert, join(credentials, "server.crt"));
  copyFileSync(files.key, join(credentials, "server.key"));
  chmodSync(join(credentials, "server.crt"), 0o400);
  chmodSync(join(credentials, "server.key"), 0o400);
  const unitEnv = Object.fromEntries(
    unitValues(sidecar, "Service", "Environment")
      .flatMap((v) => v.split(/\s+/))
      .map((kv) => kv.split(/=(.*)/s) as [string, string])
      .map(([k, v]) => [k, v.replace("%d", credentials)]),
  );
  // Only the host-specific parts move: /etc/mtls to the test CA, fixed ports to loopback port 0,
  // the app to the stand-in. Everything else is auth.env as it is.
  const env: Record<string, string> = {
    ...Object.fromEntries(
      Object.entries(authEnv).map(([k, v]) => [k, v.replace("/etc/mtls/trust/", `${p.dir}/trust/`)]),
    ),
    ...unitEnv,
    MTLS_PORT: "127.0.0.1:0",
    ADMIN_LISTEN: "127.0.0.1:0",
    OUTBOUND_LISTEN: "127.0.0.1:0",
    APP_URL: backend.url,
  };
  t.equal(env.MTLS_CA_FILE, files.ca, "the CA bundle of the test CA");
  t.equal(env.MTLS_CRL_FILE, files.crl, "the CRL of the test CA");

  const proc = ashmesh(["proxy"], { env });
  t.teardown(() => {
    proc.child.kill("SIGKILL");
  });
  const inbound = portOf(await proc.waitFor((l) => l.event === "listening" && l.listener === "inbound"));
  const admin = portOf(await proc.waitFor((l) => l.event === "listening" && l.listener === "admin"));
  t.equal((await request(`http://127.0.0.1:${admin}/readyz`)).statusCode, 200, "ready");
  t.notOk(
    proc.lines.some((l) => /readable by group or others/.test(JSON.stringify(l))),
    "no warning about the key's mode (credentials are 0400)",
  );

  const call = async (name: string) => {
    const res = await request(`https://127.0.0.1:${inbound}/api/v1/verify`, {
      method: "POST",
      body: "{}",
      dispatcher: mtlsAgent(p, name, { servername: "auth.ashchan.local" }),
    });
    await res.body.dump();
    return res.statusCode;
  };
  t.equal(await call("gateway.ashchan.local"), 200, "the gateway (MTLS_ALLOW) reaches auth");
  t.equal(await call("media.ashchan.local"), 403, "media is refused");
  t.equal(backend.seen.length, 1, "only the gateway's request reached the app");

  proc.child.kill("SIGTERM");
  t.equal(await proc.exited, 0, "SIGTERM (systemctl stop) drains and exits 0");
});

t.test("the socket outlives a restart of its service", async (t) => {
  // PartOf= (or BindsTo=) on the socket would pass `systemctl restart ashmesh@X` on to the socket,
  // and systemd would close the port for the moment the socket unit needs to come back.
  const socket = parseUnit(text("ashmesh@.socket"));
  for (const key of ["PartOf", "BindsTo", "Requires"]) {
    t.same(unitValues(socket, "Unit", key), [], `ashmesh@.socket has no ${key}=`);
  }
  t.equal(unitValue(socket, "Socket", "FileDescriptorName"), "inbound", "the sidecar finds it by name");
  t.equal(unitValue(socket, "Socket", "Service"), "ashmesh@%i.service");
});
