// Certificates rotate on both ends of a TCP pair while redis-benchmark drives Redis through it:
// four long-lived connections (tunnels opened before the rotation keep their TLS sessions) and a
// run that opens a new connection per command (new tunnels, new handshakes, with whichever
// certificate is current). Not one command is lost: the benchmarks report no error and the
// counter they increment equals the number of commands sent.
import t from "tap";
import { eventually, pki } from "./lib/mesh.js";
import { run } from "./lib/ops.js";
import { redisBenchmarkTool, redisCli, redisPair, redisSkip, startRedis } from "./lib/tcp.js";

const KEY = "counter:__rand_int__"; // redis-benchmark's INCR key, literal without -r
const LONG_LIVED = 20_000;
const PER_COMMAND = 2_000;

t.test(
  "rotating both certificates under redis-benchmark loses no command",
  { skip: redisSkip || redisBenchmarkTool.skip },
  async (t) => {
    const p = await pki(t);
    const redis = await startRedis(t);
    const { redisSide, boards } = await redisPair(t, p, redis.port);
    const port = String(boards.tcpPorts.redis);
    const bench = (args: string[]) =>
      run("redis-benchmark", ["-h", "127.0.0.1", "-p", port, "-t", "incr", "-q", ...args], { timeoutMs: 110_000 });

    let finished = 0;
    const started = Date.now();
    const runs = [
      bench(["-n", String(LONG_LIVED), "-c", "4"]),
      bench(["-n", String(PER_COMMAND), "-c", "2", "-k", "0"]),
    ].map((r) => r.finally(() => finished++));
    // Rotate once commands are flowing through the pair.
    t.ok(
      await eventually(async () => Number((await redisCli(redis.port, ["GET", KEY])).out) > 100, 30_000),
      "commands flow",
    );
    const serials: string[] = [];
    for (const [name, side] of [
      ["boards.ashchan.local", boards],
      ["redis.ashchan.local", redisSide],
    ] as const) {
      const { record } = await p.ca.rotate(name);
      serials.push(record.serial);
      t.ok(
        await eventually(() => side.logs.events("cert_reloaded").some((l) => l.serial === record.serial), 20_000),
        `${name}'s sidecar reloaded its rotated certificate`,
      );
    }
    const reloadedWhileRunning = finished === 0;
    const handshakesBefore = redisSide.logs.events("mtls_handshake_complete").length;
    const results = await Promise.all(runs);
    t.comment(`both runs took ${Date.now() - started} ms`);
    t.ok(reloadedWhileRunning, "both sidecars reloaded while both benchmarks were running");
    t.ok(
      redisSide.logs.events("mtls_handshake_complete").length > handshakesBefore,
      "new tunnels were opened after the rotation",
    );
    for (const r of results) {
      t.equal(r.code, 0, `redis-benchmark exited 0: ${r.output.slice(-300)}`);
      t.notMatch(r.output, /error|reset|refused/i, "and reported no error");
      t.comment(r.stdout.trim().split(/\r/).at(-1) ?? "");
    }
    t.equal(
      Number((await redisCli(redis.port, ["GET", KEY])).out),
      LONG_LIVED + PER_COMMAND,
      "every INCR reached Redis exactly once",
    );
    t.equal(
      redisSide.sidecar.identity.current.server.summary.serial,
      serials[1],
      "redis's sidecar presents the new certificate",
    );
  },
);
