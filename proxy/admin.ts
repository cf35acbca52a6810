// The admin listener: metrics for Prometheus, liveness and readiness for Podman/systemd
// health checks, and what the sidecar knows (/status, /edges) as JSON for `ashmesh check`
// and `ashmesh edges`. Read-only: GET and HEAD, nothing here changes state. It binds to loopback
// by default, and answers only requests whose Host is an address or a name of this sidecar, so
// that a web page in a browser on the host cannot read it through DNS rebinding.

import http from "node:http";
import { isIP } from "node:net";
import type { Registry } from "prom-client";

export interface AdminSources {
  /** Timeouts for scrapers and probes, from limits.headersTimeoutMs. */
  timeoutMs: number;
  /** Host names (lower case) besides IP literals that requests may name. */
  hosts: ReadonlySet<string>;
  registry: Registry;
  ready(): { ready: true } | { ready: false; reason: string };
  status(): unknown;
  edges(): unknown;
}

function json(res: http.ServerResponse, status: number, value: unknown): void {
  const body = `${JSON.stringify(value, null, 2)}\n`;
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
}

/** A Host header naming an IP literal or one of `hosts` (the port aside); a request without Host is HTTP/1.0 from a tool. */
export function hostAllowed(host: string | undefined, hosts: ReadonlySet<string>): boolean {
  if (host === undefined) return true;
  const name = host.startsWith("[") ? host.slice(1, host.indexOf("]")) : host.replace(/:\d*$/, "");
  return isIP(name) !== 0 || hosts.has(name.toLowerCase().replace(/\.$/, ""));
}

export function createAdminServer(sources: AdminSources): http.Server {
  const timeout = sources.timeoutMs;
  return http.createServer(
    { keepAliveTimeout: timeout, headersTimeout: timeout, requestTimeout: timeout },
    (req, res) => {
      if (req.method !== "GET" && req.method !== "HEAD") return json(res, 405, { error: "method_not_allowed" });
      if (!hostAllowed(req.headers.host, sources.hosts)) {
        return json(res, 421, {
          error: "host_not_allowed",
          message: "the admin listener answers its own names and IP addresses only; add the name to admin.hosts",
        });
      }
      const path = (req.url ?? "/").split("?")[0];
      switch (path) {
        case "/metrics":
          sources.registry.metrics().then(
            (text) => {
              res.writeHead(200, { "content-type": sources.registry.contentType });
              res.end(text);
            },
            (err: Error) => json(res, 500, { error: "metrics_failed", message: err.message }),
          );
          return;
        case "/healthz":
          return json(res, 200, { status: "ok" });
        case "/readyz": {
          const r = sources.ready();
          return json(
            res,
            r.ready ? 200 : 503,
            r.ready ? { status: "ready" } : { status: "not_ready", reason: r.reason },
          );
        }
        case "/status":
          return json(res, 200, sources.status());
        case "/edges":
          return json(res, 200, sources.edges());
        default:
          return json(res, 404, {
            error: "not_found",
            paths: ["/metrics", "/healthz", "/readyz", "/status", "/edges"],
          });
      }
    },
  );
}
