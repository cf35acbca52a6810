// The inbound proxy terminates mutual TLS from other services of the mesh and forwards to the
// local application: HTTP/1.1 and HTTP/2 (ALPN h2) from peers, to an app that speaks HTTP/1.1 or
// HTTP/2 cleartext (inbound.appProtocol: h2c, as gRPC servers do), WebSocket upgrades too. Nothing
// reaches the application from a connection whose client certificate did not verify: such
// sockets are destroyed before an HTTP parser ever sees them; every request and upgrade then
// passes the allow-list and carries the caller's identity in x-forwarded-client-cert.
import http, { type IncomingMessage } from "node:http";
import http2, { type Http2Session, type ServerHttp2Session } from "node:http2";
import net, { type AddressInfo, type Socket } from "node:net";
import type { TLSSocket } from "node:tls";
import { Pool } from "undici";
import type { Config } from "../config/schema.js";
import type { ChallengeResponder } from "./acme-challenge.js";
import type { EdgeCounter, Edges } from "./edges.js";
import { answerClientError, ProxyError, sendError, writeSocketError } from "./errors.js";
import {
  authorityOf,
  closeAfter,
  forward,
  forwardRequestHeaders,
  isH2,
  protocolOf,
  refuseRequest,
  type ServerReply,
  type ServerRequest,
} from "./forward.js";
import type { Identity } from "./identity.js";
import type { IdentityChange } from "./identity-store.js";
import type { Logger } from "./log.js";
import type { Metrics, Protocol, RequestRecorder } from "./metrics.js";
import { authorize, compilePolicy, type Policy } from "./policy.js";
import { type Accepted, TlsListener } from "./tls-listener.js";
import { connected, H2Transport, Http1Transport, type Transport } from "./transport.js";
import { tunnel, upgradeHead } from "./upgrade.js";
import { XFCC, xfccValue } from "./xfcc.js";

/** What a verified (or, with verifyClient: false, unauthenticated) connection carries. */
interface Connection {
  tls: Accepted;
  label: string;
  xfcc: string[];
  recorder: RequestRecorder;
  edge: EdgeCounter;
}

const kConnection = Symbol("ashmesh.connection");
const kSession = Symbol("ashmesh.session");
type Carrier = { [kConnection]?: Connection; [kSession]?: ServerHttp2Session };

export interface InboundDeps {
  config: Config;
  identity: Identity;
  metrics: Metrics;
  logger: Logger;
  edges: Edges;
  /** ACME's challenge responder, when tls-alpn-01 is answered on this listener. */
  acme?: ChallengeResponder | null;
}

/** The connection a request arrived on: its TLS socket (HTTP/1.1) or its session (HTTP/2). */
function connectionOf(req: ServerRequest): Connection | undefined {
  return isH2(req)
    ? (req.stream.session as (Http2Session & Carrier) | undefined)?.[kConnection]
    : (req.socket as Socket & Carrier)[kConnection];
}

export class Inbound {
  private readonly listener: TlsListener;
  private readonly httpServer: http.Server;
  private readonly h2Server: http2.Http2Server;
  private readonly sessions = new Set<ServerHttp2Session>();
  private readonly app: Transport;
  private readonly appAddress: { host: string; port: number };
  private readonly policy: Policy;
  private identity: Identity;
  private draining = false;

  constructor(private readonly deps: InboundDeps) {
    const { config } = deps;
    const { limits } = config;
    this.identity = deps.identity;
    this.policy = compilePolicy(config.inbound);
    const appUrl = new URL(config.inbound.app);
    this.appAddress = { host: appUrl.hostname.replace(/^\[|\]$/g, ""), port: Number(appUrl.port || 80) };
    this.app =
      config.inbound.appProtocol === "h2c"
        ? new H2Transport(() => this.connectAppH2c(), "http")
        : new Http1Transport(
            new Pool(config.inbound.app, {
              connections: limits.upstreamConnections,
              keepAliveTimeout: limits.upstreamKeepAliveMs,
              headersTimeout: limits.upstreamTimeoutMs,
              bodyTimeout: limits.upstreamTimeoutMs,
              connect: { timeout: limits.connectTimeoutMs },
            }),
          );
    this.listener = new TlsListener({
      name: "inbound",
      config,
      identity: this.identity,
      metrics: deps.metrics,
      logger: deps.logger,
      verifyClient: config.inbound.verifyClient,
      alpn: ["h2", "http/1.1"],
      protocol: (socket) => (socket.alpnProtocol === "h2" ? "h2" : "http1"),
      acme: deps.acme ?? null,
      onConnection: (socket, state) => this.onConnection(socket, state),
      close: (socket) => this.closeConnection(socket),
    });
    this.httpServer = http.createServer(
      {
        keepAliveTimeout: limits.idleTimeoutMs,
        headersTimeout: limits.headersTimeoutMs,
        requestTimeout: limits.requestTimeoutMs,
        maxHeaderSize: limits.maxHeaderBytes,
      },
      (req, res) => this.onRequest(req, res),
    );
    // Node drops header lines past maxHeadersCount without a word; refuseRequest counts them instead.
    this.httpServer.maxHeadersCount = 0;
    this.httpServer.on("upgrade", (req: IncomingMessage, socket: Socket, head: Buffer) =>
      this.onUpgrade(req, socket, head),
    );
    this.httpServer.on("clientError", (err: NodeJS.ErrnoException, socket: Socket & Carrier) => {
      const status = answerClientError(err, socket);
      if (status) socket[kConnection]?.recorder.record("http1", status, 0);
    });
    this.h2Server = http2.createServer(
      {
        maxHeaderListPairs: limits.maxRequestHeaders + 8, // the pseudo-headers come on top
        settings: { maxHeaderListSize: limits.maxHeaderBytes },
      },
      (req, res) => this.onRequest(req, res),
    );
    this.h2Server.setTimeout(limits.idleTimeoutMs);
    this.h2Server.on("session", (session: ServerHttp2Session & Carrier) => {
      // session.socket is a proxy that reads and writes through to the TLS socket.
      const socket = session.socket as TLSSocket & Carrier;
      session[kConnection] = socket[kConnection];
      socket[kSession] = session;
      this.sessions.add(session);
      session.once("close", () => this.sessions.delete(session));
      if (this.draining) session.close();
    });
  }

  get openConnections(): number {
    return this.listener.openConnections;
  }

  /** Listens on inbound.listen, or on `fd` when systemd handed over the socket. */
  async listen(fd?: number): Promise<AddressInfo> {
    const address = await this.listener.listen(this.deps.config.inbound.listen, fd);
    // The HTTP servers never listen themselves; this starts their timeout checks.
    this.httpServer.emit("listening");
    return address;
  }

  /** Cleartext HTTP/2 with prior knowledge to the app (gRPC servers speak nothing else). */
  private connectAppH2c(): Promise<http2.ClientHttp2Session> {
    const session = http2.connect(`http://${this.appAddress.host}:${this.appAddress.port}`, {
      createConnection: () => net.connect({ ...this.appAddress, timeout: this.deps.config.limits.connectTimeoutMs }),
    });
    session.setTimeout(this.deps.config.limits.upstreamKeepAliveMs, () => session.close());
    return connected(session);
  }

  private onConnection(socket: TLSSocket & Carrier, state: Accepted): void {
    const { metrics, config } = this.deps;
    const ours = this.identity.server.summary.identity;
    const label = state.kind === "verified" ? state.peer.primary : "unauthenticated";
    socket[kConnection] = {
      tls: state,
      label,
      xfcc: state.kind === "verified" ? [XFCC, xfccValue(this.identity.server.peer.uris[0] ?? ours, state.peer)] : [],
      recorder: metrics.recorder("inbound", label),
      edge: this.deps.edges.edge(
        {
          direction: "inbound",
          src: socket.remoteAddress ?? "unknown",
          dst: config.service.name,
          src_identity: label,
          dst_identity: ours,
        },
        { version: state.version, cipher: state.cipher },
      ),
    };
    if (socket.alpnProtocol === "h2") this.h2Server.emit("connection", socket);
    else this.httpServer.emit("connection", socket);
  }

  /** Revocation: an HTTP/2 connection is told GOAWAY first, then closed like any other. */
  private closeConnection(socket: TLSSocket): void {
    const session = (socket as TLSSocket & Carrier)[kSession];
    if (session && !session.destroyed) {
      session.goaway(http2.constants.NGHTTP2_NO_ERROR);
      session.destroy();
    }
    socket.destroy();
  }

  /**
   * Whether `req` may go to the app: framing, then policy. A refusal is logged and counted
   * here; the caller writes it (a response, a gRPC status, or bytes on an upgrading socket).
   */
  private admit(req: ServerRequest, connection: Connection): ProxyError | null {
    const url = req.url ?? "/";
    const refused =
      refuseRequest(req, this.deps.config.limits) ??
      (url.charCodeAt(0) !== 47 /* / */
        ? new ProxyError("bad_request", "inbound expects origin-form request targets (/path)")
        : null);
    if (refused) return refused;
    const query = url.indexOf("?");
    const path = query === -1 ? url : url.slice(0, query);
    const peer = connection.tls.kind === "verified" ? connection.tls.peer : null;
    const decision = authorize(this.policy, peer, req.method ?? "GET", path);
    if (decision.allowed) return null;
    if (decision.reason === "non_canonical_path") {
      return new ProxyError("non_canonical_path", `the path ${JSON.stringify(path)} is not in canonical form`);
    }
    this.deps.metrics.authzDenied.inc({ identity: connection.label, route: decision.route });
    this.deps.logger.info({
      event: "authz_denied",
      identity: connection.label,
      route: decision.route,
      method: req.method,
      path,
      reason: decision.reason,
    });
    return new ProxyError(
      "forbidden",
      `${connection.label} may not call ${req.method} ${path} on ${this.deps.config.service.dnsName}`,
      { identity: connection.label, route: decision.route },
    );
  }

  private onRequest(req: ServerRequest, res: ServerReply): void {
    const started = performance.now();
    const connection = connectionOf(req);
    if (!connection) {
      // Unreachable by construction (only classified sockets are handed to the HTTP servers).
      req.socket.destroy();
      return;
    }
    const protocol = protocolOf(req);
    const grpc = protocol === "grpc";
    const done = (status: number) => {
      connection.recorder.record(protocol, status, (performance.now() - started) / 1000);
      connection.edge.hit();
    };
    if (this.draining) closeAfter(res);
    let refused = this.admit(req, connection);
    if (!refused && grpc && this.deps.config.inbound.appProtocol !== "h2c") {
      refused = new ProxyError(
        "not_implemented",
        `${this.deps.config.service.dnsName} takes gRPC only with inbound.appProtocol: h2c (its app speaks HTTP/1.1)`,
      );
    }
    if (refused) {
      // The body, if any, is not read: nothing after a refused head may be taken as a request.
      if (refused.status !== 403) closeAfter(res);
      sendError(res, refused, grpc);
      done(grpc ? 200 : refused.status);
      return;
    }
    forward(req, res, {
      transport: this.app,
      target: this.deps.config.inbound.app,
      side: "app",
      path: req.url ?? "/",
      authority: authorityOf(req),
      headers: forwardRequestHeaders(req.rawHeaders, req.headers.connection, connection.xfcc),
      timeoutMs: this.deps.config.limits.upstreamTimeoutMs,
      done,
    });
  }

  /** WebSocket and other HTTP/1.1 upgrades: admitted like any request, then tunnelled to the app. */
  private onUpgrade(req: IncomingMessage, socket: Socket & Carrier, head: Buffer): void {
    const started = performance.now();
    const connection = socket[kConnection];
    if (!connection) {
      socket.destroy();
      return;
    }
    const protocol: Protocol = "ws";
    const record = (status: number) => {
      connection.recorder.record(protocol, status, (performance.now() - started) / 1000);
      connection.edge.hit();
    };
    const refused = this.admit(req, connection);
    if (refused) {
      writeSocketError(socket, refused);
      record(refused.status);
      return;
    }
    const app = net.connect({ ...this.appAddress, timeout: this.deps.config.limits.connectTimeoutMs });
    app.once("timeout", () => app.destroy(Object.assign(new Error("connect timeout"), { code: "ETIMEDOUT" })));
    app.once("error", (err: NodeJS.ErrnoException) => {
      if (app.connecting || !app.readable) {
        const error = new ProxyError("app_unavailable", `${this.deps.config.inbound.app} ${err.code ?? err.message}`);
        writeSocketError(socket, error);
        record(error.status);
      }
    });
    app.once("connect", () => {
      app.setTimeout(0);
      const authority = authorityOf(req) || `${this.appAddress.host}:${this.appAddress.port}`;
      tunnel(socket, app, upgradeHead(req, req.url ?? "/", authority, connection.xfcc), head, record);
    });
  }

  /** A new identity: the listener takes it for new handshakes and closes connections it no longer trusts. */
  applyIdentity(change: IdentityChange): void {
    this.identity = change.next;
    this.listener.applyIdentity(change);
  }

  /** Stops accepting; idle connections close now, busy ones after their responses (HTTP/2: GOAWAY). */
  async drain(deadline: number): Promise<void> {
    this.draining = true;
    const closed = this.listener.stopAccepting();
    for (const session of this.sessions) session.close();
    this.httpServer.closeIdleConnections();
    const poll = setInterval(() => this.httpServer.closeIdleConnections(), 50);
    const timer = new Promise<void>((resolve) => setTimeout(resolve, Math.max(0, deadline - Date.now())).unref());
    await Promise.race([closed, timer]);
    clearInterval(poll);
    this.listener.destroyAll();
    await this.app.close();
  }

  async close(): Promise<void> {
    this.listener.destroyAll();
    this.httpServer.closeAllConnections();
    await this.listener.stopAccepting();
    this.httpServer.close();
    await this.app.destroy();
  }
}
