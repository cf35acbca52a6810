// The reference pair: two nginx instances doing what the two sidecars do, configured as an
// operator would for a production mTLS hop. Outbound: plain HTTP in, TLS 1.3 out with our client
// certificate, the server verified against the mesh CA and the expected name, a keep-alive pool
// with session reuse. Inbound: TLS 1.3 with a required client certificate (CA + CRL), an
// allow-list on the client's subject, x-forwarded-client-cert set, keep-alive to the app.
// The protocol rows add, on the same two instances: h2c in (nginx's proxy_pass speaks HTTP/1.1 to
// its upstream, so HTTP/1.1 between the pair), gRPC (grpc_pass: HTTP/2 between the pair), and a
// TCP hop in the stream module, when its dynamic module is installed.
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { type Hop, type PairPlan, quotedName, type TlsFiles } from "./pair.js";

export const NGINX_CANDIDATES = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"];

export function findNginx(): string | null {
  return NGINX_CANDIDATES.find((p) => existsSync(p)) ?? null;
}

/** Debian builds the stream module as a dynamic module, in its own package (libnginx-mod-stream). */
export function nginxStreamModule(): string | null {
  return (
    ["/usr/lib/nginx/modules/ngx_stream_module.so", "/usr/share/nginx/modules/ngx_stream_module.so"].find((p) =>
      existsSync(p),
    ) ?? null
  );
}

/** What nginx says about a hop of the protocol rows it does not make as the sidecars do. */
export const NGINX_H2_BETWEEN = "HTTP/1.1 over mTLS (proxy_pass speaks no HTTP/2 to an upstream)";
/**
 * grpc_pass keeps its upstream connections in the keepalive pool, but nginx (1.22 here) closes a
 * pooled connection as soon as its peer sends anything while it idles, and HTTP/2 peers send
 * WINDOW_UPDATE and PING frames: seen here as one TIME-WAIT connection per call at both hops.
 */
export const NGINX_GRPC_BETWEEN =
  "HTTP/2 over mTLS (grpc_pass); its pooled upstream connections are dropped on the peer's idle frames " +
  "(nginx/nginx#929), so calls open new connections";

function common(dir: string, name: string, withStream: boolean): string {
  const temp = join(dir, `${name}-temp`);
  mkdirSync(temp, { recursive: true });
  const stream = withStream ? `load_module ${nginxStreamModule()};\n` : "";
  return `${stream}worker_processes 1;
pid ${join(dir, `${name}.pid`)};
error_log ${join(dir, `${name}.error.log`)} warn;
events { worker_connections 4096; }
`;
}

function httpHead(dir: string, name: string): string {
  const temp = join(dir, `${name}-temp`);
  const temps = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
    .map((t) => `  ${t}_temp_path ${join(temp, t)};`)
    .join("\n");
  return `  access_log off;
${temps}
  keepalive_requests 1000000;
  keepalive_timeout 60s;`;
}

function upstream(name: string, port: number, connections: number): string {
  return `  upstream ${name} {
    server 127.0.0.1:${port};
    keepalive ${connections};
    keepalive_requests 1000000;
  }`;
}

/** The caller's side of TLS to the peer: `prefix` is proxy_ssl (http, stream) or grpc_ssl. */
function clientTls(prefix: string, files: TlsFiles, peerName: string, indent: string): string {
  return [
    `${prefix}_certificate ${files.cert};`,
    `${prefix}_certificate_key ${files.key};`,
    `${prefix}_trusted_certificate ${files.ca};`,
    `${prefix}_crl ${files.crl};`,
    `${prefix}_verify on;`,
    `${prefix}_verify_depth 3;`,
    `${prefix}_name ${peerName};`,
    `${prefix}_server_name on;`,
    `${prefix}_protocols TLSv1.3;`,
    `${prefix}_session_reuse on;`,
  ]
    .map((l) => indent + l)
    .join("\n");
}

/** The callee's side: its certificate, and a client certificate from the mesh CA required. */
function serverTls(files: TlsFiles, indent: string): string {
  return [
    `ssl_certificate ${files.cert};`,
    `ssl_certificate_key ${files.key};`,
    `ssl_client_certificate ${files.ca};`,
    `ssl_crl ${files.crl};`,
    "ssl_verify_client on;",
    "ssl_verify_depth 3;",
    "ssl_protocols TLSv1.3;",
  ]
    .map((l) => indent + l)
    .join("\n");
}

function allowMap(allow: string, variable: string, allowed: string, refused: string): string {
  return `  map $ssl_client_s_dn ${variable} {
    default ${refused};
    "~(^|,)CN=${quotedName(allow)}(,|$)" ${allowed};
  }`;
}

const XFCC = '"Hash=$ssl_client_fingerprint;Subject=\\"$ssl_client_s_dn\\""';

/** nginx in front of the caller: http://127.0.0.1:outPort → https://peerName (at 127.0.0.1:inPort). */
export function outboundConfig(p: PairPlan): string {
  const name = "nginx-outbound";
  const proxy = (listen: string) => `  server {
    listen ${listen};
    location / {
      proxy_pass https://peer;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host ${p.http.peerName};
${clientTls("proxy_ssl", p.caller, p.http.peerName, "      ")}
    }
  }`;
  const http = [
    httpHead(p.dir, name),
    upstream("peer", p.http.inPort, p.connections),
    proxy(`127.0.0.1:${p.http.outPort}`),
  ];
  if (p.h2) http.push(proxy(`127.0.0.1:${p.h2.outPort} http2`));
  if (p.grpc) {
    http.push(
      upstream("grpcpeer", p.grpc.inPort, p.connections),
      `  server {
    listen 127.0.0.1:${p.grpc.outPort} http2;
    location / {
      grpc_pass grpcs://grpcpeer;
${clientTls("grpc_ssl", p.caller, p.grpc.peerName, "      ")}
    }
  }`,
    );
  }
  const stream = p.tcp
    ? `
stream {
  server {
    listen 127.0.0.1:${p.tcp.outPort};
    proxy_pass 127.0.0.1:${p.tcp.inPort};
    proxy_ssl on;
${clientTls("proxy_ssl", p.caller, p.tcp.peerName, "    ")}
  }
}
`
    : "";
  return `${common(p.dir, name, p.tcp !== undefined)}
http {
${http.join("\n")}
}
${stream}`;
}

/** nginx in front of the callee: mTLS on 127.0.0.1:inPort → http://127.0.0.1:targetPort. */
export function inboundConfig(p: PairPlan): string {
  const name = "nginx-inbound";
  const server = (hop: Hop, listen: string, pass: string, header: string) => `  server {
    listen 127.0.0.1:${hop.inPort} ${listen};
${serverTls(hop.callee, "    ")}
    location / {
      if ($peer_allowed = 0) { return 403; }
      ${pass};
      ${header} X-Forwarded-Client-Cert ${XFCC};
    }
  }`;
  const http = [
    httpHead(p.dir, name),
    allowMap(p.allow, "$peer_allowed", "1", "0"),
    upstream("app", p.http.targetPort, p.connections),
    server(
      p.http,
      "ssl",
      'proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection ""',
      "proxy_set_header",
    ),
  ];
  if (p.grpc) {
    http.push(
      upstream("grpcapp", p.grpc.targetPort, p.connections),
      server(p.grpc, "ssl http2", "grpc_pass grpc://grpcapp", "grpc_set_header"),
    );
  }
  // The stream module has no `if`: a caller that is not allowed is sent where nothing listens.
  const stream = p.tcp
    ? `
stream {
${allowMap(p.allow, "$tcp_target", `127.0.0.1:${p.tcp.targetPort}`, "127.0.0.1:1")}
  server {
    listen 127.0.0.1:${p.tcp.inPort} ssl;
${serverTls(p.tcp.callee, "    ")}
    proxy_pass $tcp_target;
  }
}
`
    : "";
  return `${common(p.dir, name, p.tcp !== undefined)}
http {
${http.join("\n")}
}
${stream}`;
}
