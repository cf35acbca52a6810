// The upstream app of the bench: node:http with keep-alive and one fixed small JSON answer, so
// that what varies between the paths is the proxies alone. `/echo` answers with the
// x-forwarded-client-cert header it received, which lets the harness check that a request really
// came through an mTLS pair. The same answers are also served over cleartext HTTP/2 with prior
// knowledge on a second port: the direct path of the HTTP/2 row (h2load speaks h2c to it).
// Prints {"port":N,"h2cPort":M} on stdout once both listen.
import http from "node:http";
import http2 from "node:http2";
import type { AddressInfo } from "node:net";

const BODY = Buffer.from('{"ok":true,"service":"auth","items":[1,2,3]}');

/** The answer's body to a request, whichever server it came to. */
function answer(url: string | undefined, headers: http.IncomingHttpHeaders): Buffer {
  if (url !== "/echo") return BODY;
  const host = headers.host ?? headers[":authority"];
  return Buffer.from(JSON.stringify({ xfcc: headers["x-forwarded-client-cert"] ?? null, host }));
}

const server = http.createServer({ keepAliveTimeout: 60_000, noDelay: true }, (req, res) => {
  const body = answer(req.url, req.headers);
  // Drain a request body, if any, before answering.
  req.resume();
  res.writeHead(200, { "content-type": "application/json", "content-length": body.length });
  res.end(body);
});
server.keepAliveTimeout = 60_000;
server.maxRequestsPerSocket = 0;

const h2c = http2.createServer({}, (req, res) => {
  const body = answer(req.url, req.headers);
  req.resume();
  res.writeHead(200, { "content-type": "application/json", "content-length": body.length });
  res.end(body);
});

const port = Number(process.argv[2] ?? 0);
const listening = (s: http.Server | http2.Http2Server, p: number) =>
  new Promise<number>((resolve) => s.listen(p, "127.0.0.1", () => resolve((s.address() as AddressInfo).port)));
Promise.all([listening(server, port), listening(h2c, 0)]).then(([httpPort, h2cPort]) => {
  process.stdout.write(`${JSON.stringify({ port: httpPort, h2cPort })}\n`);
});
const stop = () => {
  server.closeAllConnections();
  h2c.close();
  server.close(() => process.exit(0));
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
