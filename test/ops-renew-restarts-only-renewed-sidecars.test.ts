// ashmesh-renew.service, run as the unit says against a real development CA: `ashmesh certs renew`
// with the unit's own arguments, then ashmesh-refresh-sidecars (under dash, /bin/sh on Debian)
// with a stand-in systemctl that records what it is asked. A sidecar whose certificate and key
// changed after it started is restarted (systemd copied its credentials at start); every other
// one is only reloaded, so a renewal that renewed nothing restarts nothing.
import { mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { pki } from "./lib/mesh.js";
import { at, parseUnit, ROOT, run, unitValue, which } from "./lib/ops.js";

const UNIT = parseUnit(readFileSync(at("compose/systemd/ashmesh-renew.service"), "utf8"));
const SCRIPT = at("compose/systemd/ashmesh-refresh-sidecars");
const SH = which("dash") ?? "/bin/sh";

type Tap = Parameters<typeof pki>[0];

const SYSTEMCTL = `#!/bin/sh
printf '%s\\n' "$*" >> "$STUB_LOG"
case "$1" in
  list-units)
    printf '%s\\n' 'ashmesh@auth.service loaded active running ashmesh mTLS sidecar for auth' \\
      'ashmesh@boards.service loaded active running ashmesh mTLS sidecar for boards' ;;
  show) printf '%s\\n' "$STUB_STARTED" ;;
  restart) exit "\${STUB_RESTART_EXIT:-0}" ;;
  reload) exit 0 ;;
  *) echo "unexpected systemctl $*" >&2; exit 2 ;;
esac
`;

/**
 * A host as the README sets it up: the dev CA in "/etc/mtls" (a temp dir), auth and boards
 * issued, /etc/mtls/<instance> linked to /etc/mtls/<dns name>; both sidecars "started" now,
 * after their files were written.
 */
async function host(t: Tap) {
  const p = await pki(t);
  const bin = mkdtempSync(join(tmpdir(), "ashmesh-renew-bin-"));
  t.teardown(() => rmSync(bin, { recursive: true, force: true }));
  writeFileSync(join(bin, "systemctl"), SYSTEMCTL, { mode: 0o755 });
  // The real CLI, as /usr/local/bin/ashmesh would run it.
  writeFileSync(
    join(bin, "ashmesh"),
    `#!/bin/sh\ncd '${ROOT}' && exec '${process.execPath}' --import tsx bin/ashmesh.ts "$@"\n`,
    { mode: 0o755 },
  );
  const old = Date.now() / 1000 - 600;
  for (const [instance, name] of [
    ["auth", "auth.ashchan.local"],
    ["boards", "boards.ashchan.local"],
  ] as const) {
    const files = await p.identity(name);
    symlinkSync(name, join(p.dir, instance));
    utimesSync(files.cert, old, old);
    utimesSync(files.key, old, old);
  }
  const log = join(bin, "systemctl.log");
  writeFileSync(log, "");
  const env = {
    ...process.env,
    SYSTEMCTL: join(bin, "systemctl"),
    ASHMESH_MTLS_DIR: p.dir,
    STUB_LOG: log,
    STUB_STARTED: `@${Math.floor(Date.now() / 1000) - 60}`,
  };
  return {
    p,
    env,
    calls: () => readFileSync(log, "utf8").split("\n").filter(Boolean),
    /** A command line of the unit, with /usr/local/bin/ashmesh and /etc/mtls of this host. */
    unitCommand: (key: "ExecStart") => {
      const line = (unitValue(UNIT, "Service", key) ?? "").replaceAll("/etc/mtls", p.dir);
      const [, ...args] = line.split(/\s+/);
      return [join(bin, "ashmesh"), args] as const;
    },
    refresh: (extra: Record<string, string> = {}) => run(SH, [SCRIPT], { env: { ...env, ...extra } }),
  };
}

const QUERIES = (calls: string[]) => calls.filter((c) => c.startsWith("list-units") || c.startsWith("show"));
const ACTIONS = (calls: string[]) => calls.filter((c) => !c.startsWith("list-units") && !c.startsWith("show"));

t.test("nothing due: the unit's renew changes nothing and every sidecar is only reloaded", async (t) => {
  const h = await host(t);
  const [cmd, args] = h.unitCommand("ExecStart");
  t.same(args, ["certs", "renew", "--threshold", "0.7", "--dir", h.p.dir], "the unit's arguments");
  const renewed = await run(cmd, [...args], { env: h.env, timeoutMs: 30_000 });
  t.equal(renewed.code, 0, "ashmesh certs renew exits 0", { output: renewed.output });
  t.match(renewed.stdout, /nothing due/);

  const refreshed = await h.refresh();
  t.equal(refreshed.code, 0, "ashmesh-refresh-sidecars exits 0", { output: refreshed.output });
  t.same(QUERIES(h.calls()), [
    "list-units --type=service --state=active --plain --no-legend ashmesh@*.service",
    "show --property=ExecMainStartTimestamp --value --timestamp=unix ashmesh@auth.service",
    "show --property=ExecMainStartTimestamp --value --timestamp=unix ashmesh@boards.service",
  ]);
  t.same(ACTIONS(h.calls()), ["reload ashmesh@auth.service", "reload ashmesh@boards.service"], "no restart");
});

t.test("auth's certificate renewed: auth is restarted (through the link), boards only reloaded", async (t) => {
  const h = await host(t);
  // What a renewal does to one identity: `ashmesh certs rotate` (renew calls the same rotation).
  const [cmd] = h.unitCommand("ExecStart");
  const rotated = await run(cmd, ["certs", "rotate", "auth.ashchan.local", "--dir", h.p.dir], {
    env: h.env,
    timeoutMs: 30_000,
  });
  t.equal(rotated.code, 0, "ashmesh certs rotate auth.ashchan.local exits 0", { output: rotated.output });

  const refreshed = await h.refresh();
  t.equal(refreshed.code, 0, "exits 0", { output: refreshed.output });
  t.same(ACTIONS(h.calls()), ["restart ashmesh@auth.service", "reload ashmesh@boards.service"]);
  t.match(refreshed.stdout, /ashmesh@auth\.service: .*changed after the sidecar started: restarting/);
});

t.test("a failed restart fails the run, and the other sidecars are still handled", async (t) => {
  const h = await host(t);
  const now = Date.now() / 1000;
  utimesSync(join(h.p.dir, "auth", "server.key"), now, now);
  const refreshed = await h.refresh({ STUB_RESTART_EXIT: "1" });
  t.equal(refreshed.code, 1, "exit 1: systemctl status ashmesh-renew shows the failure");
  t.match(refreshed.stderr, /ashmesh@auth\.service: systemctl restart failed; see journalctl -u ashmesh@auth\.service/);
  t.same(ACTIONS(h.calls()), ["restart ashmesh@auth.service", "reload ashmesh@boards.service"]);
});

t.test("a start time systemd cannot tell: restart, to be sure the sidecar has the files on disk", async (t) => {
  const h = await host(t);
  const refreshed = await h.refresh({ STUB_STARTED: "" });
  t.equal(refreshed.code, 0, "exits 0", { output: refreshed.output });
  t.same(ACTIONS(h.calls()), ["restart ashmesh@auth.service", "restart ashmesh@boards.service"]);
});

t.test("the script is executable and POSIX sh", async (t) => {
  t.ok(statSync(SCRIPT).mode & 0o111, "executable in the repository (install keeps the mode)");
  const syntax = await run(SH, ["-n", SCRIPT]);
  t.equal(syntax.code, 0, `${SH} -n accepts it`, { output: syntax.output });
});
