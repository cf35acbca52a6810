// Moving one exchange across the sidecar, shared by inbound and outbound and by HTTP/1.1 and
// HTTP/2: hop-by-hop headers (RFC 9110 §7.6.1) are dropped in one tested place, request heads
// that parsers could read differently are refused, bodies stream in both directions with
// backpressure, trailers pass (gRPC's status lives there), a cancelled call cancels upstream, and
// a failure becomes one answer from errors.ts (a gRPC status for a gRPC call).
import type { IncomingMessage, ServerResponse } from "node:http";
import { Http2ServerRequest, type Http2ServerResponse } from "node:http2";
import type { Config } from "../config/schema.js";
import { fromUpstreamError, GRPC_DEADLINE, ProxyError, sendError } from "./errors.js";
import type { Protocol } from "./metrics.js";
import type { Exchange, Transport, UpstreamHandler } from "./transport.js";
import { XFCC } from "./xfcc.js";

export type ServerRequest = IncomingMessage | Http2ServerRequest;
export type ServerReply = ServerResponse | Http2ServerResponse;

/** Never forwarded, whatever the Connection header says (plus any header it names). */
const HOP_BY_HOP = new Set([
  "connection",
  "keep-alive",
  "proxy-connection",
  "proxy-authenticate",
  "proxy-authorization",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
  "host", // sent again as Host or :authority, from the request's authority
  // Node's server already answered 100-continue; undici refuses to send Expect itself.
  "expect",
  // Only the sidecar sets it (invariant 4).
  XFCC,
]);

function connectionTokens(value: string | undefined): Set<string> | null {
  if (!value) return null;
  const tokens = value
    .toLowerCase()
    .split(",")
    .map((t) => t.trim())
    .filter((t) => t && t !== "close" && t !== "keep-alive");
  return tokens.length ? new Set(tokens) : null;
}

/**
 * The request headers to send on, as a flat [name, value, ...] list: hop-by-hop headers, Host,
 * HTTP/2 pseudo-headers and caller-supplied x-forwarded-client-cert removed, `set` pairs appended.
 * `te: trailers` stays (gRPC needs it on HTTP/2; the HTTP/1.1 transport leaves it out).
 */
export function forwardRequestHeaders(
  rawHeaders: readonly string[],
  connection: string | undefined,
  set: readonly string[] = [],
): string[] {
  const named = connectionTokens(connection);
  const out: string[] = [];
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i] as string;
    if (name.charCodeAt(0) === 58 /* : */) continue;
    const lower = name.toLowerCase();
    const value = rawHeaders[i + 1] as string;
    if (lower === "te" && value.trim().toLowerCase() === "trailers") {
      out.push("te", "trailers");
      continue;
    }
    if (HOP_BY_HOP.has(lower) || named?.has(lower)) continue;
    out.push(name, value);
  }
  for (const value of set) out.push(value);
  return out;
}

/** Response headers or trailers as received (flat list), hop-by-hop removed, for writeHead. */
export function forwardResponseHeaders(raw: readonly string[]): string[] {
  let named: Set<string> | null = null;
  for (let i = 0; i < raw.length; i += 2) {
    if ((raw[i] as string).toLowerCase() === "connection") named = connectionTokens(raw[i + 1]);
  }
  const out: string[] = [];
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i] as string;
    const lower = name.toLowerCase();
    if (HOP_BY_HOP.has(lower) || named?.has(lower)) continue;
    out.push(name, raw[i + 1] as string);
  }
  return out;
}

/** HTTP/1.1: the connection closes after this response (HTTP/2 streams need nothing). */
export function closeAfter(res: ServerReply): void {
  if (!("stream" in res)) res.shouldKeepAlive = false;
}

export function isH2(req: ServerRequest): req is Http2ServerRequest {
  return req instanceof Http2ServerRequest;
}

/** The authority a request names: Host (HTTP/1.1) or :authority (HTTP/2). */
export function authorityOf(req: ServerRequest): string {
  return req.headers.host ?? (isH2(req) ? req.authority : "") ?? "";
}

/**
 * What neither direction forwards, whatever the policy says: an HTTP/1 request line without an
 * HTTP/1.x version (Node takes `GET /a<CR><LF>X-Injected: 1 HTTP/1.1` as HTTP/0.9 followed by a
 * header), more header lines than limits.maxRequestHeaders (Node would silently drop those past
 * its own count, Content-Length among them), and more than one Host (RFC 9112 §3.2).
 */
export function refuseRequest(
  req: ServerRequest,
  limits: Pick<Config["limits"], "maxRequestHeaders">,
): ProxyError | null {
  if (req.httpVersionMajor !== (isH2(req) ? 2 : 1)) {
    return new ProxyError(
      "bad_request",
      "the request line has no HTTP/1.x version (a CR or LF inside the request target?)",
    );
  }
  const lines = req.rawHeaders.length / 2;
  if (lines > limits.maxRequestHeaders) {
    return new ProxyError(
      "headers_too_large",
      `the request has ${lines} header lines; limits.maxRequestHeaders is ${limits.maxRequestHeaders}`,
    );
  }
  let hosts = 0;
  for (let i = 0; i < req.rawHeaders.length; i += 2) {
    if ((req.rawHeaders[i] as string).length === 4 && (req.rawHeaders[i] as string).toLowerCase() === "host") hosts++;
  }
  if (hosts > 1) return new ProxyError("bad_request", "the request has more than one Host header");
  return null;
}

/** The `protocol` label of a request: HTTP/1.x, HTTP/2, or gRPC (HTTP/2 with a gRPC content type). */
export function protocolOf(req: Pick<IncomingMessage, "httpVersionMajor" | "headers">): Protocol {
  if (req.httpVersionMajor !== 2) return "http1";
  return isGrpc(req.headers["content-type"]) ? "grpc" : "h2";
}

/** application/grpc, application/grpc+proto, application/grpc-web… (gRPC's wire content types). */
export function isGrpc(contentType: string | undefined): boolean {
  return contentType?.startsWith("application/grpc") === true;
}

const GRPC_TIMEOUT_UNITS: Record<string, number> = { H: 3_600_000, M: 60_000, S: 1_000, m: 1, u: 0.001, n: 0.000001 };

/** A grpc-timeout header ("250m", "5S": at most 8 digits and a unit) in milliseconds, or null. */
export function grpcTimeoutMs(value: string | undefined): number | null {
  const match = value ? /^(\d{1,8})([HMSmun])$/.exec(value) : null;
  if (!match) return null;
  return Number(match[1]) * (GRPC_TIMEOUT_UNITS[match[2] as string] ?? 0);
}

function hasBody(req: ServerRequest): boolean {
  // HTTP/2 frames say it themselves: a request without a body ended with its headers.
  if (isH2(req)) return !req.stream.endAfterHeaders;
  const length = req.headers["content-length"];
  return req.headers["transfer-encoding"] !== undefined || (length !== undefined && length !== "0");
}

export interface ForwardOptions {
  transport: Transport;
  /** For messages: the app's URL or the peer's host:port. */
  target: string;
  side: "app" | "peer";
  path: string;
  /** What Host / :authority says upstream. */
  authority: string;
  headers: string[];
  timeoutMs: number;
  /** Called once, when the exchange is over: the status sent and the error, if any. */
  done: (status: number, error: ProxyError | null) => void;
}

/** Streams the upstream's answer into `res`, pausing the upstream while `res` is full. */
class ResponseRelay implements UpstreamHandler {
  exchange: Exchange | null = null;
  private status = 0;
  private finished = false;
  /** The answer went out as gRPC Trailers-Only: nothing more is written. */
  private trailersOnly = false;
  private readonly grpc: boolean;
  private deadline: NodeJS.Timeout | null = null;

  constructor(
    req: ServerRequest,
    private readonly res: ServerReply,
    private readonly options: ForwardOptions,
  ) {
    this.grpc = isGrpc(req.headers["content-type"]);
    res.once("close", () => {
      // The caller went away (or cancelled its call) before the answer was complete: stop the
      // upstream exchange too.
      if (!this.finished) {
        this.finished = true;
        this.clear();
        this.exchange?.abort(new Error("the client closed the connection"));
        this.options.done(499, null);
      }
    });
    // gRPC's deadline (grpc-timeout) is absolute: past it the call is over, answered or not.
    const deadline = this.grpc ? grpcTimeoutMs(req.headers["grpc-timeout"] as string | undefined) : null;
    if (deadline !== null && deadline < options.timeoutMs) {
      this.deadline = setTimeout(() => {
        const err = Object.assign(new Error(`the call's grpc-timeout (${req.headers["grpc-timeout"]}) passed`), {
          code: GRPC_DEADLINE,
        });
        this.exchange?.abort(err);
        this.onError(err);
      }, deadline);
    }
  }

  private clear(): void {
    if (this.deadline) clearTimeout(this.deadline);
  }

  onResponse(status: number, headers: string[]): void {
    if (this.finished) return;
    this.status = status;
    const kept = forwardResponseHeaders(headers);
    if (this.grpc && "stream" in this.res && kept.some((h, i) => i % 2 === 0 && h.toLowerCase() === "grpc-status")) {
      // Trailers-Only (a gRPC status with no message): it must reach the caller the same way, as
      // one HEADERS frame that ends the stream, or gRPC clients see a stream without a status.
      this.trailersOnly = true;
      const frame: Record<string, string | string[]> = { ":status": String(status) };
      for (let i = 0; i < kept.length; i += 2) frame[(kept[i] as string).toLowerCase()] = kept[i + 1] as string;
      this.res.stream.respond(frame, { endStream: true });
      return;
    }
    // Both writeHeads take a flat [name, value, ...] list; their overloads just do not unify.
    (this.res as ServerResponse).writeHead(status, kept);
  }

  onData(chunk: Buffer): boolean {
    if (this.finished) return true;
    if ((this.res as ServerResponse).write(chunk)) return true;
    this.res.once("drain", () => this.exchange?.resume());
    return false;
  }

  onEnd(trailers: string[]): void {
    if (this.status === 0) {
      this.onError(Object.assign(new Error("the exchange ended without an answer"), { code: "UND_ERR_SOCKET" }));
      return;
    }
    if (this.finished) return;
    this.finished = true;
    this.clear();
    if (this.trailersOnly) {
      this.options.done(this.status, null);
      return;
    }
    const kept = forwardResponseHeaders(trailers);
    if (kept.length > 0) {
      const object: Record<string, string> = {};
      for (let i = 0; i < kept.length; i += 2) object[(kept[i] as string).toLowerCase()] = kept[i + 1] as string;
      this.res.addTrailers(object);
    }
    this.res.end();
    this.options.done(this.status, null);
  }

  onError(err: unknown): void {
    if (this.finished) return;
    this.finished = true;
    this.clear();
    const error = fromUpstreamError(err, this.options.side, this.options.target);
    const status = this.res.headersSent ? this.status : error.status;
    sendError(this.res, error, this.grpc);
    this.options.done(this.grpc ? 200 : status, error);
  }
}

export function forward(req: ServerRequest, res: ServerReply, options: ForwardOptions): void {
  const relay = new ResponseRelay(req, res, options);
  relay.exchange = options.transport.request(
    {
      method: req.method ?? "GET",
      path: options.path,
      authority: options.authority,
      headers: options.headers,
      body: hasBody(req) ? req : null,
      http2: req.httpVersionMajor === 2,
      timeoutMs: options.timeoutMs,
    },
    relay,
  );
}
