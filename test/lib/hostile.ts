// Helpers for the hostile-input suite (test/hostile-*.test.ts): certificates the development CA
// would never issue, made with openssl and signed by that CA's key (so they chain and only the
// property under test is wrong), a captured ClientHello to replay, and raw TCP exchanges.
import { readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import tls from "node:tls";
import { NEW_P256_KEY, opensslOk } from "./certs.js";
import type { Pki } from "./mesh.js";

export interface OddCertificate {
  /** Subject, as openssl -subj takes it. */
  subject: string;
  /** subjectAltName value ("DNS:a,URI:spiffe://x"), or null for a certificate without any SAN. */
  san: string | null;
  /** basicConstraints CA:TRUE. */
  ca?: boolean;
  /** The key: ECDSA P-256 (default) or RSA of this many bits. */
  rsaBits?: number;
  extendedKeyUsage?: string;
}

let counter = 0;

/** A certificate and key signed by the dev CA of `p`, with exactly the oddity asked for. */
export async function oddCertificate(p: Pki, spec: OddCertificate): Promise<{ cert: Buffer; key: Buffer }> {
  const name = `odd${++counter}`;
  const dir = p.dir;
  const ext = [
    `basicConstraints=critical,CA:${spec.ca ? "TRUE" : "FALSE"}`,
    `extendedKeyUsage=${spec.extendedKeyUsage ?? "serverAuth,clientAuth"}`,
    ...(spec.san ? [`subjectAltName=${spec.san}`] : []),
  ];
  writeFileSync(join(dir, `${name}.ext`), `${ext.join("\n")}\n`);
  const newKey = spec.rsaBits ? ["-newkey", `rsa:${spec.rsaBits}`, "-nodes"] : NEW_P256_KEY;
  await opensslOk(["req", ...newKey, "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", spec.subject], {
    cwd: dir,
  });
  const ca = p.ca.caFiles(p.ca.active);
  await opensslOk(
    [
      ...["x509", "-req", "-sha256", "-in", `${name}.csr`, "-CA", ca.cert, "-CAkey", ca.key],
      ...["-set_serial", `0x${(4096 + counter).toString(16)}`, "-days", "10", "-extfile", `${name}.ext`],
      ...["-out", `${name}.crt`],
    ],
    { cwd: dir },
  );
  return { cert: readFileSync(join(dir, `${name}.crt`)), key: readFileSync(join(dir, `${name}.key`)) };
}

/** The bytes of a real TLS 1.3 ClientHello for `servername`, as a client first sends them. */
export async function clientHello(servername: string): Promise<Buffer> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  const first = new Promise<Buffer>((resolve) =>
    server.once("connection", (s) => s.once("data", (chunk: Buffer) => resolve(chunk))),
  );
  const client = tls.connect({ host: "127.0.0.1", port, servername, rejectUnauthorized: false });
  client.on("error", () => undefined);
  const hello = await first;
  client.destroy();
  server.close();
  return hello;
}

/** Writes `bytes` on a plain TCP connection and collects what comes back until the peer closes (or `ms`). */
export function tcpExchange(
  port: number,
  bytes: string | Buffer,
  options: { ms?: number; localAddress?: string } = {},
): Promise<{ data: string; error: string | null; closedByPeer: boolean }> {
  return new Promise((resolve) => {
    const result = { data: "", error: null as string | null, closedByPeer: false };
    const socket = net.connect({
      host: "127.0.0.1",
      port,
      ...(options.localAddress ? { localAddress: options.localAddress } : {}),
    });
    const timer = setTimeout(() => socket.destroy(), options.ms ?? 5_000);
    socket.on("connect", () => socket.write(bytes));
    socket.on("data", (d: Buffer) => {
      result.data += d.toString("latin1");
    });
    socket.on("end", () => {
      result.closedByPeer = true;
    });
    socket.on("error", (err: NodeJS.ErrnoException) => {
      result.error = err.code ?? err.message;
      result.closedByPeer = true;
    });
    socket.on("close", () => {
      clearTimeout(timer);
      resolve(result);
    });
  });
}

/** The first line of an HTTP answer ("HTTP/1.1 431 Request Header Fields Too Large"), or "". */
export const statusLine = (data: string): string => data.split("\r\n")[0] ?? "";
