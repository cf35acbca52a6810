// Bodies stream through the sidecar pair in both directions (the app sees the first bytes
// before the client has sent the last); hop-by-hop headers (RFC 9110 §7.6.1) and headers named
// by Connection are dropped both ways; request-smuggling vectors never reach the app.
import { createHash } from "node:crypto";
import http from "node:http";
import net from "node:net";
import t from "tap";
import { app, eventually, pki, rawTls, sidecar, type Tap as TestLike } from "./lib/mesh.js";

const CHUNK = Buffer.alloc(64 * 1024, "a");
const CHUNKS = 256; // 16 MiB

async function pair(t: TestLike, handler?: Parameters<typeof app>[1]) {
  const p = await pki(t);
  const backend = await app(t, handler);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url, allow: ["gateway.ashchan.local"] },
    outbound: { enabled: false },
  });
  const gw = await sidecar(t, p, "gateway.ashchan.local", {
    inbound: { enabled: false },
    outbound: { resolve: { "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}` } },
  });
  return { p, backend, auth, gw };
}

t.test("a 16 MiB upload streams through both sidecars", async (t) => {
  let received = 0;
  const hash = createHash("sha256");
  const p = await pki(t);
  const appServer = http.createServer((req, res) => {
    req.on("data", (c: Buffer) => {
      received += c.length;
      hash.update(c);
    });
    req.on("end", () => res.end(JSON.stringify({ received, sha256: hash.digest("hex") })));
  });
  await new Promise<void>((r) => appServer.listen(0, "127.0.0.1", r));
  t.teardown(() => appServer.close());
  const appUrl = `http://127.0.0.1:${(appServer.address() as net.AddressInfo).port}`;
  const auth = await sidecar(t, p, "auth.ashchan.local", { inbound: { app: appUrl }, outbound: { enabled: false } });
  const gw = await sidecar(t, p, "gateway.ashchan.local", {
    inbound: { enabled: false },
    outbound: { resolve: { "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}` } },
  });
  const expected = createHash("sha256");
  const answer = await new Promise<string>((resolve, reject) => {
    const req = http.request(
      {
        host: "127.0.0.1",
        port: gw.outboundPort,
        method: "POST",
        path: "http://auth.ashchan.local/upload",
        headers: { host: "auth.ashchan.local" },
      },
      (res) => {
        let body = "";
        res.on("data", (d) => (body += d));
        res.on("end", () => resolve(body));
      },
    );
    req.on("error", reject);
    (async () => {
      req.write(CHUNK);
      expected.update(CHUNK);
      // Streaming, not buffering: the app has bytes while the client still holds the rest.
      t.ok(await eventually(() => received > 0, 5_000), "the app received the first chunk before the upload finished");
      for (let i = 1; i < CHUNKS; i++) {
        expected.update(CHUNK);
        if (!req.write(CHUNK)) await new Promise((r) => req.once("drain", r));
      }
      req.end();
    })().catch(reject);
  });
  t.same(JSON.parse(answer), { received: CHUNK.length * CHUNKS, sha256: expected.digest("hex") });
});

t.test("a 16 MiB download streams back", async (t) => {
  let release: () => void = () => {};
  const released = new Promise<void>((r) => (release = r));
  const { gw } = await pair(t, async (_req, res) => {
    res.writeHead(200, { "content-type": "application/octet-stream" });
    res.write(CHUNK);
    await released; // the rest only once the client has the first chunk
    for (let i = 1; i < CHUNKS; i++) if (!res.write(CHUNK)) await new Promise((r) => res.once("drain", r));
    res.end();
  });
  const result = await new Promise<{ bytes: number; sha256: string }>((resolve, reject) => {
    const hash = createHash("sha256");
    let bytes = 0;
    http
      .get(
        {
          host: "127.0.0.1",
          port: gw.outboundPort,
          path: "http://auth.ashchan.local/big",
          headers: { host: "auth.ashchan.local" },
        },
        (res) => {
          res.on("data", (c: Buffer) => {
            if (bytes === 0) release();
            bytes += c.length;
            hash.update(c);
          });
          res.on("end", () => resolve({ bytes, sha256: hash.digest("hex") }));
        },
      )
      .on("error", reject);
  });
  const expected = createHash("sha256");
  for (let i = 0; i < CHUNKS; i++) expected.update(CHUNK);
  t.same(result, { bytes: CHUNK.length * CHUNKS, sha256: expected.digest("hex") });
});

t.test("hop-by-hop headers are dropped both ways; end-to-end ones pass, repeated ones stay repeated", async (t) => {
  const { backend, gw } = await pair(t, (_req, res) => {
    res.writeHead(200, [
      "Connection",
      "x-app-private",
      "X-App-Private",
      "secret",
      "Keep-Alive",
      "timeout=99",
      "Proxy-Authenticate",
      "Basic",
      "Set-Cookie",
      "a=1",
      "Set-Cookie",
      "b=2",
      "Content-Length",
      "2",
    ]);
    res.end("ok");
  });
  const raw = await new Promise<string>((resolve) => {
    const s = net.connect(gw.outboundPort, "127.0.0.1", () =>
      s.write(
        "GET http://auth.ashchan.local/h HTTP/1.1\r\nHost: auth.ashchan.local\r\nConnection: x-client-private\r\nX-Client-Private: 1\r\n" +
          "Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\n" +
          "X-Request-Id: r-1\r\n\r\n",
      ),
    );
    let data = "";
    s.on("data", (d) => {
      data += d;
      if (data.includes("\r\n\r\nok")) s.end();
    });
    s.on("close", () => resolve(data));
  });
  const seen = backend.seen[0]?.headers ?? {};
  t.equal(seen["x-request-id"], "r-1", "an end-to-end header passes");
  for (const name of ["x-client-private", "keep-alive", "te", "proxy-authorization", "proxy-connection"]) {
    t.equal(seen[name], undefined, `request: ${name} dropped`);
  }
  t.notMatch(raw, /x-app-private/i, "response: a header named by Connection is dropped");
  t.notMatch(raw, /timeout=99/, "response: Keep-Alive of the app is dropped");
  t.notMatch(raw, /Proxy-Authenticate/i);
  t.equal(raw.match(/^set-cookie: /gim)?.length, 2, "both Set-Cookie headers arrive");
});

t.test("request smuggling vectors are refused before the app", async (t) => {
  const { p, backend, auth, gw } = await pair(t);
  const vectors = [
    "POST http://auth.ashchan.local/a HTTP/1.1\r\nHost: auth.ashchan.local\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "POST http://auth.ashchan.local/a HTTP/1.1\r\nHost: auth.ashchan.local\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcdGET /smuggled HTTP/1.1\r\n\r\n",
    "POST http://auth.ashchan.local/a HTTP/1.1\r\nHost: auth.ashchan.local\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    "POST http://auth.ashchan.local/a HTTP/1.1\r\nHost: auth.ashchan.local\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
  ];
  for (const vector of vectors) {
    const reply = await new Promise<string>((resolve) => {
      const s = net.connect(gw.outboundPort, "127.0.0.1", () => s.write(vector));
      let data = "";
      s.setTimeout(3_000, () => s.destroy());
      s.on("data", (d) => (data += d));
      s.on("error", () => undefined);
      s.on("close", () => resolve(data));
    });
    t.match(reply, /^HTTP\/1\.1 400/, `outbound: ${JSON.stringify(vector.split("\r\n").slice(2, 4))}`);
  }
  // The same against inbound, over mTLS with a valid client certificate.
  const gwFiles = p.files("gateway.ashchan.local");
  const creds = {
    cert: p.read(gwFiles.cert),
    key: p.read(gwFiles.key),
    ca: p.read(p.trust.ca),
    servername: "auth.ashchan.local",
  };
  for (const vector of vectors) {
    const reply = await rawTls(auth.inboundPort, creds, vector.replace("http://auth.ashchan.local", ""));
    t.match(reply.data, /^HTTP\/1\.1 400/, "inbound refuses it too");
  }
  t.notOk(
    backend.seen.some((r) => r.url.includes("smuggled")),
    "no smuggled request reached the app",
  );
});

t.test("an upgrade to an app that does not upgrade gets the app's answer, not a hang", async (t) => {
  const { gw, backend } = await pair(t);
  const reply = await new Promise<string>((resolve) => {
    const s = net.connect(gw.outboundPort, "127.0.0.1", () =>
      s.write(
        "GET http://auth.ashchan.local/ws HTTP/1.1\r\nHost: auth.ashchan.local\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
      ),
    );
    let data = "";
    s.on("data", (d) => {
      data += d;
      if (data.includes("\r\n\r\n")) s.end();
    });
    s.on("close", () => resolve(data));
  });
  t.match(reply, /^HTTP\/1\.1 200 /, "the app answered the request as a plain one");
  t.equal(backend.seen[0]?.url, "/ws");
});
