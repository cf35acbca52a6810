// The one place that maps a failure to what the caller gets: status, a stable code, a JSON body
// that names it, and the `x-ashmesh-error` header. Code elsewhere creates ProxyErrors (or passes
// raw errors to fromUpstreamError) and hands them to sendError, or, on a socket no HTTP response
// object exists for (parse errors, CONNECT, upgrades), to writeSocketError.
import { type ServerResponse, STATUS_CODES } from "node:http";
import { type Http2ServerResponse, constants as h2 } from "node:http2";
import type { Duplex } from "node:stream";
import { failureReason, PeerRefusedError } from "./tls.js";

export type ProxyErrorCode =
  | "bad_request"
  | "non_canonical_path"
  | "forbidden"
  | "destination_not_allowed"
  | "not_implemented"
  | "headers_too_large"
  | "request_timeout"
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
  not_implemented: 501,
  headers_too_large: 431,
  request_timeout: 408,
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

  /** The JSON body every answer of the sidecar's own carries. */
  body(): string {
    return JSON.stringify({ error: this.code, message: this.message, ...this.extra });
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
    if (err instanceof PeerRefusedError) {
      const { reason } = err.refusal;
      if (reason === "bad_san" || reason === "bad_pin")
        return new ProxyError("peer_identity_mismatch", e.message, extra);
      if (reason === "revoked") {
        return new ProxyError("peer_revoked", `the certificate of ${target} is revoked by our CRL`, extra);
      }
      return new ProxyError("peer_tls_failed", `TLS with ${target} failed: ${e.message}`, extra);
    }
    const reason = failureReason(code);
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

/** gRPC status codes (grpc/doc/statuscodes.md) for each failure, for callers that speak gRPC. */
const GRPC_STATUS: Record<ProxyErrorCode, number> = {
  bad_request: 3, // INVALID_ARGUMENT
  non_canonical_path: 3,
  forbidden: 7, // PERMISSION_DENIED
  destination_not_allowed: 7,
  not_implemented: 12, // UNIMPLEMENTED
  headers_too_large: 8, // RESOURCE_EXHAUSTED
  request_timeout: 4, // DEADLINE_EXCEEDED
  app_unavailable: 14, // UNAVAILABLE
  peer_unavailable: 14,
  peer_identity_mismatch: 14,
  peer_tls_failed: 14,
  peer_revoked: 14,
  app_timeout: 4,
  peer_timeout: 4,
};

/** grpc-message is percent-encoded: printable ASCII but "%" as is, every other byte as %XX. */
function grpcMessage(text: string): string {
  let out = "";
  for (const byte of Buffer.from(text, "utf8")) {
    out +=
      byte >= 0x20 && byte <= 0x7e && byte !== 0x25
        ? String.fromCharCode(byte)
        : `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

type Reply = ServerResponse | Http2ServerResponse;

/**
 * Writes the answer to a failed request: JSON with `x-ashmesh-error`, or for a gRPC call the
 * gRPC status (HTTP 200, `grpc-status` and `grpc-message`, the code also in `x-ashmesh-error`),
 * as trailers after a response already under way. Any other response under way is cut.
 */
export function sendError(res: Reply, error: ProxyError, grpc = false): void {
  if (grpc) {
    sendGrpcError(res, error);
    return;
  }
  if (res.headersSent) {
    if ("stream" in res) res.stream.close(h2.NGHTTP2_INTERNAL_ERROR);
    else res.destroy(error);
    return;
  }
  const body = error.body();
  // Both kinds of response take these arguments; their overloads just do not unify.
  (res as ServerResponse).writeHead(error.status, {
    "content-type": "application/json",
    "content-length": Buffer.byteLength(body),
    "x-ashmesh-error": error.code,
  });
  res.end(body);
}

function sendGrpcError(res: Reply, error: ProxyError): void {
  const status = {
    "grpc-status": String(GRPC_STATUS[error.code]),
    "grpc-message": grpcMessage(error.message),
    "x-ashmesh-error": error.code,
  };
  if (res.headersSent) {
    res.addTrailers(status);
    res.end();
    return;
  }
  if ("stream" in res && !res.stream.destroyed) {
    // Trailers-Only: one HEADERS frame that ends the stream, as gRPC servers answer a refusal.
    res.stream.respond({ ":status": 200, "content-type": "application/grpc", ...status }, { endStream: true });
    return;
  }
  (res as ServerResponse).writeHead(200, { "content-type": "application/grpc", ...status });
  res.end();
}

/**
 * The same answer written on a bare socket, which is then closed: for requests Node's HTTP server
 * hands over without a response object (a parse error, CONNECT, an upgrade).
 */
export function writeSocketError(socket: Duplex, error: ProxyError): void {
  // Node's parser reports the rest of a broken head again: the answer went out with the first.
  if (answered.has(socket)) return;
  if (!socket.writable) {
    socket.destroy();
    return;
  }
  answered.add(socket);
  const body = error.body();
  socket.end(
    `HTTP/1.1 ${error.status} ${STATUS_CODES[error.status] ?? ""}\r\n` +
      "content-type: application/json\r\n" +
      `content-length: ${Buffer.byteLength(body)}\r\n` +
      `x-ashmesh-error: ${error.code}\r\n` +
      "connection: close\r\n\r\n" +
      body,
  );
  lingerThenClose(socket);
}

const answered = new WeakSet<Duplex>();

/** How long, and how many bytes, a refused client may go on sending before its connection is reset. */
const LINGER_MS = 2_000;
const LINGER_BYTES = 1 << 20;

/**
 * A client still sending (a large head or body) when the answer goes out would get a TCP reset
 * on close, and a reset can destroy the answer before the client reads it. So the rest is read
 * and dropped for a moment first, as nginx's lingering close does; never more than LINGER_BYTES.
 */
function lingerThenClose(socket: Duplex): void {
  let bytes = 0;
  const timer = setTimeout(() => socket.destroy(), LINGER_MS);
  timer.unref();
  socket.on("data", (chunk: Buffer) => {
    bytes += chunk.length;
    if (bytes > LINGER_BYTES) socket.destroy();
  });
  socket.once("close", () => clearTimeout(timer));
  socket.resume();
}

/**
 * Node's HTTP server could not parse a request (its `clientError` event): 431 when the head was
 * larger than limits.maxHeaderBytes, 408 when it took longer than limits.requestTimeoutMs (or
 * headersTimeoutMs), 400 for anything else, and the connection closes (nothing
 * after a request that did not parse can be trusted to start a request). Returns the status sent.
 */
export function answerClientError(err: NodeJS.ErrnoException, socket: Duplex): number | null {
  if (err.code === "ECONNRESET") {
    socket.destroy();
    return null;
  }
  const error =
    err.code === "HPE_HEADER_OVERFLOW"
      ? new ProxyError("headers_too_large", "the request head is larger than limits.maxHeaderBytes")
      : err.code === "ERR_HTTP_REQUEST_TIMEOUT"
        ? new ProxyError("request_timeout", "the request did not arrive within limits.requestTimeoutMs")
        : new ProxyError("bad_request", `the request could not be parsed (${err.code ?? err.message})`);
  writeSocketError(socket, error);
  return error.status;
}
