// App down → 502, app too slow → 504, both JSON naming the reason and the target; a response cut
// mid-body is cut for the client too (never passed off as complete).
import net from "node:net";
import t from "tap";
import { request } from "undici";
import { app, mtlsAgent, pki, sample, sidecar } from "./lib/mesh.js";

t.test("502 when the app refuses, 504 when it is too slow", async (t) => {
  const p = await pki(t);
  await p.identity("gateway.ashchan.local");
  // A port with nothing listening: bind one, note it, close it.
  const closed = net.createServer();
  await new Promise<void>((r) => closed.listen(0, "127.0.0.1", r));
  const deadPort = (closed.address() as net.AddressInfo).port;
  await new Promise<void>((r) => closed.close(() => r()));
  const down = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: `http://127.0.0.1:${deadPort}` },
    outbound: { enabled: false },
  });
  const agent = mtlsAgent(p, "gateway.ashchan.local", { servername: "auth.ashchan.local" });
  const r502 = await request(`https://127.0.0.1:${down.inboundPort}/api/v1/verify`, { dispatcher: agent });
  t.equal(r502.statusCode, 502);
  t.equal(r502.headers["content-type"], "application/json");
  const b502 = (await r502.body.json()) as Record<string, string>;
  t.equal(b502.error, "app_unavailable");
  t.match(b502.message, new RegExp(`127\\.0\\.0\\.1:${deadPort} refused the connection`));
  t.equal(
    sample(await down.metrics(), "mtls_requests_total", {
      direction: "inbound",
      peer: "gateway.ashchan.local",
      code: "502",
    }),
    1,
  );

  const slowApp = await app(t, (_req, res) => {
    setTimeout(() => res.end("late"), 1_500).unref();
  });
  const slow = await sidecar(t, p, "boards.ashchan.local", {
    inbound: { app: slowApp.url },
    outbound: { enabled: false },
    limits: { upstreamTimeoutMs: 300 },
  });
  const agent2 = mtlsAgent(p, "gateway.ashchan.local", { servername: "boards.ashchan.local" });
  const r504 = await request(`https://127.0.0.1:${slow.inboundPort}/slow`, { dispatcher: agent2 });
  t.equal(r504.statusCode, 504);
  const b504 = (await r504.body.json()) as Record<string, string>;
  t.equal(b504.error, "app_timeout");
  t.match(b504.message, /did not answer in time/);
});

t.test("an app that dies mid-body: the client's response is cut, not completed", async (t) => {
  const p = await pki(t);
  await p.identity("gateway.ashchan.local");
  const dying = await app(t, (_req, res) => {
    res.writeHead(200, { "content-length": "1000" });
    res.write("partial");
    setTimeout(() => res.socket?.destroy(), 50);
  });
  const auth = await sidecar(t, p, "auth.ashchan.local", { inbound: { app: dying.url }, outbound: { enabled: false } });
  const res = await request(`https://127.0.0.1:${auth.inboundPort}/`, {
    dispatcher: mtlsAgent(p, "gateway.ashchan.local", { servername: "auth.ashchan.local" }),
  });
  t.equal(res.statusCode, 200);
  await t.rejects(res.body.text(), "reading the body fails: the client knows it is incomplete");
});
