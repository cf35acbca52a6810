// Moving one HTTP exchange across the sidecar, shared by inbound and outbound: hop-by-hop
// headers (RFC 9110 §7.6.1) are dropped in one tested place, bodies stream in both directions
// with backpressure, and a failure becomes one JSON answer from errors.ts.
import type { IncomingMessage, ServerResponse } from "node:http";
import type { Dispatcher } from "undici";
import type { Config } from "../config/schema.js";
import { fromUpstreamError, ProxyError, sendError } from "./errors.js";
import type { Protocol } from "./metrics.js";
import { XFCC } from "./xfcc.js";

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
 * The request headers to send on, as undici's flat [name, value, ...] list: hop-by-hop and
 * caller-supplied x-forwarded-client-cert removed, `set` pairs appended, `host` replaced when given.
 */
export function forwardRequestHeaders(
  rawHeaders: readonly string[],
  connection: string | undefined,
  set: readonly string[] = [],
  host?: string,
): string[] {
  const named = connectionTokens(connection);
  const out: string[] = [];
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i] as string;
    const lower = name.toLowerCase();
    if (HOP_BY_HOP.has(lower) || named?.has(lower)) continue;
    if (host !== undefined && lower === "host") continue;
    out.push(name, rawHeaders[i + 1] as string);
  }
  if (host !== undefined) out.push("host", host);
  for (const value of set) out.push(value);
  return out;
}

/** Response headers from undici's raw Buffer list, hop-by-hop removed, for res.writeHead. */
export function forwardResponseHeaders(raw: readonly Buffer[]): string[] {
  let named: Set<string> | null = null;
  for (let i = 0; i < raw.length; i += 2) {
    if ((raw[i] as Buffer).length === 10 && (raw[i] as Buffer).toString("latin1").toLowerCase() === "connection") {
      named = connectionTokens((raw[i + 1] as Buffer).toString("latin1"));
    }
  }
  const out: string[] = [];
  for (let i = 0; i < raw.length; i += 2) {
    const name = (raw[i] as Buffer).toString("latin1");
    const lower = name.toLowerCase();
    if (HOP_BY_HOP.has(lower) || named?.has(lower)) continue;
    out.push(name, (raw[i + 1] as Buffer).toString("latin1"));
  }
  return out;
}

/**
 * What neither direction forwards, whatever the policy says: a request line without an HTTP/1.x
 * version (Node takes `GET /a<CR><LF>X-Injected: 1 HTTP/1.1` as HTTP/0.9 followed by a header),
 * more header lines than limits.maxRequestHeaders (Node would silently drop those past its own
 * count, Content-Length among them), and more than one Host (RFC 9112 §3.2).
 */
export function refuseRequest(
  req: IncomingMessage,
  limits: Pick<Config["limits"], "maxRequestHeaders">,
): ProxyError | null {
  if (req.httpVersionMajor !== 1) {
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

function hasBody(req: IncomingMessage): boolean {
  const length = req.headers["content-length"];
  return req.headers["transfer-encoding"] !== undefined || (length !== undefined && length !== "0");
}

export interface ForwardOptions {
  dispatcher: Dispatcher;
  /** For messages: the app's URL or the peer's host:port. */
  target: string;
  side: "app" | "peer";
  path: string;
  headers: string[];
  timeoutMs: number;
  /** Called once, when the exchange is over: the status sent and the error, if any. */
  done: (status: number, error: ProxyError | null) => void;
}

/**
 * An undici dispatch handler that streams the answer into `res`. It uses undici's raw
 * handler interface, the one its HTTP/1.1 client calls directly (no header re-parsing).
 */
class ResponseRelay implements Dispatcher.DispatchHandler {
  private abort: ((err?: Error) => void) | null = null;
  private resume: (() => void) | null = null;
  private status = 0;
  private finished = false;

  constructor(
    private readonly res: ServerResponse,
    private readonly options: ForwardOptions,
  ) {
    res.once("close", () => {
      // The caller went away before the answer was complete: stop the upstream exchange too.
      if (!this.finished) this.abort?.(new Error("client closed the connection"));
    });
  }

  onConnect(abort: (err?: Error) => void): void {
    this.abort = abort;
  }

  onHeaders(statusCode: number, rawHeaders: Buffer[], resume: () => void, statusText?: string): boolean {
    if (statusCode < 200) return true; // 1xx informational: not relayed
    this.status = statusCode;
    this.resume = resume;
    const headers = forwardResponseHeaders(rawHeaders);
    if (statusText) this.res.writeHead(statusCode, statusText, headers);
    else this.res.writeHead(statusCode, headers);
    return true;
  }

  onData(chunk: Buffer): boolean {
    if (this.res.write(chunk)) return true;
    this.res.once("drain", () => this.resume?.());
    return false;
  }

  onComplete(): void {
    this.finished = true;
    this.res.end();
    this.options.done(this.status, null);
  }

  onError(err: Error): void {
    this.finished = true;
    const error = fromUpstreamError(err, this.options.side, this.options.target);
    const status = this.res.headersSent ? this.status : error.status;
    sendError(this.res, error);
    this.options.done(status, error);
  }
}

export function forward(req: IncomingMessage, res: ServerResponse, options: ForwardOptions): void {
  const body = hasBody(req) ? req : null;
  options.dispatcher.dispatch(
    {
      path: options.path,
      method: req.method as Dispatcher.HttpMethod,
      headers: options.headers,
      body,
      headersTimeout: options.timeoutMs,
      bodyTimeout: options.timeoutMs,
    },
    new ResponseRelay(res, options),
  );
}
