// The one place that maps a failure to what the caller gets: status, a stable code, a JSON body
// that names it. Code elsewhere creates ProxyErrors or passes raw errors to fromUpstreamError.
import type { ServerResponse } from "node:http";
import { failureReason } from "./tls.js";

export type ProxyErrorCode =
  | "bad_request"
  | "non_canonical_path"
  | "method_not_allowed"
  | "forbidden"
  | "destination_not_allowed"
  | "app_unavailable"
  | "app_timeout"
  | "peer_unavailable"
  | "peer_timeout"
  | "peer_identity_mismatch"
  | "peer_tls_failed"
  | "peer_revoked";

const STATUS: Record<ProxyErrorCode, number> = {
  bad_request: 400,
  non_canonical_path: 400,
  forbidden: 403,
  destination_not_allowed: 403,
  method_not_allowed: 405,
  app_unavailable: 502,
  peer_unavailable: 502,
  peer_identity_mismatch: 502,
  peer_tls_failed: 502,
  peer_revoked: 502,
  app_timeout: 504,
  peer_timeout: 504,
};

export class ProxyError extends Error {
  readonly status: number;
  constructor(
    readonly code: ProxyErrorCode,
    message: string,
    readonly extra: Record<string, string> = {},
  ) {
    super(message);
    this.name = "ProxyError";
    this.status = STATUS[code];
  }
}

const TIMEOUTS = new Set(["UND_ERR_HEADERS_TIMEOUT", "UND_ERR_BODY_TIMEOUT", "UND_ERR_CONNECT_TIMEOUT", "ETIMEDOUT"]);

/**
 * An error from undici while talking to `target`: the local app (inbound) or a peer's inbound
 * (outbound). The message says what happened and, where it helps, what to check.
 */
export function fromUpstreamError(err: unknown, side: "app" | "peer", target: string): ProxyError {
  const e = err as NodeJS.ErrnoException & { code?: string };
  const code = e?.code ?? "";
  const extra = { target };
  if (TIMEOUTS.has(code)) {
    return new ProxyError(
      side === "app" ? "app_timeout" : "peer_timeout",
      `${target} did not answer in time (${code})`,
      extra,
    );
  }
  if (side === "peer") {
    const reason = failureReason(code);
    if (reason === "bad_san" || reason === "bad_pin") return new ProxyError("peer_identity_mismatch", e.message, extra);
    if (reason === "revoked") {
      return new ProxyError("peer_revoked", `the certificate of ${target} is revoked by our CRL`, extra);
    }
    if (reason !== "other") {
      return new ProxyError("peer_tls_failed", `TLS with ${target} failed: ${reason} (${code}): ${e.message}`, extra);
    }
  }
  const what =
    code === "ECONNREFUSED"
      ? "refused the connection"
      : code === "ENOTFOUND" || code === "EAI_AGAIN"
        ? "does not resolve (check DNS or outbound.resolve)"
        : code === "UND_ERR_SOCKET" || code === "ECONNRESET"
          ? side === "peer"
            ? "closed the connection (its sidecar may refuse our certificate: see its mtls_handshake_failed log)"
            : "closed the connection"
          : `failed: ${e?.message ?? String(err)}`;
  return new ProxyError(side === "app" ? "app_unavailable" : "peer_unavailable", `${target} ${what}`, extra);
}

/** Writes the JSON error answer; a response already under way is cut instead. */
export function sendError(res: ServerResponse, error: ProxyError): void {
  if (res.headersSent) {
    res.destroy(error);
    return;
  }
  const body = JSON.stringify({ error: error.code, message: error.message, ...error.extra });
  res.writeHead(error.status, {
    "content-type": "application/json",
    "content-length": Buffer.byteLength(body),
    "x-ashmesh-error": error.code,
    ...(error.status === 503 ? { connection: "close" } : {}),
  });
  res.end(body);
}
