// A real redis-server behind a TCP pair: redis-cli → boards' tcp.outbound (loopback) → mTLS →
// redis's tcp.inbound → redis-server on a loopback port of the test's own. Commands round-trip,
// a large value arrives whole, and while a tunnel is open both sidecars show it: the open
// connection gauge (protocol="tcp"), the bytes counter (read at scrape time), /edges, /status
// and the handshake log line with the listener's name.
import { randomBytes } from "node:crypto";
import t from "tap";
import { request } from "undici";
import { eventually, pki, type RunningSidecar, sample } from "./lib/mesh.js";
import { run } from "./lib/ops.js";
import { redisCli, redisInfo, redisPair, redisSkip, respClient, startRedis } from "./lib/tcp.js";

t.test("Redis over a tcp.outbound → tcp.inbound pair", { skip: redisSkip }, async (t) => {
  const p = await pki(t);
  const redis = await startRedis(t);
  const { redisSide, boards } = await redisPair(t, p, redis.port);
  const local = boards.tcpPorts.redis as number;

  await t.test("SET and GET round-trip with redis-cli", async (t) => {
    t.same(await redisCli(local, ["SET", "greeting", "hello over mtls"]), { code: 0, out: "OK" });
    t.same(await redisCli(local, ["GET", "greeting"]), { code: 0, out: "hello over mtls" });
    t.equal((await redisCli(redis.port, ["GET", "greeting"])).out, "hello over mtls", "it is in the real server");
  });

  await t.test("a 2 MB value arrives whole in both directions", async (t) => {
    const value = randomBytes(1_536 * 1024).toString("base64"); // 2 MiB of text
    const set = await run("redis-cli", ["-h", "127.0.0.1", "-p", String(local), "-x", "SET", "big"], {
      input: value,
    });
    t.equal(set.stdout.trim(), "OK");
    // -x sends stdin as the last argument, with its trailing newline if any (here none).
    t.equal((await redisCli(redis.port, ["STRLEN", "big"])).out, String(value.length), "stored whole");
    const got = await run("redis-cli", ["-h", "127.0.0.1", "-p", String(local), "--no-raw", "GET", "big"], {
      timeoutMs: 30_000,
    });
    t.equal(got.stdout.trim(), JSON.stringify(value), "read back whole");
  });

  await t.test("an open tunnel shows in metrics, /edges, /status and the logs", async (t) => {
    const scrape = async (s: RunningSidecar) => s.metrics();
    const bytes = (text: string, direction: string, flow: string) =>
      sample(text, "mtls_tcp_bytes_total", { direction, listener: "redis", flow });
    const [b0, r0] = await Promise.all([scrape(boards), scrape(redisSide)]);
    const client = await respClient(local);
    t.equal(await client.command("PING"), "+PONG");
    t.equal(await client.command("SET", "k", "v"), "+OK");
    const [b, r] = await Promise.all([scrape(boards), scrape(redisSide)]);
    t.equal(sample(b, "mtls_open_connections", { direction: "outbound", protocol: "tcp" }), 1, "boards: one tunnel");
    t.equal(sample(r, "mtls_open_connections", { direction: "inbound", protocol: "tcp" }), 1, "redis: one tunnel");
    // Bytes of a tunnel still open are visible at scrape time: PING and SET, their replies.
    const sent = "*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n".length;
    const replies = "+PONG\r\n+OK\r\n".length;
    t.equal(bytes(b, "outbound", "in") - bytes(b0, "outbound", "in"), sent, "boards: the commands, counted while open");
    t.equal(bytes(b, "outbound", "out") - bytes(b0, "outbound", "out"), replies, "boards: the replies");
    t.equal(bytes(r, "inbound", "in") - bytes(r0, "inbound", "in"), sent, "redis's sidecar: the commands");
    t.equal(bytes(r, "inbound", "out") - bytes(r0, "inbound", "out"), replies, "redis's sidecar: the replies");
    t.ok((await redisInfo(redis.port, "connected_clients")) >= 2, "the tunnel is a client of redis-server");
    // Each tunnel counts once as a request when it is made: the two redis-cli runs, then this one.
    for (const [text, direction, peer] of [
      [b, "outbound", "redis.ashchan.local"],
      [r, "inbound", "boards.ashchan.local"],
    ] as const) {
      t.equal(
        sample(text, "mtls_requests_total", { direction, peer, code: "200", protocol: "tcp" }),
        sample(direction === "outbound" ? b0 : r0, "mtls_requests_total", {
          direction,
          peer,
          code: "200",
          protocol: "tcp",
        }) + 1,
        `${direction}: one more tunnel in mtls_requests_total{protocol="tcp"}`,
      );
    }

    const edgesOf = async (s: RunningSidecar) =>
      (await (await request(`${s.adminUrl}/edges`)).body.json()) as Array<Record<string, unknown>>;
    const outbound = (await edgesOf(boards)).find((e) => e.dst_identity === "redis.ashchan.local");
    t.match(outbound, {
      direction: "outbound",
      src: "boards/redis",
      src_identity: "boards.ashchan.local",
      tls_version: "TLSv1.3",
    });
    const inbound = (await edgesOf(redisSide)).find((e) => e.src_identity === "boards.ashchan.local");
    t.match(inbound, { direction: "inbound", dst: "redis/redis", dst_identity: "redis.ashchan.local" });
    t.ok((inbound?.requests as number) >= 1, "requests counts tunnels");

    const status = (await (await request(`${redisSide.adminUrl}/status`)).body.json()) as {
      listeners: { tcp: { inbound: Array<Record<string, unknown>> } };
      open_connections: { tcp_tunnels: number };
    };
    t.match(status.listeners.tcp.inbound, [
      { name: "redis", target: `127.0.0.1:${redis.port}`, allow: ["boards.ashchan.local"], open_tunnels: 1 },
    ]);
    t.equal(status.open_connections.tcp_tunnels, 1);

    t.match(
      redisSide.logs.events("mtls_handshake_complete").at(-1),
      { client_cn: "boards.ashchan.local", server_cn: "redis.ashchan.local", listener: "redis", direction: "inbound" },
      "the inbound handshake line names the listener",
    );
    t.match(
      boards.logs.events("mtls_handshake_complete").at(-1),
      { server_cn: "redis.ashchan.local", listener: "redis", direction: "outbound", tls_version: "TLSv1.3" },
      "and so does the outbound one",
    );

    // Closed: the gauges drop, and both ends counted the same plaintext bytes.
    client.socket.end();
    await client.closed;
    t.ok(
      await eventually(async () => {
        const [b2, r2] = await Promise.all([scrape(boards), scrape(redisSide)]);
        return (
          sample(b2, "mtls_open_connections", { direction: "outbound", protocol: "tcp" }) === 0 &&
          sample(r2, "mtls_open_connections", { direction: "inbound", protocol: "tcp" }) === 0
        );
      }, 5_000),
      "no tunnel open on either side once the client closed",
    );
    const [b3, r3] = await Promise.all([scrape(boards), scrape(redisSide)]);
    for (const flow of ["in", "out"]) {
      const atBoards = sample(b3, "mtls_tcp_bytes_total", { direction: "outbound", listener: "redis", flow });
      const atRedis = sample(r3, "mtls_tcp_bytes_total", { direction: "inbound", listener: "redis", flow });
      t.ok(atBoards > 0, `flow ${flow}: ${atBoards} bytes`);
      t.equal(atBoards, atRedis, `flow ${flow}: both sidecars counted the same bytes`);
    }
    const closed = boards.logs.events("tcp_tunnel_closed").at(-1);
    t.match(closed, { direction: "outbound", listener: "redis", identity: "redis.ashchan.local" });
  });
});
