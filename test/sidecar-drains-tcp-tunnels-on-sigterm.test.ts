// SIGTERM with TCP tunnels open (the real `ashmesh proxy` process): both TCP listeners stop
// accepting at once, the tunnels already open keep carrying bytes until they end on their own —
// then the process exits 0 without waiting for the deadline — or, when one stays open, the
// sidecar closes it at limits.drainTimeoutMs and exits 0.
import net from "node:net";
import { join } from "node:path";
import t from "tap";
import { type Pki, pki, sidecar, type Tap } from "./lib/mesh.js";
import { ashmesh, portOf, writeYaml } from "./lib/spawn.js";
import { countingServer } from "./lib/tcp.js";

/** An app's connection, which closes when the other side does (no half-open: most clients). */
async function tunnel(port: number) {
  const socket = net.connect({ port, host: "127.0.0.1" });
  socket.on("error", () => undefined);
  await new Promise((resolve) => socket.once("connect", resolve));
  const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
  const echo = (text: string) =>
    new Promise<string>((resolve, reject) => {
      let got = "";
      const onData = (d: Buffer) => {
        got += d.toString("latin1");
        if (got.length >= text.length) {
          socket.off("data", onData);
          resolve(got);
        }
      };
      socket.on("data", onData);
      socket.once("close", () => reject(new Error("closed")));
      socket.write(text);
    });
  return { socket, closed, echo };
}

function connectResult(port: number): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    s.on("connect", () => {
      s.destroy();
      resolve("connected");
    });
    s.on("error", (e: NodeJS.ErrnoException) => resolve(e.code ?? "error"));
  });
}

/**
 * The sidecar under test (media, a real process) with a tcp.inbound "in" (allowed: boards) in
 * front of an echo server, and a tcp.outbound "out" to auth's tcp.inbound (in this process).
 * Boards (in this process) reaches "in" through its own tcp.outbound.
 */
async function setUp(t: Tap, p: Pki, drainTimeoutMs: number) {
  const echo = await countingServer(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { enabled: false },
    outbound: { enabled: false },
    tcp: { inbound: [{ name: "echo", listen: "127.0.0.1:0", target: echo.target, allow: ["media.ashchan.local"] }] },
  });
  const files = await p.identity("media.ashchan.local");
  const config = writeYaml(join(p.dir, "media.yaml"), {
    service: { name: "media-uploads", dnsName: "media.ashchan.local" },
    tls: { cert: files.cert, key: files.key, ca: files.ca, crl: files.crl },
    inbound: { enabled: false },
    outbound: { enabled: false },
    admin: { listen: "127.0.0.1:0" },
    tcp: {
      inbound: [{ name: "in", listen: "127.0.0.1:0", target: echo.target, allow: ["boards.ashchan.local"] }],
      outbound: [
        {
          name: "out",
          listen: "127.0.0.1:0",
          target: `127.0.0.1:${auth.tcpPorts.echo}`,
          identity: "auth.ashchan.local",
        },
      ],
    },
    limits: { drainTimeoutMs },
  });
  const proc = ashmesh(["proxy", "--config", config]);
  t.teardown(() => proc.child.kill("SIGKILL"));
  const inPort = portOf(await proc.waitFor((l) => l.event === "listening" && l.listener === "in"));
  const outPort = portOf(await proc.waitFor((l) => l.event === "listening" && l.listener === "out"));
  await proc.waitFor((l) => l.event === "listening" && l.listener === "admin");
  const boards = await sidecar(t, p, "boards.ashchan.local", {
    inbound: { enabled: false },
    outbound: { enabled: false },
    tcp: {
      outbound: [
        { name: "media", listen: "127.0.0.1:0", target: `127.0.0.1:${inPort}`, identity: "media.ashchan.local" },
      ],
    },
  });
  return { proc, inPort, outPort, viaIn: boards.tcpPorts.media as number };
}

t.test("open tunnels finish, new ones are refused, exit 0", async (t) => {
  const p = await pki(t);
  const { proc, inPort, outPort, viaIn } = await setUp(t, p, 90_000);
  const inbound = await tunnel(viaIn);
  const outbound = await tunnel(outPort);
  t.equal(await inbound.echo("one"), "one", "a tunnel through the tcp.inbound");
  t.equal(await outbound.echo("one"), "one", "a tunnel through the tcp.outbound");

  proc.child.kill("SIGTERM");
  const draining = await proc.waitFor((l) => l.event === "draining");
  t.equal(draining.tcp_tunnels, 2, "the draining line counts the open tunnels");
  t.equal(await connectResult(inPort), "ECONNREFUSED", "the tcp.inbound accepts nothing new");
  t.equal(await connectResult(outPort), "ECONNREFUSED", "the tcp.outbound accepts nothing new");
  t.equal(await inbound.echo("two"), "two", "the open inbound tunnel still carries bytes");
  t.equal(await outbound.echo("two"), "two", "the open outbound tunnel too");

  inbound.socket.end();
  outbound.socket.end();
  await Promise.all([inbound.closed, outbound.closed]);
  // A generous bound, a third of the deadline: the exit follows the tunnels, not the clock.
  const bound = new Promise((resolve) => setTimeout(() => resolve("still running"), 30_000).unref());
  const exited = await Promise.race([proc.exited, bound]);
  t.equal(exited, 0, "exit 0 once the tunnels ended, long before the 90 s deadline");
  t.ok(proc.lines.some((l) => l.event === "stopped"));
});

t.test("a tunnel still open at the deadline is closed, exit 0", async (t) => {
  const p = await pki(t);
  const { proc, viaIn } = await setUp(t, p, 1_000);
  const lingering = await tunnel(viaIn);
  t.equal(await lingering.echo("hello"), "hello");
  proc.child.kill("SIGTERM");
  await proc.waitFor((l) => l.event === "draining");
  t.equal(await lingering.echo("still here"), "still here", "carried during the drain");
  // The sidecar closes its end; the far sidecar passes that on as the end of the stream.
  await lingering.closed;
  t.pass("the tunnel was closed at limits.drainTimeoutMs");
  t.equal(await proc.exited, 0);
});
