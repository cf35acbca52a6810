// The upstream app of the bench: node:http with keep-alive and one fixed small JSON answer, so
// that what varies between the paths is the proxies alone. `/echo` answers with the
// x-forwarded-client-cert header it received, which lets the harness check that a request really
// came through an mTLS pair. Prints {"port":N} on stdout once it listens.
import http from "node:http";
import type { AddressInfo } from "node:net";

const BODY = Buffer.from('{"ok":true,"service":"auth","items":[1,2,3]}');

const server = http.createServer({ keepAliveTimeout: 60_000, noDelay: true }, (req, res) => {
  if (req.url === "/echo") {
    const body = JSON.stringify({ xfcc: req.headers["x-forwarded-client-cert"] ?? null, host: req.headers.host });
    res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
    res.end(body);
    return;
  }
  // Drain a request body, if any, before answering.
  req.resume();
  res.writeHead(200, { "content-type": "application/json", "content-length": BODY.length });
  res.end(BODY);
});
server.keepAliveTimeout = 60_000;
server.maxRequestsPerSocket = 0;

const port = Number(process.argv[2] ?? 0);
server.listen(port, "127.0.0.1", () => {
  process.stdout.write(`${JSON.stringify({ port: (server.address() as AddressInfo).port })}\n`);
});
const stop = () => {
  server.closeAllConnections();
  server.close(() => process.exit(0));
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
