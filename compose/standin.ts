// A stand-in for one Ashchan service (a PHP Hyperf app in the real mesh): plain HTTP only, no
// TLS code at all. It calls its peers at http://<name>.ashchan.local/... through HTTP_PROXY, as any
// app does once it is moved onto the mesh, and answers with what it saw: the caller identity from
// x-forwarded-client-cert and the answers of the calls it made (the post flow of seed 003).
import http from "node:http";
import type { AddressInfo } from "node:net";
import { loadMesh, type Mesh, type MeshService, service } from "../config/mesh.js";

export interface HopReport {
  service: string;
  served_by: string;
  /** The caller's identity, read from x-forwarded-client-cert (DNS=...); null without one. */
  caller: string | null;
  xfcc: string | null;
  calls: Array<{ to: string; method: string; path: string; status: number; error?: string; answer?: HopReport }>;
}

/** The DNS identities in an XFCC value (Envoy format: ...;DNS=a;DNS=b). */
export function xfccDns(value: string | undefined): string[] {
  if (!value) return [];
  return [...value.matchAll(/(?:^|;)DNS=("(?:[^"\\]|\\.)*"|[^;,]*)/g)].map((m) => (m[1] ?? "").replace(/^"|"$/g, ""));
}

function callThroughProxy(
  agent: http.Agent,
  proxy: URL,
  url: string,
  method: string,
  body: string,
): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const target = new URL(url);
    const withBody = method !== "GET" && method !== "HEAD";
    const req = http.request(
      {
        host: proxy.hostname,
        port: Number(proxy.port),
        method,
        path: url, // absolute-form: what an HTTP client sends to its HTTP_PROXY
        headers: {
          host: target.host,
          ...(withBody ? { "content-type": "application/json", "content-length": Buffer.byteLength(body) } : {}),
        },
        agent,
        timeout: 10_000,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString("utf8") }));
      },
    );
    req.on("timeout", () => req.destroy(new Error("timed out after 10 s")));
    req.on("error", reject);
    req.end(withBody ? body : undefined);
  });
}

export interface StandinOptions {
  mesh: Mesh;
  key: string;
  /** The sidecar's forward proxy, e.g. http://127.0.0.1:15001 (HTTP_PROXY). */
  proxy: string;
  host: string;
  port: number;
}

export function createStandinApp(options: StandinOptions): http.Server {
  const self: MeshService = service(options.mesh, options.key);
  const proxy = new URL(options.proxy);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", async () => {
      if (req.url === "/health") {
        res.writeHead(200, { "content-type": "application/json" });
        res.end(`{"status":"ok","service":"${self.serviceName}"}`);
        return;
      }
      const xfcc = req.headers["x-forwarded-client-cert"];
      const report: HopReport = {
        service: self.serviceName,
        served_by: self.dnsName,
        caller: xfccDns(typeof xfcc === "string" ? xfcc : undefined)[0] ?? null,
        xfcc: typeof xfcc === "string" ? xfcc : null,
        calls: [],
      };
      for (const call of self.calls) {
        const peer = service(options.mesh, call.to);
        const url = `http://${peer.dnsName}${call.path}`;
        try {
          const answer = await callThroughProxy(agent, proxy, url, call.method, JSON.stringify({ from: self.key }));
          let parsed: HopReport | undefined;
          try {
            parsed = JSON.parse(answer.text) as HopReport;
          } catch {
            parsed = undefined;
          }
          report.calls.push({
            to: peer.dnsName,
            method: call.method,
            path: call.path,
            status: answer.status,
            ...(answer.status >= 400 ? { error: answer.text.slice(0, 300) } : {}),
            ...(parsed?.served_by ? { answer: parsed } : {}),
          });
        } catch (err) {
          report.calls.push({
            to: peer.dnsName,
            method: call.method,
            path: call.path,
            status: 0,
            error: (err as Error).message,
          });
        }
      }
      const failed = report.calls.some((c) => c.status < 200 || c.status >= 300);
      const body = JSON.stringify(report);
      res.writeHead(failed ? 502 : 200, {
        "content-type": "application/json",
        "content-length": Buffer.byteLength(body),
      });
      res.end(body);
    });
  });
  server.on("close", () => agent.destroy());
  return server;
}

export async function startStandinApp(options: StandinOptions): Promise<{ server: http.Server; address: AddressInfo }> {
  const server = createStandinApp(options);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port, options.host, () => resolve());
  });
  return { server, address: server.address() as AddressInfo };
}

/** In a container: STANDIN_SERVICE (a key of the mesh file), MESH_FILE, HTTP_PROXY, STANDIN_HOST. */
async function main(): Promise<void> {
  const mesh = loadMesh(process.env.MESH_FILE ?? "compose/mesh.yaml");
  const key = process.env.STANDIN_SERVICE ?? "";
  const self = service(mesh, key);
  const { address } = await startStandinApp({
    mesh,
    key,
    proxy: process.env.HTTP_PROXY ?? `http://127.0.0.1:${mesh.ports.outbound}`,
    host: process.env.STANDIN_HOST ?? "127.0.0.1",
    port: self.appPort,
  });
  process.stdout.write(
    `${JSON.stringify({ event: "standin_listening", service: self.serviceName, address: `${address.address}:${address.port}` })}\n`,
  );
  const stop = () => process.exit(0);
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);
}

if (process.argv[1] && /standin\.(js|ts)$/.test(process.argv[1])) {
  main().catch((err: Error) => {
    process.stderr.write(`standin: ${err.message}\n`);
    process.exit(2);
  });
}
