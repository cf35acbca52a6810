// The admin listener: metrics for Prometheus, liveness and readiness for Podman/systemd
// health checks, and what the sidecar knows (/status, /edges) as JSON for `ashmesh check`
// and `ashmesh edges`.
import http from "node:http";
import type { Registry } from "prom-client";

export interface AdminSources {
  /** Timeouts for scrapers and probes, from limits.headersTimeoutMs. */
  timeoutMs: number;
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

export function createAdminServer(sources: AdminSources): http.Server {
  const timeout = sources.timeoutMs;
  return http.createServer(
    { keepAliveTimeout: timeout, headersTimeout: timeout, requestTimeout: timeout },
    (req, res) => {
      if (req.method !== "GET" && req.method !== "HEAD") return json(res, 405, { error: "method_not_allowed" });
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
