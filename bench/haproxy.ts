// The second reference pair: two HAProxy instances (Debian's haproxy) doing what the two sidecars
// do, configured as an operator would for a production mTLS hop, like nginx.ts. Outbound: plain
// HTTP in, TLS 1.3 out with our client certificate, the server verified against the mesh CA (and
// its CRL) and the expected name, idle connections to the server reused. Inbound: TLS 1.3 with a
// required client certificate (CA + CRL), an allow-list on the client's subject,
// x-forwarded-client-cert set, keep-alive to the app. One thread each, as nginx has one worker.
// The protocol rows add, on the same two instances: h2c in with HTTP/2 between the pair, gRPC
// (HTTP/2 throughout), and a `mode tcp` hop with the same mTLS.
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Hop, PairPlan, TlsFiles } from "./pair.js";

export function findHaproxy(): string | null {
  return ["/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy"].find((p) => existsSync(p)) ?? null;
}

/** HAProxy reads a certificate and its key from one PEM file. */
function pem(dir: string, files: TlsFiles, name: string): string {
  const file = join(dir, `haproxy-${name}.pem`);
  writeFileSync(file, `${readFileSync(files.cert, "utf8").trimEnd()}\n${readFileSync(files.key, "utf8")}`, {
    mode: 0o600,
  });
  return file;
}

function global(dir: string, name: string): string {
  return `global
  nbthread 1
  maxconn 8192
  pidfile ${join(dir, `${name}.pid`)}
  ssl-server-verify required

defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  timeout http-request 10s
`;
}

/** The caller's side of TLS to the peer: our certificate, the peer verified by CA, CRL and name. */
function server(dir: string, p: PairPlan, hop: Hop, alpn: string | null, name: string): string {
  const alpnOption = alpn ? ` alpn ${alpn}` : "";
  return (
    `  server peer 127.0.0.1:${hop.inPort} ssl crt ${pem(dir, p.caller, name)} ca-file ${p.caller.ca} ` +
    `crl-file ${p.caller.crl} verify required verifyhost ${hop.peerName} sni str(${hop.peerName}) ` +
    `ssl-min-ver TLSv1.3${alpnOption}`
  );
}

/** The callee's side: a client certificate from the mesh CA required, TLS 1.3 only. */
function bind(dir: string, hop: Hop, alpn: string | null, name: string): string {
  const alpnOption = alpn ? ` alpn ${alpn}` : "";
  return (
    `  bind 127.0.0.1:${hop.inPort} ssl crt ${pem(dir, hop.callee, name)} ca-file ${hop.callee.ca} ` +
    `crl-file ${hop.callee.crl} verify required ssl-min-ver TLSv1.3${alpnOption}`
  );
}

/** HAProxy in front of the caller: http://127.0.0.1:outPort → https://peerName (at 127.0.0.1:inPort). */
export function outboundConfig(p: PairPlan): string {
  const dir = p.dir;
  // Host: the callee's name, as the other pairs send it.
  const http = (name: string, outBind: string, alpn: string, hop: Hop) => `
frontend ${name}_in
  bind 127.0.0.1:${outBind}
  default_backend ${name}_peer

backend ${name}_peer
  http-reuse always
  http-request set-header Host ${hop.peerName}
${server(dir, p, hop, alpn, "outbound")}
`;
  const parts = [global(dir, "haproxy-outbound"), http("http", String(p.http.outPort), "http/1.1", p.http)];
  if (p.h2) parts.push(http("h2", `${p.h2.outPort} proto h2`, "h2", p.http));
  if (p.grpc) parts.push(http("grpc", `${p.grpc.outPort} proto h2`, "h2", p.grpc));
  if (p.tcp) {
    parts.push(`
listen tcp
  mode tcp
  bind 127.0.0.1:${p.tcp.outPort}
${server(dir, p, p.tcp, null, "outbound")}
`);
  }
  return parts.join("");
}

/** HAProxy in front of the callee: mTLS on 127.0.0.1:inPort → http://127.0.0.1:targetPort. */
export function inboundConfig(p: PairPlan): string {
  const dir = p.dir;
  const allowed = `{ ssl_c_s_dn(CN) -m str ${p.allow} }`;
  const http = (name: string, hop: Hop, alpn: string, app: string) => `
frontend ${name}_in
${bind(dir, hop, alpn, `inbound-${name}`)}
  http-request deny deny_status 403 unless ${allowed}
  http-request set-header X-Forwarded-Client-Cert "Hash=%[ssl_c_der,sha2(256),hex];Subject=\\"%[ssl_c_s_dn]\\""
  default_backend ${name}_app

backend ${name}_app
  http-reuse always
  server app 127.0.0.1:${hop.targetPort}${app}
`;
  const parts = [global(dir, "haproxy-inbound"), http("http", p.http, "h2,http/1.1", "")];
  if (p.grpc) parts.push(http("grpc", p.grpc, "h2", " proto h2"));
  if (p.tcp) {
    parts.push(`
listen tcp
  mode tcp
${bind(dir, p.tcp, null, "inbound-tcp")}
  tcp-request content reject unless ${allowed}
  server target 127.0.0.1:${p.tcp.targetPort}
`);
  }
  return parts.join("");
}
