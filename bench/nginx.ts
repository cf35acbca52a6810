// The reference pair: two nginx instances doing what the two sidecars do, configured as an
// operator would for a production mTLS hop. Outbound: plain HTTP in, TLS 1.3 out with our client
// certificate, the server verified against the mesh CA and the expected name, a keep-alive pool
// with session reuse. Inbound: TLS 1.3 with a required client certificate (CA + CRL), an
// allow-list on the client's subject, x-forwarded-client-cert set, keep-alive to the app.
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";

export const NGINX_CANDIDATES = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"];

export function findNginx(): string | null {
  return NGINX_CANDIDATES.find((p) => existsSync(p)) ?? null;
}

export interface NginxFiles {
  cert: string;
  key: string;
  ca: string;
  crl: string;
}

function common(dir: string, name: string): string {
  const temp = join(dir, `${name}-temp`);
  mkdirSync(temp, { recursive: true });
  return `worker_processes 1;
pid ${join(dir, `${name}.pid`)};
error_log ${join(dir, `${name}.error.log`)} warn;
events { worker_connections 4096; }
`;
}

function temps(dir: string, name: string): string {
  const temp = join(dir, `${name}-temp`);
  return ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
    .map((t) => `  ${t}_temp_path ${join(temp, t)};`)
    .join("\n");
}

/** nginx in front of the caller: http://127.0.0.1:listen → https://auth.ashchan.local (at 127.0.0.1:peerPort). */
export function outboundConfig(
  dir: string,
  o: { listen: number; peerPort: number; peerName: string; files: NginxFiles; connections: number },
): string {
  return `${common(dir, "nginx-outbound")}
http {
  access_log off;
${temps(dir, "nginx-outbound")}
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  upstream peer {
    server 127.0.0.1:${o.peerPort};
    keepalive ${o.connections};
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:${o.listen};
    location / {
      proxy_pass https://peer;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host ${o.peerName};
      proxy_ssl_certificate ${o.files.cert};
      proxy_ssl_certificate_key ${o.files.key};
      proxy_ssl_trusted_certificate ${o.files.ca};
      proxy_ssl_crl ${o.files.crl};
      proxy_ssl_verify on;
      proxy_ssl_verify_depth 3;
      proxy_ssl_name ${o.peerName};
      proxy_ssl_server_name on;
      proxy_ssl_protocols TLSv1.3;
      proxy_ssl_session_reuse on;
    }
  }
}
`;
}

/** nginx in front of the callee: mTLS on 127.0.0.1:listen → http://127.0.0.1:appPort. */
export function inboundConfig(
  dir: string,
  o: { listen: number; appPort: number; allow: string; files: NginxFiles; connections: number },
): string {
  const allow = o.allow.replaceAll(".", "\\.");
  return `${common(dir, "nginx-inbound")}
http {
  access_log off;
${temps(dir, "nginx-inbound")}
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  map $ssl_client_s_dn $peer_allowed {
    default 0;
    "~(^|,)CN=${allow}(,|$)" 1;
  }
  upstream app {
    server 127.0.0.1:${o.appPort};
    keepalive ${o.connections};
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:${o.listen} ssl;
    ssl_certificate ${o.files.cert};
    ssl_certificate_key ${o.files.key};
    ssl_client_certificate ${o.files.ca};
    ssl_crl ${o.files.crl};
    ssl_verify_client on;
    ssl_verify_depth 3;
    ssl_protocols TLSv1.3;
    location / {
      if ($peer_allowed = 0) { return 403; }
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-Client-Cert "Hash=$ssl_client_fingerprint;Subject=\\"$ssl_client_s_dn\\"";
    }
  }
}
`;
}
