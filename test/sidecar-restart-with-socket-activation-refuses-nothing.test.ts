// With systemd socket activation (ashmesh@.socket), `systemctl restart` refuses no connection:
// the listening socket stays open in systemd while the old sidecar drains and the new one starts,
// and connections made in between wait in the backlog. Here a small stand-in for systemd
// (test/fixtures/socket-activate.pl) holds the socket; requests flow through a stop and a start.
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";
import t, { type Test } from "tap";
import { inheritedSockets } from "../proxy/systemd.js";
import { app, eventually, pki, sleep, steadyLoad } from "./lib/mesh.js";
import { writeYaml } from "./lib/spawn.js";

const hasPerl = spawnSync("perl", ["-MIO::Socket::INET", "-e", "1"]).status === 0;

t.test("LISTEN_FDS: named sockets, a single unnamed one is inbound, another process's are ignored", async (t) => {
  t.same([...inheritedSockets({ LISTEN_PID: "42", LISTEN_FDS: "1" }, 42)], [["inbound", 3]]);
  t.same(
    [...inheritedSockets({ LISTEN_PID: "42", LISTEN_FDS: "3", LISTEN_FDNAMES: "admin:inbound:other" }, 42)],
    [
      ["admin", 3],
      ["inbound", 4],
    ],
  );
  t.same([...inheritedSockets({ LISTEN_PID: "41", LISTEN_FDS: "1" }, 42)], [], "meant for another process");
  t.same([...inheritedSockets({}, 42)], []);
});

/** Starts the sidecar (`workers` processes) under the stand-in for systemd, restarts it under load. */
async function restartUnderLoad(t: Test, workers: number): Promise<void> {
  const p = await pki(t);
  const backend = await app(t);
  const files = await p.identity("auth.ashchan.local");
  const gw = await p.identity("gateway.ashchan.local");
  const config = writeYaml(join(p.dir, "auth.yaml"), {
    service: { name: "auth-accounts", dnsName: "auth.ashchan.local" },
    tls: { cert: files.cert, key: files.key, ca: files.ca, crl: files.crl },
    // The address is systemd's business now; this one is never bound.
    inbound: { listen: "127.0.0.1:1", app: backend.url },
    outbound: { enabled: false },
    admin: { enabled: false },
    workers,
  });
  const log = join(p.dir, "sidecar.log");
  const supervisor: ChildProcess = spawn(
    "perl",
    [
      "test/fixtures/socket-activate.pl",
      log,
      process.execPath,
      "--import",
      "tsx",
      "bin/ashmesh.ts",
      "proxy",
      "--config",
      config,
    ],
    { stdio: ["pipe", "pipe", "inherit"] },
  );
  // SIGTERM: the stand-in, like systemd, takes the sidecar down with it. The sidecars it started
  // are also killed here directly: a stray one would keep the test run's output pipe open.
  const sidecars: number[] = [];
  t.teardown(() => {
    supervisor.kill("SIGTERM");
    for (const pid of sidecars) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // already gone
      }
    }
  });
  const replies = createInterface({ input: supervisor.stdout as NodeJS.ReadableStream })[Symbol.asyncIterator]();
  const reply = async () => {
    const line = String((await replies.next()).value);
    const started = /^started (\d+)$/.exec(line);
    if (started) sidecars.push(Number(started[1]));
    return line;
  };
  const port = Number((await reply()).split(" ")[1]);
  // The stand-in creates the log only when it starts a sidecar: until then there are no lines.
  const logText = () => {
    try {
      return readFileSync(log, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return "";
      throw err;
    }
  };
  const listening = () =>
    logText()
      .split("\n")
      .filter((l) => l.includes('"event":"listening"') && l.includes('"socket":"systemd"')).length;
  // Each process that serves (the one sidecar, or each worker) logs that it listens on the socket.
  const waitListening = async (starts: number) => {
    const n = starts * workers;
    for (let i = 0; i < 300 && listening() < n; i++) await sleep(50);
    return listening() >= n;
  };

  supervisor.stdin?.write("start\n");
  t.match(await reply(), /^started \d+/);
  t.ok(await waitListening(1), "the sidecar listens on the socket it was handed");

  const creds = {
    cert: p.read(gw.cert),
    key: p.read(gw.key),
    ca: p.read(p.trust.ca),
    servername: "auth.ashchan.local",
  };
  const load = steadyLoad(port, creds, { gapMs: 15, maxMs: 30_000 });
  await sleep(800);

  const stopAt = Date.now();
  supervisor.stdin?.write("stop\n");
  t.equal(await reply(), "stopped 0", "the old sidecar drained and exited 0");
  supervisor.stdin?.write("start\n");
  t.match(await reply(), /^started \d+/);
  t.ok(await waitListening(2), "the new sidecar took over the same socket");
  const startedAt = Date.now();
  await sleep(800);
  // On a slow machine 800 ms may hold fewer requests than the count below asks for: wait for them.
  await eventually(() => load.results.length > 40, 20_000);
  const results = await load.stop();

  const failed = results.filter((r) => !r.ok);
  t.ok(results.length > 40, `requests flowed (${results.length})`);
  t.same(failed, [], "not one connection was refused or failed");
  const inGap = results.filter((r) => r.at >= stopAt && r.at <= startedAt);
  t.ok(inGap.length >= 2, `requests were made while no sidecar ran (${inGap.length}), and waited for the new one`);
  t.ok(backend.seen.length >= results.length, "each reached the app");
}

t.test("a restart under load refuses nothing", { skip: hasPerl ? false : "perl is not installed" }, (t) =>
  restartUnderLoad(t, 1),
);

t.test(
  "with workers: 2, a restart under load refuses nothing either",
  { skip: hasPerl ? false : "perl is not installed" },
  (t) => restartUnderLoad(t, 2),
);
