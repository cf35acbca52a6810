// WebSocket across the mesh, with the `ws` package on both ends: the upgrade passes the
// allow-list and carries x-forwarded-client-cert like any request, messages flow both ways through
// the sidecar pair, a refused identity gets no 101, and revoking the client's certificate closes
// an open socket.
import { once } from "node:events";
import type { IncomingMessage } from "node:http";
import type { AddressInfo } from "node:net";
import type { ConnectionOptions } from "node:tls";
import t from "tap";
import WebSocket, { WebSocketServer } from "ws";
import { eventually, type Pki, pki, sample, sidecar, type Tap } from "./lib/mesh.js";

interface WsApp {
  port: number;
  /** x-forwarded-client-cert of every upgrade the app accepted. */
  xfcc: string[];
  closed: number;
}

/** A WebSocket echo app on loopback. */
async function wsApp(t: Tap): Promise<WsApp> {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await once(server, "listening");
  const state: WsApp = { port: (server.address() as AddressInfo).port, xfcc: [], closed: 0 };
  server.on("connection", (socket: WebSocket, req: IncomingMessage) => {
    state.xfcc.push(String(req.headers["x-forwarded-client-cert"] ?? ""));
    socket.on("message", (data: Buffer) => socket.send(`echo:${data.toString()}`));
    socket.on("close", () => state.closed++);
  });
  t.teardown(() => server.close());
  return state;
}

async function pair(t: Tap, p: Pki, allow: string[]) {
  const backend = await wsApp(t);
  const media = await sidecar(t, p, "media.ashchan.local", {
    inbound: { app: `http://127.0.0.1:${backend.port}`, allow },
    outbound: { enabled: false },
  });
  const boards = await sidecar(t, p, "boards.ashchan.local", {
    inbound: { enabled: false },
    outbound: {
      resolve: { "media.ashchan.local": `127.0.0.1:${media.inboundPort}` },
      upstreams: { media: { listen: "127.0.0.1:0", target: "media.ashchan.local:8443" } },
    },
  });
  const mapped = boards.sidecar.addresses.outbound.find((l) => l.name === "upstream media")?.address.port ?? 0;
  return { backend, media, boards, url: `ws://127.0.0.1:${mapped}/live` };
}

t.test("messages both ways through the pair; the app sees who called", async (t) => {
  const p = await pki(t);
  const { backend, media, url } = await pair(t, p, ["boards.ashchan.local"]);
  const ws = new WebSocket(url);
  await once(ws, "open");
  const replies: string[] = [];
  ws.on("message", (d: Buffer) => replies.push(d.toString()));
  for (const m of ["one", "two", "x".repeat(200_000)]) ws.send(m);
  t.ok(await eventually(() => replies.length === 3, 10_000), "three answers");
  t.same(replies.slice(0, 2), ["echo:one", "echo:two"]);
  t.equal(replies[2]?.length, 200_005, "a 200 kB message");
  t.match(backend.xfcc[0], /DNS=boards\.ashchan\.local/, "the upgrade carried the caller's identity");
  ws.close();
  await once(ws, "close");
  t.equal(
    sample(await media.metrics(), "mtls_requests_total", { direction: "inbound", protocol: "ws", code: "101" }),
    1,
    "counted as protocol=ws, 101",
  );
});

t.test("a refused identity gets no 101", async (t) => {
  const p = await pki(t);
  const { backend, url } = await pair(t, p, ["gateway.ashchan.local"]);
  const ws = new WebSocket(url);
  ws.on("error", () => undefined); // terminate() below reports the refused handshake as an error
  const [, res] = (await once(ws, "unexpected-response")) as [unknown, IncomingMessage];
  t.equal(res.statusCode, 403, "403, not 101");
  t.equal(res.headers["x-ashmesh-error"], "forbidden");
  t.same(backend.xfcc, [], "the app never saw the upgrade");
  ws.terminate();
});

t.test("revoking the caller closes its open WebSocket", async (t) => {
  const p = await pki(t);
  const backend = await wsApp(t);
  const media = await sidecar(t, p, "media.ashchan.local", {
    inbound: { app: `http://127.0.0.1:${backend.port}`, allow: ["boards.ashchan.local"] },
    outbound: { enabled: false },
  });
  const boards = p.files(await p.identity("boards.ashchan.local").then(() => "boards.ashchan.local"));
  // Straight to media's inbound, as boards' sidecar would connect: wss with boards' certificate.
  const tlsOptions: WebSocket.ClientOptions & ConnectionOptions = {
    cert: p.read(boards.cert),
    key: p.read(boards.key),
    ca: p.read(p.trust.ca),
    servername: "media.ashchan.local",
  };
  const ws = new WebSocket(`wss://127.0.0.1:${media.inboundPort}/live`, tlsOptions);
  await once(ws, "open");
  const closed = once(ws, "close");
  await p.ca.revoke("boards.ashchan.local");
  await closed;
  t.pass("the socket closed after the CRL changed");
  t.ok(await eventually(() => backend.closed === 1, 10_000), "the app's side of the tunnel closed too");
  t.match(media.logs.events("mtls_connection_revoked")[0], { identity: "boards.ashchan.local" });
});
