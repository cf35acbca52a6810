// Fixtures for the TCP tunnel tests: a real redis-server of the test's own on a loopback port,
// redis-cli and redis-benchmark, a plain TCP server that counts every connection and byte it
// sees (a refused peer must add none), and a minimal RESP client whose socket the test holds.
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import net, { type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import tls from "node:tls";
import { type Pki, type RunningSidecar, sidecar, type Tap } from "./mesh.js";
import { run, tool } from "./ops.js";
import { freePort } from "./podman.js";

export const redisServer = tool("redis-server", "redis-server");
export const redisCliTool = tool("redis-cli", "redis-tools");
export const redisBenchmarkTool = tool("redis-benchmark", "redis-tools");
/** Why the Redis tests skip, or false when redis-server and redis-cli are there. */
export const redisSkip: string | false = redisServer.skip || redisCliTool.skip;

export interface Redis {
  port: number;
  child: ChildProcess;
}

/** A redis-server on 127.0.0.1 (no persistence), stopped at teardown. */
export async function startRedis(t: Tap): Promise<Redis> {
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-redis-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  // redis-server cannot listen on port 0: take a free one, and try again if someone took it meanwhile.
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const child = spawn(
      "redis-server",
      ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    t.teardown(() => {
      child.kill("SIGKILL");
    });
    const ready = await new Promise<boolean>((resolve) => {
      let out = "";
      const timer = setTimeout(() => resolve(false), 10_000);
      child.stdout?.on("data", (d: Buffer) => {
        out += d.toString("utf8");
        if (out.includes("Ready to accept connections")) {
          clearTimeout(timer);
          resolve(true);
        }
      });
      child.once("exit", () => {
        clearTimeout(timer);
        resolve(false);
      });
    });
    if (ready) return { port, child };
    child.kill("SIGKILL");
  }
  throw new Error("redis-server did not start on a free port in three attempts");
}

/** redis-cli against 127.0.0.1:PORT; its reply text, trimmed. */
export async function redisCli(port: number, args: string[]): Promise<{ code: number | null; out: string }> {
  const r = await run("redis-cli", ["-h", "127.0.0.1", "-p", String(port), ...args]);
  return { code: r.code, out: `${r.stdout}${r.stderr}`.trim() };
}

/** One field of redis-server's INFO (e.g. connected_clients, total_connections_received), asked directly. */
export async function redisInfo(port: number, field: string): Promise<number> {
  const { out } = await redisCli(port, ["INFO", "all"]);
  const match = new RegExp(`^${field}:(\\d+)`, "m").exec(out);
  if (!match) throw new Error(`no ${field} in INFO: ${out.slice(0, 200)}`);
  return Number(match[1]);
}

/** A RESP client on one socket the test holds: send a command, read one reply line. */
export interface RespClient {
  socket: net.Socket;
  command(...args: string[]): Promise<string>;
  closed: Promise<void>;
}

export function respClient(port: number): Promise<RespClient> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1");
    let buffer = "";
    const waiting: Array<{ resolve: (line: string) => void; reject: (err: Error) => void }> = [];
    socket.on("data", (d: Buffer) => {
      buffer += d.toString("latin1");
      let nl = buffer.indexOf("\r\n");
      while (nl !== -1 && waiting.length > 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 2);
        // A bulk string ($n) is followed by its value: return the value.
        if (line.startsWith("$") && line !== "$-1") {
          const end = buffer.indexOf("\r\n");
          if (end === -1) {
            buffer = `${line}\r\n${buffer}`;
            break;
          }
          const value = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          waiting.shift()?.resolve(value);
        } else {
          waiting.shift()?.resolve(line);
        }
        nl = buffer.indexOf("\r\n");
      }
    });
    const closed = new Promise<void>((r) =>
      socket.once("close", () => {
        for (const w of waiting.splice(0)) w.reject(new Error("closed before the reply"));
        r();
      }),
    );
    socket.on("error", () => undefined);
    socket.once("connect", () =>
      resolve({
        socket,
        closed,
        command: (...args) =>
          new Promise<string>((res, rej) => {
            if (socket.destroyed) return rej(new Error("closed"));
            waiting.push({ resolve: res, reject: rej });
            socket.write(`*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join("")}`);
          }),
      }),
    );
    socket.once("error", reject);
  });
}

/** A plain TCP server on 127.0.0.1 that counts every connection and byte it receives. */
export interface CountingServer {
  port: number;
  target: string;
  connections: number;
  /** Connections open now. */
  open: number;
  bytes: number;
  server: net.Server;
}

/**
 * By default it echoes what it reads and ends when the client ends; `handler` replaces that.
 * Half-open sockets, so a client's FIN ends only one direction.
 */
export async function countingServer(t: Tap, handler?: (socket: net.Socket) => void): Promise<CountingServer> {
  const state = { connections: 0, open: 0, bytes: 0 };
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    state.connections++;
    state.open++;
    socket.once("close", () => state.open--);
    socket.on("data", (d: Buffer) => {
      state.bytes += d.length;
    });
    socket.on("error", () => undefined);
    if (handler) handler(socket);
    else socket.pipe(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const port = (server.address() as AddressInfo).port;
  return {
    port,
    target: `127.0.0.1:${port}`,
    server,
    get connections() {
      return state.connections;
    },
    get open() {
      return state.open;
    },
    get bytes() {
      return state.bytes;
    },
  };
}

/**
 * Connects with node:tls, sends `data`, then ends its sending side (a TLS close_notify and a
 * FIN) and reads until the other side closes: through a tunnel, that needs half-close to pass.
 */
export function tlsSendAndEnd(
  port: number,
  options: tls.ConnectionOptions,
  data: string | Buffer,
): Promise<{ handshake: boolean; data: Buffer; error: string | null }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let handshake = false;
    let error: string | null = null;
    const socket = tls.connect({ host: "127.0.0.1", port, rejectUnauthorized: false, ...options }, () => {
      handshake = true;
      socket.end(data);
    });
    socket.setTimeout(10_000, () => socket.destroy(new Error("timeout")));
    socket.on("data", (d: Buffer) => chunks.push(d));
    socket.on("error", (err: NodeJS.ErrnoException) => {
      error = err.code ?? err.message;
    });
    socket.on("close", () => resolve({ handshake, data: Buffer.concat(chunks), error }));
  });
}

/**
 * The mesh's Redis hop: redis's sidecar (a tcp.inbound "redis" in front of a Redis on `redisPort`,
 * boards alone allowed) and boards' sidecar (a tcp.outbound "redis" to it). The app's side is
 * `boards.tcpPorts.redis`.
 */
export async function redisPair(
  t: Tap,
  p: Pki,
  redisPort: number,
): Promise<{ redisSide: RunningSidecar; boards: RunningSidecar }> {
  const redisSide = await sidecar(t, p, "redis.ashchan.local", {
    inbound: { enabled: false },
    outbound: { enabled: false },
    tcp: {
      inbound: [
        { name: "redis", listen: "127.0.0.1:0", target: `127.0.0.1:${redisPort}`, allow: ["boards.ashchan.local"] },
      ],
    },
  });
  const boards = await sidecar(t, p, "boards.ashchan.local", {
    inbound: { enabled: false },
    outbound: { enabled: false },
    tcp: {
      outbound: [
        {
          name: "redis",
          listen: "127.0.0.1:0",
          target: `127.0.0.1:${redisSide.tcpPorts.redis}`,
          identity: "redis.ashchan.local",
        },
      ],
    },
  });
  return { redisSide, boards };
}
