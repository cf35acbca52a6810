// The floor of the new-connection row: a bare node:tls server with the callee's certificate, the
// same TLS settings as a sidecar's inbound (TLS 1.3, its default cipher suites, a client
// certificate from the mesh CA required, CRL loaded), that answers `openssl s_time -www /` with a
// fixed HTTP/1.0 answer and closes. Its CPU per full handshake is what Node's TLS costs with no
// proxy around it, on the same Node the sidecars run on: what a sidecar spends above it is its own.
// Run as `node dist/bench/tls-floor.js '{"cert":…,"key":…,"ca":…,"crl":…}'`, pinned like the
// proxies; prints {"port":N} once it listens.
import { readFileSync } from "node:fs";
import type { AddressInfo } from "node:net";
import tls from "node:tls";
import type { TlsFiles } from "./pair.js";

const files = JSON.parse(process.argv[2] ?? "{}") as TlsFiles;
const ANSWER = Buffer.from("HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n");

const server = tls.createServer(
  {
    cert: readFileSync(files.cert),
    key: readFileSync(files.key),
    ca: readFileSync(files.ca),
    crl: readFileSync(files.crl),
    // The sidecar's defaults (config/schema.ts: tls.minVersion, tls.ciphers).
    minVersion: "TLSv1.3",
    ciphers: "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256",
    honorCipherOrder: true,
    requestCert: true,
    rejectUnauthorized: true,
  },
  (socket) => {
    let head = "";
    socket.setEncoding("latin1");
    socket.on("data", (chunk: string) => {
      head += chunk;
      if (head.includes("\r\n\r\n")) socket.end(ANSWER);
    });
    socket.on("error", () => socket.destroy());
  },
);
server.on("tlsClientError", () => undefined);
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(`${JSON.stringify({ port: (server.address() as AddressInfo).port })}\n`);
});
const stop = () => server.close(() => process.exit(0));
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
