// Hostile inputs, class HTTP framing: request heads that parsers read differently, sent by a
// verified peer to the inbound and by the local app to the outbound. Each row states the status
// expected; every refused row must leave the app untouched (no request, and no injected header),
// and the connection closed, so that nothing after a refused head is taken as a request.
import t from "tap";
import { statusLine, tcpExchange } from "./lib/hostile.js";
import { app, pki, rawTls, sample, sidecar } from "./lib/mesh.js";

const many = (n: number) => Array.from({ length: n }, (_, i) => `X-H${i}: ${i}\r\n`).join("");

/** Each row: the raw request head (and body), the status expected back. */
const ROWS: Array<{ input: string; raw: string; status: number }> = [
  { input: "a plain GET (control row)", raw: "GET /ok HTTP/1.1\r\nHost: auth\r\n\r\n", status: 200 },
  {
    input: "CR LF inside the request target (header injection)",
    raw: "GET /a\r\nX-Injected: 1 HTTP/1.1\r\nHost: auth\r\n\r\n",
    status: 400,
  },
  {
    input: "2,100 header lines, then Content-Length and a body",
    raw: `POST /big HTTP/1.1\r\nHost: auth\r\n${many(2100)}Content-Length: 5\r\n\r\nhello`,
    status: 431,
  },
  {
    input: "one header of 64 KiB",
    raw: `GET / HTTP/1.1\r\nHost: auth\r\nX-Big: ${"a".repeat(65_536)}\r\n\r\n`,
    status: 431,
  },
  { input: "10,000 header lines", raw: `GET / HTTP/1.1\r\nHost: auth\r\n${many(10_000)}\r\n`, status: 431 },
  {
    input: "101 header lines (limits.maxRequestHeaders is 100)",
    raw: `GET / HTTP/1.1\r\n${many(100)}Host: auth\r\n\r\n`,
    status: 431,
  },
  { input: "two Host headers", raw: "GET / HTTP/1.1\r\nHost: auth\r\nHost: evil\r\n\r\n", status: 400 },
  {
    input: "Content-Length and Transfer-Encoding together",
    raw: "POST / HTTP/1.1\r\nHost: auth\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    status: 400,
  },
  {
    input: "two different Content-Length",
    raw: "POST / HTTP/1.1\r\nHost: auth\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    status: 400,
  },
  {
    input: "Transfer-Encoding: chunked, identity",
    raw: "POST / HTTP/1.1\r\nHost: auth\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    status: 400,
  },
  {
    input: "obs-fold (a header continued on the next line)",
    raw: "GET / HTTP/1.1\r\nHost: auth\r\nX-A: 1\r\n  folded\r\n\r\n",
    status: 400,
  },
  { input: "a space before the colon", raw: "GET / HTTP/1.1\r\nHost: auth\r\nX-A : 1\r\n\r\n", status: 400 },
  { input: "NUL in a header value", raw: "GET / HTTP/1.1\r\nHost: auth\r\nX-A: a\0b\r\n\r\n", status: 400 },
  { input: "bare LF line ends", raw: "GET / HTTP/1.1\nHost: auth\n\n", status: 400 },
  { input: "HTTP/2.0 in an HTTP/1 request line", raw: "GET / HTTP/2.0\r\nHost: auth\r\n\r\n", status: 400 },
];

t.test("inbound: what a verified peer's request heads get", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url, allow: ["gateway.ashchan.local"] },
    outbound: { enabled: false },
  });
  const gw = p.files(await p.identity("gateway.ashchan.local").then(() => "gateway.ashchan.local"));
  const creds = {
    cert: p.read(gw.cert),
    key: p.read(gw.key),
    ca: p.read(p.trust.ca),
    servername: "auth.ashchan.local",
  };
  for (const row of ROWS) {
    const seen = backend.seen.length;
    const r = await rawTls(auth.inboundPort, creds, row.raw);
    t.match(statusLine(r.data), new RegExp(`^HTTP/1\\.1 ${row.status} `), `${row.input}: ${row.status}`);
    if (row.status === 200) {
      t.equal(backend.seen.length, seen + 1, `${row.input}: reached the app`);
      continue;
    }
    t.equal(backend.seen.length, seen, `${row.input}: nothing reached the app`);
    if (row.status === 431) t.match(r.data, /x-ashmesh-error: headers_too_large/, `${row.input}: names the limit`);
  }
  t.notOk(
    backend.seen.some((s) => "x-injected" in s.headers),
    "no request with an injected header ever reached the app",
  );
  t.ok(
    sample(await auth.metrics(), "mtls_requests_total", {
      direction: "inbound",
      peer: "gateway.ashchan.local",
      code: "431",
    }) >= 4,
    "431s are counted in mtls_requests_total",
  );
});

t.test("a refused head closes the connection: its body is never read as a request", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url, allow: ["gateway.ashchan.local"] },
    outbound: { enabled: false },
  });
  const gw = p.files(await p.identity("gateway.ashchan.local").then(() => "gateway.ashchan.local"));
  const creds = {
    cert: p.read(gw.cert),
    key: p.read(gw.key),
    ca: p.read(p.trust.ca),
    servername: "auth.ashchan.local",
  };
  // The body of the refused request is itself a complete request: it must not be served.
  const smuggled = "GET /smuggled HTTP/1.1\r\nHost: auth\r\n\r\n";
  const r = await rawTls(
    auth.inboundPort,
    creds,
    `POST / HTTP/1.1\r\n${many(150)}Host: auth\r\nContent-Length: ${smuggled.length}\r\n\r\n${smuggled}`,
  );
  t.match(statusLine(r.data), /^HTTP\/1\.1 431 /);
  t.match(r.data, /\r\nconnection: close\r\n/i, "the answer says the connection closes");
  t.equal((r.data.match(/HTTP\/1\.1 /g) ?? []).length, 1, "one answer only");
  t.same(backend.seen, [], "the smuggled request never reached the app");
});

t.test("outbound: what the local app's request heads get", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url },
    outbound: { enabled: false },
  });
  const gw = await sidecar(t, p, "gateway.ashchan.local", {
    inbound: { enabled: false },
    outbound: {
      destinations: ["auth.ashchan.local"],
      resolve: { "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}` },
    },
  });
  for (const row of ROWS) {
    // The forward proxy reads absolute-form targets: the same heads, aimed at auth.
    const raw = row.raw.replace(/^(\w+) \//, "$1 http://auth.ashchan.local/");
    const seen = backend.seen.length;
    const r = await tcpExchange(gw.outboundPort, raw.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n"));
    t.match(statusLine(r.data), new RegExp(`^HTTP/1\\.1 ${row.status} `), `${row.input}: ${row.status}`);
    if (row.status !== 200) t.equal(backend.seen.length, seen, `${row.input}: nothing reached auth's app`);
  }
  t.notOk(
    backend.seen.some((s) => "x-injected" in s.headers),
    "no injected header crossed the mesh",
  );
});
