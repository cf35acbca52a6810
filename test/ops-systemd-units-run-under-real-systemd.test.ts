// compose/systemd's units under a real systemd (Debian 12's systemd 252, as PID 1 of a Podman
// container): ashmesh@auth.socket hands port 8443 to ashmesh@auth.service, `systemctl restart`
// under steady load refuses no connection, `systemctl reload` re-reads the identity, `systemctl
// stop` drains and ends in success; all with the unit's hardening (system-call filter, read-only
// system, private namespaces) in force.
//
// One thing differs from a host: in this container the credential directories systemd makes stay
// root:root 0700 (the sandbox has no ACLs), so no non-root service can read its credentials (even
// `systemd-run -p User=nobody -p LoadCredential=x:/etc/hostname cat ...` is refused). A drop-in
// therefore replaces DynamicUser= and LoadCredential= with root and the certificate paths.
// Everything else is the unit as shipped.
import { chmodSync, readFileSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { certs, tempDir } from "./lib/certs.js";
import { eventually, GET, rawTls, sleep, steadyLoad } from "./lib/mesh.js";
import { at, tool } from "./lib/ops.js";
import { buildImages, buildSystemdImage, freePort, IMAGE, podmanRun, podmanSkip, SYSTEMD_IMAGE } from "./lib/podman.js";

t.setTimeout(900_000);

const debootstrap = tool("debootstrap", "debootstrap");
const skip =
  podmanSkip ||
  debootstrap.skip ||
  (process.getuid?.() === 0 ? false : "needs root: debootstrap and a privileged container for systemd");

const DROP_IN = `# test only: see test/ops-systemd-units-run-under-real-systemd.test.ts
[Service]
DynamicUser=no
User=root
LoadCredential=
Environment=MTLS_CERT_FILE=/etc/mtls/%i/server.crt MTLS_KEY_FILE=/etc/mtls/%i/server.key
`;

t.test("the units under a real systemd", { skip }, async (t) => {
  for (const [what, build] of [
    ["the ashmesh image", buildImages],
    ["the systemd image", buildSystemdImage],
  ] as const) {
    const built = await build();
    if (!t.equal(built.code, 0, `${what} builds\n${built.output.slice(-2000)}`)) return;
  }

  // The package as `npm install -g` lays it out, taken from the image: dist/, the production
  // node_modules and Node itself; the command is executable, as npm makes it.
  const dir = tempDir(t, "ashmesh-systemd-");
  const created = await podmanRun(["create", IMAGE]);
  const id = created.stdout.trim();
  for (const [from, to] of [
    ["/opt/ashmesh", join(dir, "ashmesh")],
    ["/usr/local/bin/node", join(dir, "node")],
  ]) {
    const copied = await podmanRun(["cp", `${id}:${from}`, to as string]);
    t.equal(copied.code, 0, copied.output);
  }
  await podmanRun(["rm", id]);
  chmodSync(join(dir, "ashmesh", "dist", "bin", "ashmesh.js"), 0o755);

  // /etc/mtls as the README lays it out: the dev CA, auth's identity, and /etc/mtls/auth.
  const pki = join(dir, "mtls");
  for (const args of [
    ["init", "--dir", pki],
    ["issue", "auth.ashchan.local", "--dir", pki],
    ["issue", "gateway.ashchan.local", "--dir", pki],
  ]) {
    const r = await certs(args);
    t.equal(r.code, 0, r.err);
  }
  symlinkSync("auth.ashchan.local", join(pki, "auth"));

  const name = `ashmesh-systemd-${process.pid}`;
  const port = await freePort();
  const started = await podmanRun([
    "run",
    "-d",
    "--name",
    name,
    "--privileged",
    "--systemd=always",
    "-p",
    `127.0.0.1:${port}:8443`,
    "-v",
    `${pki}:/etc/mtls`,
    "-v",
    `${join(dir, "ashmesh")}:/usr/local/lib/node_modules/ashmesh:ro`,
    "-v",
    `${join(dir, "node")}:/usr/local/bin/node:ro`,
    SYSTEMD_IMAGE,
  ]);
  if (!t.equal(started.code, 0, `the systemd container starts: ${started.output}`)) return;
  t.teardown(() => podmanRun(["rm", "-f", "-t", "2", name]));
  const exec = (script: string) => podmanRun(["exec", name, "sh", "-c", script], { timeoutMs: 120_000 });
  const journal = async () => (await exec("journalctl -u ashmesh@auth.service -o cat --no-pager")).stdout;
  const mainPid = async () => (await exec("systemctl show -p MainPID --value ashmesh@auth.service")).stdout.trim();

  let booted = "";
  for (let i = 0; i < 60 && !/^(running|degraded)$/.test(booted); i++) {
    await sleep(500);
    booted = (await exec("systemctl is-system-running")).stdout.trim();
  }
  t.match(booted, /^(running|degraded)$/, "systemd is up");

  // Install as the README says.
  const sd = at("compose/systemd");
  await exec(
    "ln -sf ../lib/node_modules/ashmesh/dist/bin/ashmesh.js /usr/local/bin/ashmesh && mkdir -p /etc/ashmesh /etc/systemd/system/ashmesh@.service.d",
  );
  for (const f of ["ashmesh@.service", "ashmesh@.socket"]) {
    t.equal((await podmanRun(["cp", join(sd, f), `${name}:/etc/systemd/system/${f}`])).code, 0, f);
  }
  t.equal((await podmanRun(["cp", join(sd, "auth.env"), `${name}:/etc/ashmesh/auth.env`])).code, 0);
  await exec(`cat > /etc/systemd/system/ashmesh@.service.d/test.conf <<'EOF'\n${DROP_IN}EOF`);
  // auth's app, the Hyperf stand-in: plain HTTP on 127.0.0.1:9502.
  const app = await podmanRun([
    "exec",
    "-d",
    name,
    "/usr/local/bin/node",
    "-e",
    "require('http').createServer((q, s) => s.end('auth app')).listen(9502, '127.0.0.1')",
  ]);
  t.equal(app.code, 0, app.output);
  // `exec -d` returns before the app listens: wait until it answers, or the first request gets a 502.
  const appAnswers = async () =>
    (
      await exec(
        `/usr/local/bin/node -e "fetch('http://127.0.0.1:9502/').then(r => r.text()).then(t => process.stdout.write(t))"`,
      )
    ).stdout === "auth app";
  t.ok(await eventually(appAnswers, 30_000), "auth's app answers on 127.0.0.1:9502");

  const enabled = await exec(
    "systemctl daemon-reload && systemctl enable --now ashmesh@auth.socket ashmesh@auth.service",
  );
  if (!t.equal(enabled.code, 0, enabled.output)) t.comment(await journal());
  let listening = false;
  for (let i = 0; i < 60 && !listening; i++) {
    await sleep(250);
    listening = /"event":"listening","listener":"inbound","socket":"systemd"/.test(await journal());
  }
  if (!t.ok(listening, "the sidecar took the socket systemd holds")) {
    t.comment(await journal());
    return;
  }

  const creds = {
    cert: readFileSync(join(pki, "gateway.ashchan.local", "server.crt")),
    key: readFileSync(join(pki, "gateway.ashchan.local", "server.key")),
    ca: readFileSync(join(pki, "trust", "ca.crt")),
    servername: "auth.ashchan.local",
    rejectUnauthorized: true,
  };
  const first = await rawTls(port, creds, GET);
  t.match(first.data, /^HTTP\/1\.1 200 [\s\S]*auth app$/, "a request crosses the sidecar");

  await t.test("systemctl restart under load refuses no connection", async (t) => {
    const load = steadyLoad(port, creds, { gapMs: 10, maxMs: 60_000 });
    await sleep(1_000);
    const pids = [await mainPid()];
    const restartsAt: number[] = [];
    for (let i = 0; i < 2; i++) {
      restartsAt.push(Date.now());
      const restarted = await exec("systemctl restart ashmesh@auth.service");
      t.equal(restarted.code, 0, `restart ${i + 1}: ${restarted.output}`);
      pids.push(await mainPid());
      await sleep(1_000);
    }
    const results = await load.stop();
    t.equal(new Set(pids).size, 3, `three processes served in turn (${pids.join(", ")})`);
    t.ok(results.length > 50, `requests flowed (${results.length})`);
    t.same(
      results.filter((r) => !r.ok),
      [],
      "not one connection was refused or failed",
    );
    const during = results.filter((r) => restartsAt.some((s) => r.at >= s && r.at <= s + 1_000)).length;
    t.ok(during > 0, `requests were made during the restarts (${during})`);
  });

  await t.test("systemctl reload re-reads the identity; systemctl stop drains and succeeds", async (t) => {
    const before = await mainPid();
    const reloaded = await exec("systemctl reload ashmesh@auth.service");
    t.equal(reloaded.code, 0, `reload: ${reloaded.output}`);
    t.equal(await mainPid(), before, "the same process");
    // Nothing changed on disk, so nothing is logged; /status says what the last reload was.
    const status = async () =>
      (
        await exec(
          `/usr/local/bin/node -e "fetch('http://127.0.0.1:9901/status').then(r => r.text()).then(t => process.stdout.write(t))"`,
        )
      ).stdout;
    let lastReload: { trigger?: string; result?: string } = {};
    for (let i = 0; i < 20 && lastReload.trigger !== "SIGHUP"; i++) {
      await sleep(250);
      try {
        lastReload = (JSON.parse(await status()) as { last_reload?: typeof lastReload }).last_reload ?? {};
      } catch {
        lastReload = {};
      }
    }
    t.match(lastReload, { trigger: "SIGHUP", result: "unchanged" }, "the sidecar re-read its files on SIGHUP");

    const stopped = await exec(
      "systemctl stop ashmesh@auth.service && systemctl show -p Result -p ExecMainStatus --value ashmesh@auth.service",
    );
    t.equal(stopped.code, 0, stopped.output);
    t.same(stopped.stdout.trim().split("\n"), ["success", "0"], "exit 0, result success");
    t.match(await journal(), /"event":"draining"[\s\S]*"event":"stopped"/, "it drained, then stopped");
  });
});
