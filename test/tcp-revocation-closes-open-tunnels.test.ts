// A tunnel lives as long as its connection, so a revocation must reach tunnels already open: a
// new CRL that revokes the client closes its tunnel at the tcp.inbound (as the HTTP inbound closes
// a revoked client's keep-alive connection), one that revokes the server closes the tunnel at the
// tcp.outbound. Other tunnels stay up; the revoked peer's next attempt carries nothing. Waits on
// the close event, with a bound no tighter than the HTTP revocation test's.
import net from "node:net";
import t from "tap";
import { eventually, type Pki, pki, type RunningSidecar, sample, sidecar, type Tap } from "./lib/mesh.js";
import { type CountingServer, countingServer } from "./lib/tcp.js";

/** An app's connection through a tcp.outbound, with an echo check and its close as a promise. */
async function openTunnel(
  port: number,
): Promise<{ socket: net.Socket; echo(text: string): Promise<string>; closed: Promise<void> }> {
  const socket = net.connect(port, "127.0.0.1");
  socket.on("error", () => undefined);
  await new Promise((resolve) => socket.once("connect", resolve));
  const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
  return {
    socket,
    closed,
    echo: (text) =>
      new Promise((resolve, reject) => {
        let got = "";
        const onData = (d: Buffer) => {
          got += d.toString("latin1");
          if (got.length >= text.length) {
            socket.off("data", onData);
            resolve(got);
          }
        };
        socket.on("data", onData);
        socket.once("close", () => reject(new Error(`closed after ${JSON.stringify(got)}`)));
        socket.write(text);
      }),
  };
}

/** Resolves true when `closed` settles within `ms`; false otherwise. */
const closesWithin = (closed: Promise<void>, ms: number) =>
  Promise.race([closed.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), ms).unref())]);

async function meshOf(t: Tap, p: Pki, target: CountingServer) {
  const media = await sidecar(t, p, "media.ashchan.local", {
    inbound: { enabled: false },
    outbound: { enabled: false },
    tcp: {
      inbound: [
        {
          name: "echo",
          listen: "127.0.0.1:0",
          target: target.target,
          allow: ["boards.ashchan.local", "gateway.ashchan.local"],
        },
      ],
    },
  });
  const client = (name: string) =>
    sidecar(t, p, name, {
      inbound: { enabled: false },
      outbound: { enabled: false },
      tcp: {
        outbound: [
          {
            name: "media",
            listen: "127.0.0.1:0",
            target: `127.0.0.1:${media.tcpPorts.echo}`,
            identity: "media.ashchan.local",
          },
        ],
      },
    });
  return { media, boards: await client("boards.ashchan.local"), gateway: await client("gateway.ashchan.local") };
}

const port = (s: RunningSidecar) => s.tcpPorts.media as number;

t.test("a revoked client's open tunnel is closed by the tcp.inbound", async (t) => {
  const p = await pki(t);
  const target = await countingServer(t);
  const { media, boards, gateway } = await meshOf(t, p, target);
  const revokedTunnel = await openTunnel(port(boards));
  const otherTunnel = await openTunnel(port(gateway));
  t.equal(await revokedTunnel.echo("before"), "before", "boards' tunnel works");
  t.equal(await otherTunnel.echo("before"), "before", "gateway's tunnel works");
  t.equal(target.open, 2, "two tunnels open at the target");

  const revokedAt = Date.now();
  await p.ca.revoke("boards.ashchan.local");
  t.ok(await closesWithin(revokedTunnel.closed, 5_000), "boards' tunnel is closed");
  t.comment(`closed ${Date.now() - revokedAt} ms after the CRL write`);
  t.ok(await eventually(() => target.open === 1, 5_000), "and its connection to the target with it");
  t.equal(await otherTunnel.echo("after"), "after", "gateway's tunnel is untouched");

  t.match(media.logs.events("mtls_connection_revoked"), [
    { direction: "inbound", listener: "echo", identity: "boards.ashchan.local" },
  ]);
  t.equal(sample(await media.metrics(), "mtls_revoked_connections", { direction: "inbound" }), 1);

  // A new attempt: refused in the handshake, nothing reaches the target.
  const before = target.connections;
  const again = await openTunnel(port(boards));
  await t.rejects(again.echo("let me in"), "a new tunnel from boards carries nothing");
  t.equal(target.connections, before, "the target saw no new connection");
  otherTunnel.socket.destroy();
});

t.test("a revoked server's open tunnel is closed by the tcp.outbound", async (t) => {
  const p = await pki(t);
  const target = await countingServer(t);
  const { boards } = await meshOf(t, p, target);
  const tunnel = await openTunnel(port(boards));
  t.equal(await tunnel.echo("before"), "before");

  await p.ca.revoke("media.ashchan.local");
  t.ok(await closesWithin(tunnel.closed, 5_000), "the tunnel to the revoked server is closed");
  t.match(boards.logs.events("mtls_connection_revoked"), [
    { direction: "outbound", listener: "media", identity: "media.ashchan.local" },
  ]);
  t.equal(sample(await boards.metrics(), "mtls_revoked_connections", { direction: "outbound" }), 1);

  const again = await openTunnel(port(boards));
  await t.rejects(again.echo("hello?"), "no new tunnel to it");
  t.match(boards.logs.events("mtls_handshake_failed").at(-1), { listener: "media", reason: "revoked" });
});
