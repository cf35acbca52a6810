// How a request leaves the sidecar: the transports to an upstream (the local app inbound, a peer's
// inbound outbound). HTTP/1.1 goes through an undici pool; HTTP/2 through one multiplexed
// node:http2 session (gRPC's streams, trailers and flow control are what node:http2 does best);
// a peer is asked for both by ALPN and the transport follows its answer. forward.ts drives them
// through one interface, so what an exchange does does not depend on how it travels.
import http2, { type ClientHttp2Session, type ClientHttp2Stream } from "node:http2";
import type { Readable } from "node:stream";
import type { Dispatcher } from "undici";

/** One request as it leaves the sidecar: hop-by-hop headers already removed. */
export interface UpstreamRequest {
  method: string;
  /** Origin-form: "/path?query". */
  path: string;
  /** host[:port], sent as Host (HTTP/1.1) or :authority (HTTP/2). */
  authority: string;
  /** Flat [name, value, ...], without Host and pseudo-headers. */
  headers: string[];
  body: Readable | null;
  /** The caller spoke HTTP/2 (gRPC among them): a peer transport keeps it on HTTP/2. */
  http2: boolean;
  /** Longest wait for the response head, and for each piece of its body. */
  timeoutMs: number;
}

/** Where the answer goes (forward.ts's relay); the transport calls it in this order. */
export interface UpstreamHandler {
  onResponse(status: number, headers: string[]): void;
  /** False: stop delivering until the exchange's resume() is called. */
  onData(chunk: Buffer): boolean;
  onEnd(trailers: string[]): void;
  onError(err: unknown): void;
}

export interface Exchange {
  /** Delivery may go on after onData returned false. */
  resume(): void;
  /** Ends the exchange upstream (a cancelled call cancels the stream upstream). */
  abort(err: Error): void;
}

export interface Transport {
  request(req: UpstreamRequest, handler: UpstreamHandler): Exchange;
  /** No new requests; those in flight finish (GOAWAY for HTTP/2), then connections close. */
  close(): Promise<void>;
  /** Everything closes now. */
  destroy(): Promise<void>;
}

/** An error from the transport itself, with a code errors.ts maps like undici's. */
function transportError(code: string, message: string): Error {
  return Object.assign(new Error(message), { code });
}

/** HTTP/1.1 through an undici dispatcher (a Pool of keep-alive connections). */
export class Http1Transport implements Transport {
  constructor(private readonly dispatcher: Dispatcher) {}

  request(req: UpstreamRequest, handler: UpstreamHandler): Exchange {
    let abort: ((err?: Error) => void) | null = null;
    let resume: (() => void) | null = null;
    let pendingAbort: Error | null = null;
    this.dispatcher.dispatch(
      {
        path: req.path,
        method: req.method as Dispatcher.HttpMethod,
        // TE is hop-by-hop in HTTP/1.1 (HTTP/2 keeps `te: trailers` for gRPC).
        headers: [...withoutTe(req.headers), "host", req.authority],
        body: req.body,
        headersTimeout: req.timeoutMs,
        bodyTimeout: req.timeoutMs,
      },
      {
        onConnect(fn: (err?: Error) => void) {
          abort = fn;
          if (pendingAbort) fn(pendingAbort);
        },
        onHeaders(status: number, raw: Buffer[], resumeFn: () => void) {
          if (status < 200) return true; // 1xx informational: not relayed
          resume = resumeFn;
          handler.onResponse(status, strings(raw));
          return true;
        },
        onData: (chunk: Buffer) => handler.onData(chunk),
        onComplete: (trailers: Buffer[] | null) => handler.onEnd(trailers ? strings(trailers) : []),
        onError: (err: Error) => handler.onError(err),
      } as Dispatcher.DispatchHandler,
    );
    return {
      resume: () => resume?.(),
      abort: (err) => {
        if (abort) abort(err);
        else pendingAbort = err;
      },
    };
  }

  close(): Promise<void> {
    return this.dispatcher.close().catch(() => undefined);
  }

  destroy(): Promise<void> {
    return this.dispatcher.destroy().catch(() => undefined);
  }
}

function withoutTe(headers: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < headers.length; i += 2) {
    if ((headers[i] as string).toLowerCase() !== "te") out.push(headers[i] as string, headers[i + 1] as string);
  }
  return out;
}

function strings(raw: readonly Buffer[]): string[] {
  return raw.map((b) => b.toString("latin1"));
}

/** HTTP/2 response headers (an object) as a flat list, pseudo-headers left out. */
function flatten(headers: http2.IncomingHttpHeaders): string[] {
  const out: string[] = [];
  for (const [name, value] of Object.entries(headers)) {
    if (name.startsWith(":") || value === undefined) continue;
    if (Array.isArray(value)) for (const v of value) out.push(name, v);
    else out.push(name, String(value));
  }
  return out;
}

/** A flat list as HTTP/2 request headers: names lower-cased, repeated names as arrays. */
function h2Headers(req: UpstreamRequest, scheme: "http" | "https"): http2.OutgoingHttpHeaders {
  const headers: http2.OutgoingHttpHeaders = {
    ":method": req.method,
    ":path": req.path,
    ":authority": req.authority,
    ":scheme": scheme,
  };
  for (let i = 0; i < req.headers.length; i += 2) {
    const name = (req.headers[i] as string).toLowerCase();
    const value = req.headers[i + 1] as string;
    const existing = headers[name];
    if (existing === undefined) headers[name] = value;
    else headers[name] = Array.isArray(existing) ? [...existing, value] : [String(existing), value];
  }
  return headers;
}

/**
 * HTTP/2 over one session at a time, made by `connect` when none is open (a TLS connection to a
 * peer with ALPN h2, or cleartext prior knowledge to the app), and made again after it closes.
 */
export class H2Transport implements Transport {
  private session: ClientHttp2Session | null = null;
  private connecting: Promise<ClientHttp2Session> | null = null;
  private closed = false;
  /** Exchanges under way, from request() to their stream's close (or failure to get one). */
  private active = 0;
  private whenIdle: Array<() => void> = [];

  constructor(
    private readonly connect: () => Promise<ClientHttp2Session>,
    private readonly scheme: "http" | "https",
  ) {}

  private open(): Promise<ClientHttp2Session> {
    const current = this.session;
    if (current && !current.closed && !current.destroyed) return Promise.resolve(current);
    if (this.closed) return Promise.reject(transportError("UND_ERR_CLOSED", "the connection pool is closed"));
    this.connecting ??= this.connect().then(
      (session) => {
        this.connecting = null;
        this.session = session;
        // A session that ends (GOAWAY, reset, idle timeout) is simply made again on next use.
        session.once("close", () => {
          if (this.session === session) this.session = null;
        });
        session.on("error", () => undefined); // streams report their own errors
        return session;
      },
      (err: unknown) => {
        this.connecting = null;
        throw err;
      },
    );
    return this.connecting;
  }

  /** One exchange fewer: a retired transport closes its session once none is left. */
  private done(): void {
    this.active--;
    if (this.active === 0) for (const resolve of this.whenIdle.splice(0)) resolve();
  }

  request(req: UpstreamRequest, handler: UpstreamHandler): Exchange {
    let stream: ClientHttp2Stream | null = null;
    let aborted: Error | null = null;
    let settled = false;
    let responded = false;
    const fail = (err: unknown) => {
      if (settled) return;
      settled = true;
      handler.onError(err);
    };
    this.active++;
    this.open().then(
      (session) => {
        if (aborted) return this.done();
        let s: ClientHttp2Stream;
        try {
          s = session.request(h2Headers(req, this.scheme), { endStream: req.body === null });
        } catch (err) {
          this.done();
          return fail(err);
        }
        stream = s;
        s.once("close", () => this.done());
        let trailers: string[] = [];
        s.setTimeout(req.timeoutMs, () => {
          fail(transportError("UND_ERR_HEADERS_TIMEOUT", `no answer within ${req.timeoutMs} ms`));
          s.close(http2.constants.NGHTTP2_CANCEL);
        });
        // Node emits "response" a tick after the HEADERS frame, so DATA (and the end) may already
        // be queued: the body is read only once the head is relayed, or the relay would write a
        // default head and then throw on the real one.
        s.on("response", (headers) => {
          const status = Number(headers[":status"]);
          if (status < 200) return;
          responded = true;
          handler.onResponse(status, flatten(headers));
          s.on("data", (chunk: Buffer) => {
            if (!handler.onData(chunk)) s.pause();
          });
          s.on("end", () => {
            if (settled) return;
            settled = true;
            handler.onEnd(trailers);
          });
        });
        s.on("trailers", (headers) => {
          trailers = flatten(headers);
        });
        s.on("error", fail);
        s.on("close", () => {
          // Reset by the server (or by us) before the end: the exchange failed. A stream that closes
          // before any response (a peer that refused our certificate after the handshake) is a
          // failure too, never an empty 200.
          if (settled) return;
          const why = responded ? `stream closed (code ${s.rstCode})` : "the connection closed before an answer";
          fail(aborted ?? transportError("UND_ERR_SOCKET", why));
        });
        if (req.body) {
          req.body.pipe(s);
          req.body.once("error", (err) => s.destroy(err));
        }
      },
      (err: unknown) => {
        this.done();
        fail(err);
      },
    );
    return {
      resume: () => {
        if (responded) stream?.resume();
      },
      abort: (err) => {
        aborted = err;
        settled = true;
        stream?.close(http2.constants.NGHTTP2_CANCEL);
      },
    };
  }

  /**
   * No new exchanges; the session closes once those under way are over. Closing it earlier would
   * send GOAWAY ahead of streams nghttp2 has not flushed yet, and the server would refuse them.
   */
  async close(): Promise<void> {
    this.closed = true;
    if (this.active > 0) await new Promise<void>((resolve) => this.whenIdle.push(resolve));
    const session = this.session ?? (await this.connecting?.catch(() => null));
    if (!session || session.closed || session.destroyed) return;
    await new Promise<void>((resolve) => session.close(() => resolve()));
  }

  async destroy(): Promise<void> {
    this.closed = true;
    this.session?.destroy();
    (await this.connecting?.catch(() => null))?.destroy();
  }
}

/**
 * Resolves once the session's SETTINGS are exchanged. Streams requested before that are pending
 * in Node, and a session closed (a reload retiring it) while still connecting refuses them
 * (REFUSED_STREAM); one that is connected lets every stream it took finish.
 */
export function connected(session: ClientHttp2Session): Promise<ClientHttp2Session> {
  return new Promise((resolve, reject) => {
    if (session.connecting === false) return resolve(session);
    session.once("connect", () => {
      session.off("error", reject);
      resolve(session);
    });
    session.once("error", reject);
  });
}

/** Raised by a peer's HTTP/2 connect when the server chose HTTP/1.1: the request goes that way. */
const ALPN_HTTP1 = "ASHMESH_ALPN_HTTP1";

/**
 * A peer's inbound. HTTP/2 and gRPC callers go over one multiplexed h2 session when the peer's
 * server takes ALPN h2 (every ashmesh inbound does); HTTP/1.1 callers go through a pool of
 * HTTP/1.1 connections, unless outbound.peerProtocol is "h2". Why: Node's HTTP/2 client keeps each
 * stream's objects alive until a full GC, so under load its scavenges run 10-40 ms against 1-2 ms
 * for the pool, and that is the p99 the bench measures (see README "Performance"). A peer that
 * offers only HTTP/1.1 gets everything through the pool; the first h2 connection tells, and the
 * answer holds for this transport (one identity generation).
 */
export class PeerTransport implements Transport {
  private peerHttp1Only = false;
  private readonly h2: H2Transport;

  constructor(
    connectTls: (alpn: readonly string[]) => Promise<import("node:tls").TLSSocket>,
    private readonly h1: Http1Transport,
    authority: string,
    idleTimeoutMs: number,
    /** outbound.peerProtocol: "h2" multiplexes HTTP/1.1 callers too; "match" keeps them on HTTP/1.1. */
    private readonly multiplexAll: boolean,
  ) {
    this.h2 = new H2Transport(async () => {
      const socket = await connectTls(["h2", "http/1.1"]);
      if (socket.alpnProtocol !== "h2") {
        socket.destroy();
        this.peerHttp1Only = true;
        throw transportError(ALPN_HTTP1, `${authority} speaks HTTP/1.1 only`);
      }
      const session = http2.connect(`https://${authority}`, { createConnection: () => socket });
      session.setTimeout(idleTimeoutMs, () => session.close());
      return connected(session);
    }, "https");
  }

  request(req: UpstreamRequest, handler: UpstreamHandler): Exchange {
    if (this.peerHttp1Only || !(req.http2 || this.multiplexAll)) return this.h1.request(req, handler);
    let current: Exchange | null = null;
    let pendingResume = false;
    const retrying: UpstreamHandler = {
      onResponse: (status, headers) => handler.onResponse(status, headers),
      onData: (chunk) => handler.onData(chunk),
      onEnd: (trailers) => handler.onEnd(trailers),
      onError: (err) => {
        // The peer chose HTTP/1.1 before anything of this request was sent: send it that way.
        if ((err as { code?: string }).code === ALPN_HTTP1) {
          current = this.h1.request(req, handler);
          if (pendingResume) current.resume();
        } else handler.onError(err);
      },
    };
    current = this.h2.request(req, retrying);
    return {
      resume: () => {
        pendingResume = true;
        current?.resume();
      },
      abort: (err) => current?.abort(err),
    };
  }

  async close(): Promise<void> {
    await Promise.all([this.h2.close(), this.h1.close()]);
  }

  async destroy(): Promise<void> {
    await Promise.all([this.h2.destroy(), this.h1.destroy()]);
  }
}
