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
  /** The sidecar's registry, or (workers) one that aggregates every process's. */
  registry: Pick<Registry, "metrics" | "contentType">;
  ready(): { ready: true } | { ready: false; reason: string };
  /** The primary of workers asks them first, hence the promises. */
  status(): unknown | Promise<unknown>;
  edges(): unknown | Promise<unknown>;
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

/** The answer to one path: status, body (text, or a value sent as JSON) and content type. */
async function answer(sources: AdminSources, path: string | undefined): Promise<[number, unknown, string?]> {
  switch (path) {
    case "/metrics":
      return [200, await sources.registry.metrics(), sources.registry.contentType];
    case "/healthz":
      return [200, { status: "ok" }];
    case "/readyz": {
      const r = sources.ready();
      return r.ready ? [200, { status: "ready" }] : [503, { status: "not_ready", reason: r.reason }];
    }
    case "/status":
      return [200, await sources.status()];
    case "/edges":
      return [200, await sources.edges()];
    default:
      return [404, { error: "not_found", paths: ["/metrics", "/healthz", "/readyz", "/status", "/edges"] }];
  }
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
      answer(sources, path).then(
        ([status, body, type]) => {
          if (typeof body === "string") {
            res.writeHead(status, { "content-type": type ?? "text/plain" });
            res.end(body);
          } else json(res, status, body);
        },
        (err: Error) => json(res, 500, { error: "admin_failed", path, message: err.message }),
      );
    },
  );
}
